"""The ledger's rules hold in the database itself, not only in code (SPEC §2)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from tests.builders import Provider, chain_hashes, start_service
from wallet import chain
from wallet.database import create_engine, migrate, plain_url


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(plain_url(database_url))
    yield conn
    await conn.close()


async def make_history(database_url: str, provider: Provider) -> None:
    provider.set(error_status=400, fail_first=1)
    async with start_service(database_url, provider.url) as api:
        await api.credit("C1", 100)
        assert (await api.order("C1", 30)).status_code == 502  # deduction + refund
        assert (await api.order("C1", 20)).status_code == 201
        await api.debit("C1", 5.5)


async def test_ledger_refuses_update_delete_truncate(
    database_url: str, provider: Provider, db: asyncpg.Connection
) -> None:
    await make_history(database_url, provider)
    for statement in [
        "UPDATE ledger_entries SET amount = 1",
        "UPDATE ledger_entries SET description = 'edited' WHERE entry_no = 1",
        "DELETE FROM ledger_entries WHERE entry_no = 2",
        "TRUNCATE ledger_entries CASCADE",
    ]:
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            await db.execute(statement)
    assert await db.fetchval("SELECT count(*) FROM ledger_entries") == 5


async def test_database_checks_refuse_impossible_money(
    database_url: str, provider: Provider, db: asyncpg.Connection
) -> None:
    await make_history(database_url, provider)
    refused = [
        "UPDATE wallets SET balance = -1 WHERE client_id = 'C1'",
        "UPDATE wallets SET balance = 1000000000000000 WHERE client_id = 'C1'",
        # An entry whose after is not before +/- amount for its type.
        """INSERT INTO ledger_entries (client_id, entry_no, type, amount, balance_before,
               balance_after, created_at, hash)
           VALUES ('C1', 99, 'CREDIT', 100, 0, 50, now(), decode(repeat('00', 32), 'hex'))""",
        """INSERT INTO ledger_entries (client_id, entry_no, type, amount, balance_before,
               balance_after, created_at, hash)
           VALUES ('C1', 99, 'DEBIT', 0, 0, 0, now(), decode(repeat('00', 32), 'hex'))""",
        "UPDATE orders SET status = 'COMPLETED' WHERE fulfillment_id IS NULL",
        # A well-formed entry, but without the key id every entry has carried since 0003.
        """INSERT INTO ledger_entries (client_id, entry_no, type, amount, balance_before,
               balance_after, created_at, hash)
           VALUES ('C1', 99, 'CREDIT', 100, 0, 100, now(), decode(repeat('00', 32), 'hex'))""",
    ]
    for statement in refused:
        with pytest.raises(asyncpg.CheckViolationError):
            await db.execute(statement)


async def test_entries_chain_sum_and_hash(
    database_url: str, provider: Provider, db: asyncpg.Connection
) -> None:
    await make_history(database_url, provider)
    rows = await db.fetch("SELECT * FROM ledger_entries WHERE client_id = 'C1' ORDER BY entry_no")
    assert [r["type"] for r in rows] == [
        "CREDIT",
        "ORDER_DEDUCTION",
        "ORDER_REFUND",
        "ORDER_DEDUCTION",
        "DEBIT",
    ]
    wallet = await db.fetchrow("SELECT * FROM wallets WHERE client_id = 'C1'")
    hashes = chain_hashes(rows)
    previous_after, signed_sum = 0, 0
    for n, (row, hash_) in enumerate(zip(rows, hashes, strict=True), start=1):
        assert row["entry_no"] == n
        assert row["balance_before"] == previous_after
        sign = 1 if row["type"] in ("CREDIT", "ORDER_REFUND") else -1
        signed_sum += sign * row["amount"]
        assert row["key_id"] == "k1"
        assert bytes(row["hash"]) == hash_
        previous_after = row["balance_after"]
    assert wallet["balance"] == signed_sum == previous_after == 10000 - 2000 - 550
    assert bytes(wallet["head_hash"]) == hashes[-1]
    assert wallet["entry_count"] == len(rows)


async def test_concurrent_migrations_apply_once(postgres_url: str) -> None:
    name = f"wallet_migrate_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(plain_url(postgres_url))
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = make_url(plain_url(postgres_url)).set(database=name).render_as_string(hide_password=False)
    engines = [create_engine(url, pool_size=1) for _ in range(3)]
    try:
        await asyncio.gather(*(migrate(engine) for engine in engines))
        conn = await asyncpg.connect(url)
        try:
            assert await conn.fetchval("SELECT count(*) FROM alembic_version") == 1
            tables = await conn.fetchval(
                "SELECT count(*) FROM pg_tables WHERE schemaname = 'public' AND tablename = 'ledger_entries'"
            )
            assert tables == 1
        finally:
            await conn.close()
    finally:
        for engine in engines:
            await engine.dispose()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.mark.parametrize("secret", [b"short", b"k" * 64, bytes(range(100))], ids=["short", "block", "long"])
async def test_sql_hmac_is_rfc_2104(db: asyncpg.Connection, secret: bytes) -> None:
    """The movement statements' HMAC (padded keys from LedgerKey, sha256 in SQL) is the standard
    one that verify recomputes with `hmac`, keys longer than a block included."""
    params = chain.LedgerKey("k", secret).sql_params()
    message = b"previous hash" + "|entry \u00e9".encode()
    in_sql = await db.fetchval(
        "SELECT sha256($1::bytea || sha256($2::bytea || $3::bytea))",
        params["opad_key"],
        params["ipad_key"],
        message,
    )
    assert bytes(in_sql) == chain.chain_hash(b"previous hash", "|entry \u00e9".encode(), secret)
