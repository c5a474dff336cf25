"""Read all of ``pgbench_accounts`` through an endpoint with clients that are not the bottleneck.

psql spends its time formatting rows, so every proxy looks as fast as a direct connection
when psql reads a large result.  These clients discard rows as cheaply as possible:

* ``select``: ``SELECT * FROM pgbench_accounts`` in binary result format through libpq
  (psycopg's low-level ``pq`` layer) in chunked-rows mode: rows are parsed by libpq in C
  and dropped 10 000 at a time; no Python object per row.  Needs libpq >= 17 (psycopg's
  binary wheel bundles one); older libpq falls back to one whole-result ``PGresult``.
* ``copy``: ``COPY pgbench_accounts TO STDOUT`` with asyncpg, whose copy-out path hands
  the sink the payload of many CopyData messages at once.

Throughput is reported in MB/s (10^6 bytes) of protocol payload: DataRow messages for
``select``, CopyData contents for ``copy``.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from dataclasses import dataclass
from typing import Literal

from psycopg import pq

from endpoints import Endpoint

BulkKind = Literal["select", "copy"]

BULK_TABLE = "pgbench_accounts"
_SELECT_SQL = f"SELECT * FROM {BULK_TABLE}".encode()
_CHUNK_ROWS = 10_000


class BulkReadError(RuntimeError):
    """The bulk read failed; the message carries the server's or the client's error."""


@dataclass(frozen=True)
class BulkScenario:
    kind: BulkKind
    tls: bool

    @property
    def key(self) -> str:
        name = "SELECT *" if self.kind == "select" else "COPY TO STDOUT"
        return name + (" TLS" if self.tls else "")


@dataclass(frozen=True)
class BulkResult:
    seconds: float
    rows: int
    payload_bytes: int

    @property
    def mb_per_s(self) -> float:
        return self.payload_bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


def select_payload_bytes(endpoint: Endpoint) -> tuple[int, int]:
    """(rows, DataRow bytes) of ``SELECT * FROM pgbench_accounts`` in binary format.

    Computed once, untimed, with SQL: each DataRow is tag (1) + length (4) + column
    count (2) + per column a length word (4) and the value: three int4 (4 bytes each) and
    the ``char(84)`` filler (its stored bytes; ``octet_length`` counts the padding).
    """
    conn = _connect_libpq(endpoint, tls=False)
    try:
        result = conn.exec_(
            f"SELECT count(*), coalesce(sum(octet_length(filler)), 0) FROM {BULK_TABLE}".encode()
        )
        _check(conn, result, pq.ExecStatus.TUPLES_OK)
        rows = int(_value(result, 0))
        filler_bytes = int(_value(result, 1))
    finally:
        conn.finish()
    per_row_fixed = 1 + 4 + 2 + 4 * 4 + 3 * 4
    return rows, rows * per_row_fixed + filler_bytes


def bulk_select(endpoint: Endpoint, *, tls: bool, expected_rows: int, payload: int) -> BulkResult:
    """Time ``SELECT * FROM pgbench_accounts`` (connection set-up excluded)."""
    conn = _connect_libpq(endpoint, tls=tls)
    try:
        started = time.perf_counter()
        conn.send_query_params(_SELECT_SQL, None, result_format=1)
        if pq.version() >= 170000:
            conn.set_chunked_rows_mode(_CHUNK_ROWS)
        rows = 0
        error: str | None = None
        while (result := conn.get_result()) is not None:
            if result.status in (pq.ExecStatus.TUPLES_CHUNK, pq.ExecStatus.TUPLES_OK):
                rows += result.ntuples
            else:
                error = result.get_error_message()
            result.clear()
        seconds = time.perf_counter() - started
    finally:
        conn.finish()
    if error is not None:
        raise BulkReadError(f"SELECT through {endpoint.name}: {error}")
    if rows != expected_rows:
        raise BulkReadError(
            f"SELECT through {endpoint.name}: {rows} rows, {expected_rows} expected"
        )
    return BulkResult(seconds=seconds, rows=rows, payload_bytes=payload)


def bulk_copy(endpoint: Endpoint, *, tls: bool, expected_rows: int) -> BulkResult:
    """Time ``COPY pgbench_accounts TO STDOUT`` (connection set-up excluded)."""
    return asyncio.run(_bulk_copy(endpoint, tls=tls, expected_rows=expected_rows))


async def _bulk_copy(endpoint: Endpoint, *, tls: bool, expected_rows: int) -> BulkResult:
    import asyncpg  # type: ignore[import-untyped]

    ssl_context: ssl.SSLContext | bool = False
    if tls:
        # sslmode=require semantics: encrypt, do not verify (the certificates are throwaway).
        ssl_context = ssl.create_default_context()
        ssl_context.check_hostname = False
        ssl_context.verify_mode = ssl.CERT_NONE
    conn = await asyncpg.connect(**endpoint.asyncpg_login(), ssl=ssl_context, timeout=10)
    received = 0

    async def sink(chunk: bytes) -> None:
        nonlocal received
        received += len(chunk)

    try:
        started = time.perf_counter()
        status: str = await conn.copy_from_table(BULK_TABLE, output=sink)
        seconds = time.perf_counter() - started
    except asyncpg.PostgresError as exc:
        raise BulkReadError(f"COPY through {endpoint.name}: {exc}") from exc
    finally:
        await conn.close()
    rows = int(status.split()[-1]) if status.startswith("COPY ") else -1
    if rows != expected_rows:
        raise BulkReadError(
            f"COPY through {endpoint.name}: status {status!r}, {expected_rows} rows expected"
        )
    return BulkResult(seconds=seconds, rows=rows, payload_bytes=received)


def _connect_libpq(endpoint: Endpoint, *, tls: bool) -> pq.abc.PGconn:
    conn = pq.PGconn.connect(endpoint.conninfo(tls=tls).encode())
    if conn.status != pq.ConnStatus.OK:
        message = conn.get_error_message().strip()
        conn.finish()
        raise BulkReadError(f"cannot connect to {endpoint.name}: {message}")
    return conn


def _check(conn: pq.abc.PGconn, result: pq.abc.PGresult, expected: pq.ExecStatus) -> None:
    if result.status != expected:
        message = result.get_error_message() or conn.get_error_message()
        raise BulkReadError(message.strip())


def _value(result: pq.abc.PGresult, column: int) -> str:
    raw = result.get_value(0, column)
    if raw is None:
        raise BulkReadError("unexpected NULL")
    return bytes(raw).decode()
