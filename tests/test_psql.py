"""psql through the gateway: queries, errors, notices, \\copy in both directions."""

from __future__ import annotations

from pathlib import Path

from harness import GatewayProcess, run_tool


def psql(gateway: GatewayProcess, *args: str, stdin: str | None = None) -> tuple[int, str, str]:
    result = run_tool(
        ["psql", "--no-psqlrc", "--quiet", "--no-align", "--tuples-only", *args],
        gateway.env(),
        input=stdin,
    )
    return result.returncode, result.stdout, result.stderr


def test_simple_query(gateway: GatewayProcess) -> None:
    code, out, err = psql(gateway, "-c", "select 40 + 2")
    assert code == 0, err
    assert out.strip() == "42"


def test_multi_statement_query_string_returns_every_result(gateway: GatewayProcess) -> None:
    code, out, err = psql(gateway, "-c", "select 1 as a; select 'two' as b; select 3")
    assert code == 0, err
    assert out.split() == ["1", "two", "3"]


def test_script_with_transaction(gateway: GatewayProcess) -> None:
    script = """
    create temp table t (id int primary key, name text);
    begin;
    insert into t values (1, 'one'), (2, 'two');
    rollback;
    begin;
    insert into t values (3, 'three');
    commit;
    select string_agg(name, ',' order by id) from t;
    """
    code, out, err = psql(gateway, "-v", "ON_ERROR_STOP=1", "-f", "-", stdin=script)
    assert code == 0, err
    assert out.strip() == "three"


def test_error_is_reported_and_session_continues(gateway: GatewayProcess) -> None:
    script = "select * from no_such_table;\nselect 'still here';\n"
    code, out, err = psql(gateway, "-f", "-", stdin=script)
    assert 'relation "no_such_table" does not exist' in err
    assert "still here" in out
    assert code == 0  # without ON_ERROR_STOP psql goes on and exits 0


def test_error_exit_code_with_on_error_stop(gateway: GatewayProcess) -> None:
    code, _, err = psql(gateway, "-v", "ON_ERROR_STOP=1", "-c", "select 1/0")
    assert code != 0
    assert "division by zero" in err


def test_error_inside_transaction_then_rollback(gateway: GatewayProcess) -> None:
    script = """
    begin;
    select 1/0;
    select 'ignored';
    rollback;
    select 'recovered';
    """
    code, out, err = psql(gateway, "-f", "-", stdin=script)
    assert code == 0
    assert "current transaction is aborted" in err
    assert out.strip().splitlines()[-1] == "recovered"


def test_notice_from_raise_notice(gateway: GatewayProcess) -> None:
    code, _, err = psql(
        gateway, "-c", "do $$ begin raise notice 'hello from plpgsql %', 42; end $$"
    )
    assert code == 0, err
    assert "NOTICE:  hello from plpgsql 42" in err


def test_copy_in_and_out(gateway: GatewayProcess, tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    rows = [f'{i},"name {i}, with comma",{i * 1.5}' for i in range(1, 5001)]
    source.write_text("\n".join(rows) + "\n")
    target = tmp_path / "out.csv"
    script = f"""
    create temp table items (id int, name text, price numeric);
    \\copy items from '{source}' with (format csv)
    select count(*), sum(id) from items;
    \\copy (select * from items order by id) to '{target}' with (format csv)
    """
    code, out, err = psql(gateway, "-v", "ON_ERROR_STOP=1", "-f", "-", stdin=script)
    assert code == 0, err
    assert "5000|12502500" in out
    assert target.read_text().splitlines() == source.read_text().splitlines()


def test_copy_from_stdin_error_is_reported(gateway: GatewayProcess, tmp_path: Path) -> None:
    source = tmp_path / "bad.csv"
    source.write_text("1,ok\nnot-a-number,bad\n")
    script = f"""
    create temp table items (id int, name text);
    \\copy items from '{source}' with (format csv)
    select 'count=' || count(*) from items;
    """
    _code, out, err = psql(gateway, "-f", "-", stdin=script)
    assert 'invalid input syntax for type integer: "not-a-number"' in err
    assert "count=0" in out


def test_connection_info_shows_gateway(gateway: GatewayProcess) -> None:
    code, out, err = psql(gateway, "-c", "\\conninfo")
    assert code == 0, err
    assert f'port "{gateway.port}"' in out


def test_non_utf8_client_encoding_is_refused_with_a_hint(gateway: GatewayProcess) -> None:
    # The gateway reads statement text as UTF-8; another encoding must be refused clearly
    # at startup rather than failing later on the first non-ASCII statement.
    env = {**gateway.env(), "PGCLIENTENCODING": "LATIN1"}
    result = run_tool(["psql", "--no-psqlrc", "-c", "select 'café'"], env)
    assert result.returncode != 0
    assert 'client_encoding "LATIN1" is not supported' in result.stderr
    assert "PGCLIENTENCODING=UTF8" in result.stderr


def test_utf8_text_round_trips(gateway: GatewayProcess) -> None:
    env = {**gateway.env(), "PGCLIENTENCODING": "UTF8"}
    result = run_tool(
        ["psql", "--no-psqlrc", "--tuples-only", "--no-align", "-c", "select 'café ✓'"], env
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "café ✓"
