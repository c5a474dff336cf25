"""The throwaway PostgreSQL used by the demo, the tests and the benchmarks."""

from __future__ import annotations

import os

import psycopg
import pytest

from pgwarden.pgcluster import ClusterError, TemporaryCluster


def test_lifecycle_and_cleanup() -> None:
    cluster = TemporaryCluster(
        settings={"fsync": False, "work_mem": "8MB", "cluster_name": "it's quoted"},
        hba_lines=["host all refused_role 127.0.0.1/32 reject"],
    )
    with cluster:
        assert cluster.running
        directory = cluster.base_dir
        assert cluster.psql("show work_mem; show fsync").split() == ["8MB", "off"]
        assert cluster.psql("show cluster_name").strip() == "it's quoted"
        assert cluster.psql("select 1", dbname="template1").strip() == "1"
        with psycopg.connect(cluster.dsn()) as conn:
            assert conn.execute("select current_user").fetchone() == ("postgres",)
        with psycopg.connect(cluster.dsn(unix_socket=True)) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
        with psycopg.connect(cluster.url()) as conn:
            assert conn.execute("select 1").fetchone() == (1,)

        cluster.psql("create role refused_role login password 'x'")
        with pytest.raises(psycopg.OperationalError, match="rejects connection"):
            psycopg.connect(cluster.dsn(user="refused_role", password="x"))
        with pytest.raises(ClusterError, match="division by zero"):
            cluster.psql("select 1/0")

        pid = cluster.postmaster_pid
        cluster.restart()
        assert cluster.postmaster_pid not in (None, pid)
        cluster.kill()
        assert not cluster.running
        cluster.start()
        assert cluster.psql("select 'recovered'").strip() == "recovered"
    assert not cluster.running
    assert not directory.exists()


def test_ssl_cluster_verifies_with_its_ca() -> None:
    with TemporaryCluster(ssl=True, settings={"fsync": False}) as cluster:
        dsn = cluster.dsn(sslmode="verify-full", sslrootcert=str(cluster.ca_cert_file))
        with psycopg.connect(dsn) as conn:
            assert conn.info.pgconn.ssl_in_use


def test_cleanup_after_failed_start(tmp_path: object) -> None:
    cluster = TemporaryCluster(settings={"shared_buffers": "not-a-size"})
    with pytest.raises(ClusterError, match="shared_buffers"):
        cluster.start()
    cluster.cleanup()
    assert not cluster.base_dir.exists()
    assert not cluster.running


def test_runs_as_unprivileged_user_when_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("only meaningful as root")
    with TemporaryCluster(settings={"fsync": False}) as cluster:
        pid = cluster.postmaster_pid
        assert pid is not None
        assert os.stat(f"/proc/{pid}").st_uid != 0
