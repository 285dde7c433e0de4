"""Group commit (batching.py, ledger.place_orders): many requests' work in one statement keeps
every rule of the one-by-one path: one serial history per wallet, no overdraft, an intact chain,
Idempotency-Keys claimed with the money, and a failed batch retried order by order.

The calls are made with asyncio.gather on one event loop, so all of them reach the batcher in
the same pass: they form one batch (up to its limit), which the ledger entries show (every entry
of one statement on one wallet carries the same time)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from prometheus_client import REGISTRY

from tests.builders import Provider, ledger_key, lock_deadline_behind_pooler, rows_held, settings_env
from wallet import idempotency, ledger, reads
from wallet.database import create_engine, gave_up, is_unavailable, plain_url
from wallet.errors import Conflict, InsufficientFunds, NotFound, ServiceUnavailable
from wallet.fulfillment import Provider as FulfillmentProvider
from wallet.fulfillment import new_http_client
from wallet.orders import Orders, Placed, new_order_id, order_json
from wallet.reads import OrderRow
from wallet.settings import Settings
from wallet.verify import verify_ledger
from wallet.wallets import Wallets


@contextlib.asynccontextmanager
async def service(
    database_url: str,
    provider: Provider,
    *,
    pool_size: int = 10,
    pool_timeout: float = 10,
    lock_timeout: float | None = None,
) -> AsyncIterator[tuple[Orders, Wallets]]:
    settings = Settings(**settings_env(database_url, provider.url))
    engine = create_engine(
        database_url,
        pool_size=pool_size,
        pool_timeout=pool_timeout,
        pooler=settings.db_pooler,
        lock_timeout=lock_timeout,
    )
    try:
        async with new_http_client(settings) as http:
            wallets = Wallets(engine, key=ledger_key(), idempotency_ttl_hours=settings.idempotency_ttl_hours)
            yield Orders(engine, FulfillmentProvider(settings, http), settings), wallets
    finally:
        await engine.dispose()


async def credit(orders: Orders, client_id: str, cents: int) -> None:
    async with orders.engine.begin() as conn:
        await ledger.credit(conn, client_id, cents, key=ledger_key())


async def pay(
    orders: Orders, client_id: str, cents: int, idem: idempotency.IdempotencyKey | None = None
) -> Any:
    try:
        return await orders._pay(ledger.OrderPayment(client_id, new_order_id(), cents, None, idem))
    except (InsufficientFunds, NotFound, Conflict) as exc:
        return exc


async def entries(database_url: str, client_id: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(plain_url(database_url))
    try:
        rows: list[asyncpg.Record] = await conn.fetch(
            "SELECT entry_no, type, amount, balance_before, balance_after, created_at FROM ledger_entries"
            " WHERE client_id = $1 ORDER BY entry_no",
            client_id,
        )
        return rows
    finally:
        await conn.close()


async def fetch(database_url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(plain_url(database_url))
    try:
        rows: list[asyncpg.Record] = await conn.fetch(query, *args)
        return rows
    finally:
        await conn.close()


def assert_serial(rows: list[asyncpg.Record]) -> None:
    """Entry numbers 1..n, each entry starting from the balance the previous one left."""
    assert [r["entry_no"] for r in rows] == list(range(1, len(rows) + 1))
    for previous, entry in itertools.pairwise(rows):
        assert entry["balance_before"] == previous["balance_after"], entry
    for entry in rows:
        sign = 1 if entry["type"] in ("CREDIT", "ORDER_REFUND") else -1
        assert entry["balance_after"] == entry["balance_before"] + sign * entry["amount"]
        assert entry["balance_after"] >= 0


async def assert_verifies(orders: Orders) -> None:
    verdict = await verify_ledger(orders.engine, ledger_key())
    assert verdict.faults == []


def batch_sizes(kind: str) -> tuple[float, float]:
    """How many batches of this kind ran, and how many calls they served."""
    count = REGISTRY.get_sample_value("wallet_batch_size_count", {"kind": kind}) or 0.0
    return count, REGISTRY.get_sample_value("wallet_batch_size_sum", {"kind": kind}) or 0.0


def fallbacks() -> float:
    return REGISTRY.get_sample_value("wallet_batch_fallbacks_total", {"kind": "placement"}) or 0.0


async def test_one_batch_on_one_wallet_takes_what_there_is_and_refuses_the_rest(
    database_url: str, provider: Provider
) -> None:
    async with service(database_url, provider) as (orders, _):
        await credit(orders, "hot", 1000)
        await fetch(database_url, "UPDATE clients SET low_balance_threshold = 500 WHERE client_id = 'hot'")
        await fetch(  # a webhook endpoint of the client's, for its orders' creation only
            database_url,
            "INSERT INTO webhook_endpoints (endpoint_id, client_id, url, event_types, secret) VALUES"
            " ('we_' || repeat('0', 24), 'hot', 'https://example.com/hook', '{order.created}', '\\x00')",
        )
        before, sizes = fallbacks(), batch_sizes("placement")
        results = await asyncio.gather(*(pay(orders, "hot", 30) for _ in range(64)))
        placed = [r for r in results if isinstance(r, OrderRow)]
        refused = [r for r in results if isinstance(r, InsufficientFunds)]
        assert (len(placed), len(refused)) == (33, 31)
        assert results[:33] == placed  # arrival order: the first 33 fit
        assert {(str(r), r.details["balance"], r.details["requested"]) for r in refused} == {
            ("Insufficient wallet balance for order", 0.1, 0.3)
        }
        assert fallbacks() == before
        assert batch_sizes("placement") == (sizes[0] + 1, sizes[1] + 64)  # one batch of all 64
        rows = await entries(database_url, "hot")
        assert_serial(rows)
        assert len(rows) == 34
        assert len({r["created_at"] for r in rows[1:]}) == 1  # one statement
        assert [r["amount"] for r in rows[1:]] == [30] * 33
        assert {o.status for o in placed} == {"PENDING"}
        assert all(o.next_attempt_at is not None and o.next_attempt_at > o.created_at for o in placed)
        await assert_verifies(orders)
        events = await fetch(database_url, "SELECT id, event_id, type, data FROM events ORDER BY id")
        assert Counter(e["type"] for e in events) == {
            "wallet.credited": 1,
            "order.created": 33,
            "balance.low": 1,
        }
        # Every event an endpoint wants, the batch's too, is queued for the fan-out exactly once;
        # the others (no endpoint subscribes to them) are not queued at all.
        queued = await fetch(database_url, "SELECT event_no FROM event_queue ORDER BY event_no")
        assert [q["event_no"] for q in queued] == [e["id"] for e in events if e["type"] == "order.created"]
        # Event ids start with their time: later events never sort before earlier ones.
        stamps = [e["event_id"][4:16] for e in events]
        assert stamps == sorted(stamps)
        created = [json.loads(e["data"]) for e in events if e["type"] == "order.created"]
        assert [c["orderId"] for c in created] == [o.order_id for o in placed]
        assert created[0] == {**order_json(placed[0], updated=True)}
        low = [json.loads(e["data"]) for e in events if e["type"] == "balance.low"]
        assert low == [{"clientId": "hot", "balance": 4.9, "threshold": 5}]  # 5.20 -> 4.90


async def test_batches_racing_debits_and_credits_form_one_serial_history(
    database_url: str, provider: Provider
) -> None:
    async with service(database_url, provider) as (orders, _):
        await credit(orders, "hot", 500)
        credits = [random.randint(1, 300) for _ in range(40)]
        debits = [random.randint(1, 300) for _ in range(40)]
        amounts = [random.randint(1, 200) for _ in range(200)]

        async def debit(cents: int) -> int:
            try:
                async with orders.engine.begin() as conn:
                    await ledger.debit(conn, "hot", cents, key=ledger_key())
            except InsufficientFunds:
                return 0
            return cents

        jobs: list[Any] = [pay(orders, "hot", cents) for cents in amounts]
        jobs += [credit(orders, "hot", cents) for cents in credits]
        jobs += [debit(cents) for cents in debits]
        random.shuffle(jobs)
        results = await asyncio.gather(*jobs)
        placed = [r for r in results if isinstance(r, OrderRow)]
        refused = [r for r in results if isinstance(r, InsufficientFunds)]
        debited = sum(r for r in results if isinstance(r, int))
        assert len(placed) + len(refused) == len(amounts)
        assert placed
        assert refused
        rows = await entries(database_url, "hot")
        assert_serial(rows)
        assert Counter(r["type"] for r in rows)["ORDER_DEDUCTION"] == len(placed)
        final = 500 + sum(credits) - debited - sum(o.amount for o in placed)
        assert rows[-1]["balance_after"] == final
        stored = await fetch(database_url, "SELECT order_id, amount FROM orders")
        assert sorted((r["order_id"], r["amount"]) for r in stored) == sorted(
            (o.order_id, o.amount) for o in placed
        )
        await assert_verifies(orders)


async def test_many_wallets_in_one_batch_with_idempotency_keys(database_url: str, provider: Provider) -> None:
    wallets = [f"w{n:02d}" for n in range(20)]
    async with service(database_url, provider) as (orders, _):
        await asyncio.gather(*(credit(orders, w, 100) for w in wallets))

        def key(name: str) -> idempotency.IdempotencyKey:
            return idempotency.IdempotencyKey(idempotency.client_scope(name[:3]), name, b"f" * 32)

        # Each wallet's three orders of 0.40 (the third refused), interleaved, each with its own
        # key; the same key twice for w00; and a client with no wallet.
        calls = [(w, f"{w}-{n}") for n in range(3) for w in wallets]
        calls += [("w00", "w00-0"), ("nobody", "nob-0")]
        results = await asyncio.gather(*(pay(orders, w, 40, key(k)) for w, k in calls))
        outcome = [type(r).__name__ for r in results]
        assert outcome == ["OrderRow"] * 40 + ["InsufficientFunds"] * 20 + ["Conflict", "ClientNotFound"]
        for w in wallets:
            rows = await entries(database_url, w)
            assert_serial(rows)
            assert [r["balance_after"] for r in rows] == [100, 60, 20]
        claims = await fetch(database_url, "SELECT key, order_id FROM idempotency_keys ORDER BY key")
        attached = {r["key"]: r["order_id"] for r in claims}
        placed = {k: r.order_id for (_, k), r in zip(calls, results, strict=True) if isinstance(r, OrderRow)}
        assert attached == placed  # the refused orders' claims went with their refusal
        await assert_verifies(orders)
        # A refused key is free again: the same request now places its order, alone.
        await credit(orders, "w05", 40)
        again = await pay(orders, "w05", 40, key("w05-2"))
        assert isinstance(again, OrderRow)


@pytest.fixture
async def one_order_per_statement(database_url: str) -> None:
    """A trigger that fails every statement inserting more than one order: every batch of two
    or more fails in the database, while the one-by-one path passes."""
    conn = await asyncpg.connect(plain_url(database_url))
    try:
        await conn.execute("""
            CREATE FUNCTION one_order_per_statement() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF (SELECT count(*) FROM inserted) > 1 THEN
                    RAISE EXCEPTION 'test: % orders in one statement', (SELECT count(*) FROM inserted);
                END IF;
                RETURN NULL;
            END $$;
            CREATE TRIGGER one_order_per_statement AFTER INSERT ON orders
                REFERENCING NEW TABLE AS inserted
                FOR EACH STATEMENT EXECUTE FUNCTION one_order_per_statement();
        """)
    finally:
        await conn.close()


@pytest.mark.usefixtures("one_order_per_statement")
async def test_a_failing_batch_places_its_orders_one_by_one(database_url: str, provider: Provider) -> None:
    async with service(database_url, provider) as (orders, _):
        await credit(orders, "hot", 1000)
        before = fallbacks()
        keys = [
            idempotency.IdempotencyKey(idempotency.client_scope("hot"), f"k{n}", b"f" * 32) if n % 2 else None
            for n in range(60)
        ]
        results = await asyncio.gather(*(pay(orders, "hot", 20, k) for k in keys))
        placed = [r for r in results if isinstance(r, OrderRow)]
        refused = [r for r in results if isinstance(r, InsufficientFunds)]
        assert (len(placed), len(refused)) == (50, 10)
        assert fallbacks() == before + 1
        rows = await entries(database_url, "hot")
        assert_serial(rows)
        stored = await fetch(database_url, "SELECT order_id FROM orders")
        assert sorted(r["order_id"] for r in stored) == sorted(o.order_id for o in placed)
        claims = await fetch(database_url, "SELECT key, order_id FROM idempotency_keys")
        keyed = {k.key: r for k, r in zip(keys, results, strict=True) if k is not None}
        expected = {name: r.order_id for name, r in keyed.items() if isinstance(r, OrderRow)}
        assert {r["key"]: r["order_id"] for r in claims} == expected
        await assert_verifies(orders)


async def test_completions_in_one_batch_have_one_winner_each(database_url: str, provider: Provider) -> None:
    async with service(database_url, provider) as (orders, _):
        await credit(orders, "hot", 1000)
        placed = await asyncio.gather(*(pay(orders, "hot", 10) for _ in range(30)))
        # Every order completed twice in the same pass (a request and a resolver, say).
        twice = [o for o in placed for _ in range(2)]
        finished = REGISTRY.get_sample_value("wallet_orders_total", {"status": "COMPLETED"}) or 0.0
        replies = await asyncio.gather(*(orders._complete(o, f"F-{o.order_id}", 1) for o in twice))
        assert {r.status for r in replies} == {"COMPLETED"}
        # One winner per order: the other learns the outcome by reading the order.
        assert REGISTRY.get_sample_value("wallet_orders_total", {"status": "COMPLETED"}) == finished + 30
        rows = await fetch(database_url, "SELECT status, fulfillment_id, order_id FROM orders")
        assert {(r["status"], r["fulfillment_id"]) for r in rows} == {
            ("COMPLETED", f"F-{r['order_id']}") for r in rows
        }
        completed = await fetch(database_url, "SELECT count(*) FROM events WHERE type = 'order.completed'")
        assert completed[0]["count"] == 30


async def test_balance_reads_of_one_pass_share_one_query(database_url: str, provider: Provider) -> None:
    async with service(database_url, provider) as (orders, wallets):
        await credit(orders, "a", 500)
        await credit(orders, "b", 700)
        assert isinstance(await pay(orders, "a", 120), OrderRow)
        asked = ["a", "b", "nobody", "a"]
        sizes = batch_sizes("balance")
        read = await asyncio.gather(*(wallets.balance(c) for c in asked), return_exceptions=True)
        assert batch_sizes("balance") == (sizes[0] + 1, sizes[1] + 4)
        assert [(r.client_id, r.balance, r.held) for r in read if isinstance(r, reads.Balance)] == [
            ("a", 380, 120),
            ("b", 700, 0),
            ("a", 380, 120),
        ]
        assert isinstance(read[2], NotFound)


async def test_a_connection_the_database_dropped_is_not_handed_out_again(
    database_url: str, direct_database_url: str, provider: Provider
) -> None:
    """The batched statements run on asyncpg beneath the pool, out of SQLAlchemy's sight: a
    connection that fails as gone must still leave the pool, or every batch handed it fails."""
    async with service(database_url, provider) as (orders, wallets):
        await credit(orders, "a", 500)
        await asyncio.gather(*(wallets.balance("a") for _ in range(3)), pay(orders, "a", 1))
        killed = await fetch(
            direct_database_url,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        assert killed
        outcomes: list[object] = []
        while len(outcomes) <= len(killed) and not (outcomes and isinstance(outcomes[-1], reads.Balance)):
            try:
                outcomes.append(await wallets.balance("a"))
            except Exception as exc:
                outcomes.append(exc)
        *failed, last = outcomes
        assert isinstance(last, reads.Balance), outcomes  # each dead connection failed once at most
        assert all(isinstance(exc, Exception) and is_unavailable(exc) for exc in failed), failed
        for _ in range(12):  # more reads than the pool has connections: none fails again
            assert (await wallets.balance("a")).balance == 499


async def test_orders_that_get_no_connection_say_no_money_moved(
    database_url: str, direct_database_url: str, provider: Provider
) -> None:
    """Every pooled connection busy past the pool's timeout: no statement was sent, so the answer
    says at once that no money moved, rather than that the order's fate is unknown."""
    async with service(database_url, provider, pool_size=1, pool_timeout=0.2) as (orders, _):
        await credit(orders, "a", 500)
        async with orders.engine.connect():  # the pool's one connection, held
            answers = await asyncio.gather(
                orders.place("a", 10, None, None),
                orders.place(
                    "a",
                    10,
                    idempotency.IdempotencyKey(idempotency.client_scope("a"), "k1", b"fingerprint"),
                    None,
                ),
                return_exceptions=True,
            )
        for answer in answers:
            assert isinstance(answer, ServiceUnavailable), answer
            assert (answer.error_code, answer.message) == (
                "SERVICE_UNAVAILABLE",
                "Service temporarily unavailable; no money moved",
            )
    assert await fetch(direct_database_url, "SELECT order_id FROM orders") == []
    assert await fetch(direct_database_url, "SELECT balance FROM wallets") == [(500,)]


