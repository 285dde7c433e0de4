"""The schema keeps every client's rows together (docs/scaling.md): Citus's rules for distributed
tables, checked against the migrated catalogue so that a later migration cannot quietly break them."""

from __future__ import annotations

import asyncpg

from wallet.database import plain_url

CLIENT_TABLES = ("clients", "wallets", "ledger_entries", "orders", "idempotency_keys", "api_keys")
# The distribution column of each table: client_id, except idempotency_keys' `tenant` (the client's
# id, or `admin:<key>` for an admin record, whose scope is (admin, key) across clients).
TENANT = {"idempotency_keys": "tenant"}

_KEYS = """
SELECT c.conrelid::regclass::text AS tbl, c.contype::text, pg_get_constraintdef(c.oid) AS def,
       array(SELECT attname FROM pg_attribute
             WHERE attrelid = c.conrelid AND attnum = ANY (c.conkey)) AS cols,
       c.confrelid::regclass::text AS ref,
       array(SELECT attname FROM pg_attribute
             WHERE attrelid = c.confrelid AND attnum = ANY (c.confkey)) AS ref_cols
FROM pg_constraint c
WHERE c.contype IN ('p', 'u', 'f') AND c.conrelid::regclass::text = ANY ($1::text[])
"""


async def test_every_key_between_client_tables_includes_the_client(database_url: str) -> None:
    conn = await asyncpg.connect(plain_url(database_url))
    try:
        rows = await conn.fetch(_KEYS, list(CLIENT_TABLES))
    finally:
        await conn.close()
    broken = []
    for row in rows:
        own, referenced = TENANT.get(row["tbl"], "client_id"), TENANT.get(row["ref"], "client_id")
        referenced_without_client = row["ref"] in CLIENT_TABLES and referenced not in row["ref_cols"]
        if own not in row["cols"] or (row["contype"] == "f" and referenced_without_client):
            broken.append(f"{row['tbl']}: {row['def']}")
    assert broken == []
    assert {r["tbl"] for r in rows if r["contype"] == "p"} == set(CLIENT_TABLES)


async def test_every_distribution_column_is_a_plain_not_null_column(database_url: str) -> None:
    """Citus refuses a generated distribution column and a NULL distribution value."""
    conn = await asyncpg.connect(plain_url(database_url))
    try:
        columns = await conn.fetch(
            "SELECT table_name, column_name, is_nullable, is_generated FROM information_schema.columns"
            " WHERE table_schema = 'public' AND table_name = ANY ($1::text[])",
            list(CLIENT_TABLES),
        )
    finally:
        await conn.close()
    found = {
        (c["table_name"], c["is_nullable"], c["is_generated"])
        for c in columns
        if c["column_name"] == TENANT.get(c["table_name"], "client_id")
    }
    assert found == {(table, "NO", "NEVER") for table in CLIENT_TABLES}
