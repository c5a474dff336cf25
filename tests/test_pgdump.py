"""pg_dump and pg_restore through the gateway, with many kinds of database objects."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from harness import SCRAM_PASSWORD, SCRAM_ROLE, GatewayProcess, create_database, run_tool
from pgwarden.pgcluster import TemporaryCluster

SOURCE_DB = "dump_source"
TARGET_DB = "dump_target"

SCHEMA = """
create schema inventory;
comment on schema inventory is 'Things we keep';
create type inventory.status as enum ('new', 'used', 'broken');
create domain inventory.positive_int as integer check (value > 0);
create sequence inventory.ticket_seq start 1000 increment 5;
create table inventory.supplier (
    id serial primary key,
    name text not null unique,
    country char(2) not null default 'NL'
);
create table inventory.item (
    id bigint generated always as identity primary key,
    supplier_id int not null references inventory.supplier (id) on delete cascade,
    sku text not null,
    quantity inventory.positive_int not null,
    state inventory.status not null default 'new',
    attributes jsonb,
    tags text[],
    updated_at timestamptz,
    constraint sku_format check (sku ~ '^[A-Z]{3}-[0-9]+$'),
    unique (supplier_id, sku)
);
comment on table inventory.item is 'One stocked item';
comment on column inventory.item.sku is 'Stock keeping unit';
create index item_attributes_gin on inventory.item using gin (attributes);
create index item_partial on inventory.item (updated_at) where state = 'broken';
create function inventory.touch() returns trigger language plpgsql as $$
begin
    new.updated_at := '2024-01-01 00:00:00+00';
    return new;
end $$;
create trigger item_touch before insert or update on inventory.item
    for each row execute function inventory.touch();
create function inventory.total_quantity(p_supplier int) returns bigint
    language sql stable
    as $$ select sum(quantity) from inventory.item where supplier_id = p_supplier $$;
create view inventory.item_summary as
    select s.name, count(i.id) as items, sum(i.quantity) as quantity
    from inventory.supplier s left join inventory.item i on i.supplier_id = s.id group by s.name;
create materialized view inventory.broken_items as
    select id, sku from inventory.item where state = 'broken' with no data;

insert into inventory.supplier (name, country)
    select 'supplier ' || g, (array['NL', 'DE', 'FR'])[1 + g % 3] from generate_series(1, 50) g;
insert into inventory.item (supplier_id, sku, quantity, state, attributes, tags)
    select 1 + g % 50, 'SKU-' || g, 1 + g % 17,
           (array['new', 'used', 'broken'])[1 + g % 3]::inventory.status,
           jsonb_build_object('weight', g % 100, 'fragile', g % 2 = 0),
           array['tag' || (g % 5), 'tag' || (g % 7)]
    from generate_series(1, 3000) g;
refresh materialized view inventory.broken_items;
select setval('inventory.ticket_seq', 4242);
create table public.plain_log (line text);
insert into public.plain_log select 'log line ' || g from generate_series(1, 500) g;
select lo_from_bytea(424242, convert_to('large object payload', 'UTF8'));
comment on large object 424242 is 'a large object';
"""

TABLES = ["inventory.supplier", "inventory.item", "inventory.broken_items", "public.plain_log"]


@pytest.fixture(scope="module")
def source_db(cluster: TemporaryCluster) -> Iterator[str]:
    create_database(cluster, SOURCE_DB)
    with psycopg.connect(cluster.dsn(SOURCE_DB, SCRAM_ROLE, SCRAM_PASSWORD)) as conn:
        conn.execute(SCHEMA)
    yield SOURCE_DB
    cluster.psql(f"drop database if exists {SOURCE_DB} with (force)")
    cluster.psql(f"drop database if exists {TARGET_DB} with (force)")


def schema_dump(cluster: TemporaryCluster, database: str) -> str:
    result = run_tool(["pg_dump", "--schema-only", database], cluster.env(database))
    assert result.returncode == 0, result.stderr
    return without_restrict_keys(result.stdout)


def without_restrict_keys(dump: str) -> str:
    """Drop psql's \\restrict / \\unrestrict lines: their key is random in each dump."""
    return "".join(
        line
        for line in dump.splitlines(keepends=True)
        if not line.startswith(("\\restrict ", "\\unrestrict "))
    )


def row_counts(cluster: TemporaryCluster, database: str) -> str:
    sql = " union all ".join(f"select '{t}', count(*) from {t}" for t in TABLES)
    return cluster.psql(sql + " order by 1", dbname=database)


@pytest.mark.slow
def test_dump_and_restore_through_gateway(
    cluster: TemporaryCluster, gateway: GatewayProcess, source_db: str, tmp_path: Path
) -> None:
    archive = tmp_path / "dump.custom"
    env = gateway.env()
    dump = run_tool(["pg_dump", "-Fc", "-f", str(archive), source_db], env)
    assert dump.returncode == 0, dump.stderr
    assert archive.stat().st_size > 10_000

    listing = run_tool(["pg_restore", "--list", str(archive)], env)
    for kind in (
        "SCHEMA",
        "TYPE",
        "DOMAIN",
        "SEQUENCE",
        "TABLE",
        "INDEX",
        "VIEW",
        "MATERIALIZED VIEW",
        "FUNCTION",
        "TRIGGER",
        "COMMENT",
        "BLOB",
        "CONSTRAINT",
        "FK CONSTRAINT",
        "MATERIALIZED VIEW DATA",
    ):
        assert f" {kind} " in listing.stdout, f"{kind} missing from the archive"

    create_database(cluster, TARGET_DB)
    restore = run_tool(
        ["pg_restore", "--exit-on-error", "--dbname", TARGET_DB, str(archive)], env, timeout=180
    )
    assert restore.returncode == 0, restore.stderr

    assert schema_dump(cluster, TARGET_DB) == schema_dump(cluster, SOURCE_DB)
    assert row_counts(cluster, TARGET_DB) == row_counts(cluster, SOURCE_DB)
    restored = cluster.psql(
        "select convert_from(lo_get(424242), 'UTF8'), last_value from inventory.ticket_seq",
        dbname=TARGET_DB,
    )
    assert restored.strip() == "large object payload|4242"


def test_plain_dump_through_gateway_matches_direct_dump(
    cluster: TemporaryCluster, gateway: GatewayProcess, source_db: str
) -> None:
    via_gateway = run_tool(["pg_dump", "--schema-only", source_db], gateway.env())
    assert via_gateway.returncode == 0, via_gateway.stderr
    assert without_restrict_keys(via_gateway.stdout) == schema_dump(cluster, source_db)
