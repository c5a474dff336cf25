"""The audit commands: ``pgwarden audit ship``, ``verify``, ``status`` and ``resend``, and
``pgwarden replay``."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
import tomllib
from pathlib import Path
from typing import Any, Final

from pydantic import ValidationError
from pydantic_settings import SettingsError

EXIT_CONFIG: Final = 2
_PR_SET_PDEATHSIG: Final = 1
log = logging.getLogger("pgwarden")


def _load_settings(config: Path | None) -> Any:
    """Settings, or an exit code after printing why they could not be read."""
    from pgwarden.cli import describe_validation_error
    from pgwarden.config import load_settings

    try:
        return load_settings(config)
    except ValidationError as exc:
        print(f"pgwarden: {describe_validation_error(exc)}", file=sys.stderr)
    except SettingsError as exc:
        print(f"pgwarden: invalid settings: {exc}", file=sys.stderr)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        print(f"pgwarden: cannot read config file: {exc}", file=sys.stderr)
    return EXIT_CONFIG


def _log_to_stderr(level: str) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s",
    )


def _die_with_parent(parent_pid: int) -> bool:
    """SIGTERM this process when the parent goes; False if it is already gone."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    return os.getppid() == parent_pid


def _keep_freed_memory() -> None:
    """Let glibc keep the memory a batch frees for the next one.

    Each batch allocates and frees the same few MiB (segment reads, lines, requests);
    by default glibc hands it back to the kernel at once and the next batch faults it in
    again, page by page: a third of the shipper's CPU went to those faults.
    """
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_trim_threshold, 256 << 20)
        libc.mallopt(m_mmap_threshold, 32 << 20)


def cmd_ship(args: argparse.Namespace) -> int:
    settings = _load_settings(args.config)
    if isinstance(settings, int):
        return settings
    _log_to_stderr(settings.log_level)
    if settings.audit.directory is None:
        print("pgwarden: audit.directory is not set: no spool to ship", file=sys.stderr)
        return EXIT_CONFIG
    if args.parent_pid is not None and not _die_with_parent(args.parent_pid):
        return 0
    _keep_freed_memory()
    with contextlib.suppress(OSError):
        os.nice(settings.audit.shipper_nice)
    if settings.audit.shipper_idle_priority and hasattr(os, "SCHED_IDLE"):
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    stop = threading.Event()
    signals = 0

    def on_signal(signum: int, frame: object) -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            os._exit(1)  # a second signal: stop now (the spool keeps everything)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # SIGHUP reopens the gateway's statement log; the shipper has nothing to reopen, and a
    # HUP sent to the whole process group must not end it.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # A shipper restarted by the gateway inherits the signal mask of the thread that
    # started it, where these are blocked (ShipperSupervisor._watch).
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD})
    from pgwarden.audit.shipper import Shipper

    try:
        shipper = Shipper(settings)
    except (OSError, ValueError) as exc:
        print(f"pgwarden: cannot start the audit shipper: {exc}", file=sys.stderr)
        return 1
    return shipper.run(stop, until_empty=args.until_empty)


def cmd_verify(args: argparse.Namespace) -> int:
    from pgwarden.audit import chain
    from pgwarden.audit.verify import verify_path

    keys: list[bytes]
    if args.key_file:
        keys = [path.read_bytes().strip() for path in args.key_file]
    else:
        settings = _load_settings(args.config)
        if isinstance(settings, int):
            return settings
        try:
            keys = [
                chain.read_key(settings.audit.chain_key_bytes(), settings.audit.directory),
                *settings.audit.previous_chain_keys(),
            ]
        except OSError as exc:
            print(f"pgwarden: no chain key ({exc}); give --key-file", file=sys.stderr)
            return EXIT_CONFIG
    if not args.path.exists():
        print(f"pgwarden: no such file or directory: {args.path}", file=sys.stderr)
        return EXIT_CONFIG
    report = verify_path(args.path, keys)
    print(report.summary())
    return 0 if report.ok else 1


def cmd_status(args: argparse.Namespace) -> int:
    from pgwarden.audit.status import audit_status

    settings = _load_settings(args.config)
    if isinstance(settings, int):
        return settings
    directory: Path | None = args.dir or settings.audit.directory
    if directory is None:
        print("pgwarden: audit.directory is not set; give --dir", file=sys.stderr)
        return EXIT_CONFIG
    if not directory.is_dir():
        print(f"pgwarden: no audit directory at {directory}", file=sys.stderr)
        return EXIT_CONFIG
    status = audit_status(directory, settings.audit.max_spool_bytes)
    print(status.to_json() if args.json else status.summary())
    age = status.oldest_undelivered_seconds
    if args.max_lag is not None and age is not None and age > args.max_lag:
        if not args.json:
            print(
                f"pgwarden: the oldest undelivered audit record is {age:.1f} s old "
                f"(--max-lag {args.max_lag:g})",
                file=sys.stderr,
            )
        return 1
    return 0


