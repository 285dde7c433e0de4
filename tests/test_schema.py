"""The schema keeps every client's rows together (docs/scaling.md): Citus's rules for distributed
tables, checked against the migrated catalogue so that a later migration cannot quietly break them."""

from __future__ import annotations

import asyncpg

from wallet.database import plain_url

CLIENT_TABLES = ("clients", "wallets", "ledger_entries", "orders", "idempotency_keys", "api_keys")
# The admin's idempotency scope is (admin, key), not per client: the open point in docs/scaling.md.
KNOWN_EXCEPTIONS = {("idempotency_keys", "PRIMARY KEY (caller, key)")}

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
        if (row["tbl"], row["def"]) in KNOWN_EXCEPTIONS:
            continue
        referenced_without_client = row["ref"] in CLIENT_TABLES and "client_id" not in row["ref_cols"]
        if "client_id" not in row["cols"] or (row["contype"] == "f" and referenced_without_client):
            broken.append(f"{row['tbl']}: {row['def']}")
    assert broken == []
    assert {r["tbl"] for r in rows if r["contype"] == "p"} == set(CLIENT_TABLES)