async def test_a_wallet_held_elsewhere_fails_only_its_own_orders_once_the_lock_deadline_passes(
    database_url: str, direct_database_url: str, provider: Provider
) -> None:
    """Another session holds one wallet's row (an operator's open transaction, say). Once the
    lock deadline passes, that wallet's orders are answered that no money moved, and the other
    wallet's orders of the same batch are placed and completed: the batch, rolled back by the
    server, is retried order by order. With no deadline every order of the batch would wait for
    the row as long as it is held."""
    await lock_deadline_behind_pooler(direct_database_url, 0.2)
    async with service(database_url, provider, lock_timeout=0.2) as (orders, _):
        await credit(orders, "held", 500)
        await credit(orders, "free", 500)
        before = fallbacks()
        async with rows_held(direct_database_url, "wallets", "client_id = 'held'"):
            async with asyncio.timeout(30):  # bounds the hang this test is about
                answers = await asyncio.gather(
                    *(orders.place(c, 10, None, None) for c in ["held", "free"] * 3), return_exceptions=True
                )
        assert fallbacks() == before + 1
        for answer in answers[0::2]:
            assert isinstance(answer, ServiceUnavailable), answer
            assert answer.message == "Service temporarily unavailable; no money moved"
        assert {a.order.status if isinstance(a, Placed) else a for a in answers[1::2]} == {"COMPLETED"}
    held = await fetch(direct_database_url, "SELECT count(*) FROM orders WHERE client_id = 'held'")
    assert held == [(0,)]
    balances = await fetch(direct_database_url, "SELECT client_id, balance FROM wallets ORDER BY 1")
    assert balances == [("free", 470), ("held", 500)]
    assert_serial(await entries(direct_database_url, "held"))


async def test_only_a_lock_not_granted_proves_that_nothing_ran(direct_database_url: str) -> None:
    """A lock wait the server gave up on is raised before anything commits, so it may be answered
    as "no money moved". A cancelled statement is unavailability too, but a cancel may land just
    after a commit, so it must be treated as possibly run (fenced, then looked up)."""
    conn = await asyncpg.connect(plain_url(direct_database_url))
    try:
        await conn.execute("CREATE TABLE probe AS SELECT 1 AS id")
        async with rows_held(direct_database_url, "probe", "true"):
            with pytest.raises(asyncpg.PostgresError) as lock:
                await conn.execute("SET lock_timeout = '50ms'; UPDATE probe SET id = 2")
        with pytest.raises(asyncpg.PostgresError) as cancelled:
            await conn.execute("SET statement_timeout = '50ms'; SELECT pg_sleep(5)")
    finally:
        await conn.close()
    assert (gave_up(lock.value), is_unavailable(lock.value)) == (True, True)
    assert (gave_up(cancelled.value), is_unavailable(cancelled.value)) == (False, True)