def cmd_resend(args: argparse.Namespace) -> int:
    from pgwarden.audit.resend import CannotResend, otlp_exporters, resend

    settings = _load_settings(args.config)
    if isinstance(settings, int):
        return settings
    _log_to_stderr(settings.log_level)
    missing = [str(path) for path in args.files if not path.is_file()]
    if missing:
        print(f"pgwarden: no such file: {', '.join(missing)}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        spans, logs = otlp_exporters(settings.audit)
    except (CannotResend, OSError) as exc:
        print(f"pgwarden: cannot resend: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        results = resend(args.files, spans, logs)
    except CannotResend as exc:
        print(f"pgwarden: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    finally:
        spans.shutdown()
        logs.shutdown()
    for result in results:
        detail = f": {result.detail}" if result.detail else ""
        print(f"{result.path}: {result.outcome}{detail}")
    return 0 if all(r.outcome == "delivered" for r in results) else 1


def cmd_replay(args: argparse.Namespace) -> int:
    from pgwarden.audit.recording import session_lines
    from pgwarden.audit.replay import transcript

    directory: Path | None = args.dir
    if directory is None:
        settings = _load_settings(args.config)
        if isinstance(settings, int):
            return settings
        if settings.audit.directory is None:
            print("pgwarden: audit.directory is not set; give --dir", file=sys.stderr)
            return EXIT_CONFIG
        directory = settings.audit.directory
    try:
        lines = session_lines(directory, args.session_id)
    except ValueError as exc:
        print(f"pgwarden: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except FileNotFoundError:
        print(
            f"pgwarden: no recording of session {args.session_id} in {directory} "
            "(not shipped yet, or recording is off)",
            file=sys.stderr,
        )
        return 1
    if args.records:
        sys.stdout.buffer.write(b"".join(line + b"\n" for _, line in lines))
    else:
        sys.stdout.write(transcript([record for record, _ in lines]))
    return 0


def add_commands(commands: Any) -> None:
    """Register ``audit`` (ship, verify, status, resend) and ``replay`` on the CLI's
    subparsers."""
    audit = commands.add_parser(
        "audit", help="audit trail: ship the spool, verify records, show the backlog"
    )
    sub = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    ship = sub.add_parser(
        "ship", help="ship the spool to the configured backend (serve runs this itself)"
    )
    ship.add_argument("--config", type=Path, metavar="FILE", help="TOML settings file")
    ship.add_argument(
        "--until-empty",
        action="store_true",
        help="exit once everything is delivered (status 1 if the backend keeps failing)",
    )
    ship.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    ship.set_defaults(func=cmd_ship)
    verify = sub.add_parser(
        "verify",
        help="check the hash chain of a spool or an exported file; report the first "
        "broken or missing link",
    )
    verify.add_argument(
        "path", type=Path, help="audit directory, spool, stream directory, segment or file"
    )
    verify.add_argument("--config", type=Path, metavar="FILE", help="TOML settings file")
    verify.add_argument(
        "--key-file",
        type=Path,
        metavar="FILE",
        action="append",
        help="chain key (default: from the settings); repeat it for the keys of before a "
        "key rotation",
    )
    verify.set_defaults(func=cmd_verify)
    status = sub.add_parser(
        "status",
        help="how far the audit trail is from the backend: records written, delivered, "
        "undelivered and how old, spool use against its bound, whether a shipper runs",
    )
    status.add_argument("--config", type=Path, metavar="FILE", help="TOML settings file")
    status.add_argument(
        "--dir", type=Path, metavar="DIR", help="audit directory (default: from the settings)"
    )
    status.add_argument("--json", action="store_true", help="print JSON (for monitoring)")
    status.add_argument(
        "--max-lag",
        type=float,
        metavar="SECONDS",
        help="exit with status 1 when a record older than this is not delivered yet "
        "(a health check)",
    )
    status.set_defaults(func=cmd_status)
    again = sub.add_parser(
        "resend",
        help="send again requests a backend partly refused (kept under rejected/); each "
        "file is removed once the backend accepts all of it",
    )
    again.add_argument(
        "files", type=Path, nargs="+", metavar="FILE", help="*.traces.binpb / *.logs.binpb"
    )
    again.add_argument("--config", type=Path, metavar="FILE", help="TOML settings file")
    again.set_defaults(func=cmd_resend)
    replay = commands.add_parser(
        "replay", help="print a recorded session as a psql-like transcript"
    )
    replay.add_argument("session_id", help="the session id (pgwarden.session.id)")
    replay.add_argument("--config", type=Path, metavar="FILE", help="TOML settings file")
    replay.add_argument(
        "--dir", type=Path, metavar="DIR", help="audit directory (default: from the settings)"
    )
    replay.add_argument(
        "--records",
        action="store_true",
        help="print the session's records as stored (JSON lines, each with its chain hash) "
        "instead of the transcript",
    )
    replay.set_defaults(func=cmd_replay)
