"""Orders against a provider that fails (SPEC §4): what each kind of answer does to the order,
the money and the response, end to end through the service."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import asyncpg
import httpx
import pytest

from tests.builders import (
    Api,
    Commits,
    Provider,
    dead_url,
    ledger_key,
    lock_deadline_behind_pooler,
    rows_held,
    scans_of,
    start_service,
)
from wallet import ledger, orders
from wallet.database import Statement, plain_url


async def ledger_types(database_url: str, client_id: str) -> list[tuple[str, int, int, int]]:
    conn = await asyncpg.connect(plain_url(database_url))
    try:
        rows = await conn.fetch(
            "SELECT type, amount, balance_before, balance_after FROM ledger_entries"
            " WHERE client_id = $1 ORDER BY entry_no",
            client_id,
        )
    finally:
        await conn.close()
    return [(r["type"], r["amount"], r["balance_before"], r["balance_after"]) for r in rows]


def assert_failed_order(body: dict[str, object], amount: float) -> str:
    assert body["success"] is False
    assert body["code"] == "FULFILLMENT_FAILED"
    data = body["data"]
    assert isinstance(data, dict)
    assert data["status"] == "FAILED"
    assert data["amount"] == amount
    assert data["fulfillmentId"] is None
    order_id = data["orderId"]
    assert isinstance(order_id, str)
    return order_id


def assert_accepted(response: httpx.Response, amount: float) -> str:
    """A 202: the order is named, PENDING, and where to look is said."""
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["success"] is True
    assert body["message"] == "Order accepted; fulfillment pending"
    assert body["data"]["status"] == "PENDING"
    assert body["data"]["amount"] == amount
    order_id: str = body["data"]["orderId"]
    assert response.headers["Location"] == f"/orders/{order_id}"
    return order_id


async def assert_held(api: Api, client_id: str, balance: float, held: float) -> None:
    wallet = await api.wallet(client_id)
    assert (wallet["balance"], wallet["held"]) == (balance, held)


# --- refused: final at once, money back --------------------------------------------------


async def test_provider_down_is_503_after_every_attempt_and_refunded(database_url: str) -> None:
    async with start_service(database_url, dead_url(), fulfillment_max_attempts=3) as api:
        await api.credit("C1", 100)
        response = await api.order("C1", 30)
        assert response.status_code == 503
        order_id = assert_failed_order(response.json(), 30)
        await assert_held(api, "C1", 100, 0)
        assert await api.order_status("C1", order_id) == "FAILED"
        assert await ledger_types(database_url, "C1") == [
            ("CREDIT", 10000, 0, 10000),
            ("ORDER_DEDUCTION", 3000, 10000, 7000),
            ("ORDER_REFUND", 3000, 7000, 10000),
        ]


@pytest.mark.parametrize("status", [400, 404, 422])
async def test_a_refusal_is_502_after_one_attempt_and_refunded(
    database_url: str, provider: Provider, status: int
) -> None:
    provider.set(error_status=status)
    async with start_service(database_url, provider.url, fulfillment_max_attempts=3) as api:
        await api.credit("C1", 100)
        response = await api.order("C1", 30)
        assert response.status_code == 502
        order_id = assert_failed_order(response.json(), 30)
        assert provider.simulator.attempts_for(order_id) == 1
        await assert_held(api, "C1", 100, 0)


async def test_a_refund_never_waits_for_its_keys_row(database_url: str, provider: Provider) -> None:
    """An order batch replaying a key holds the key's row while it waits for the wallet, so a
    refund that held the wallet and waited for that row would deadlock with it. The refund does
    not touch the key at all (a replay answers from the order): it is answered while another
    transaction holds the row, and the replay is the same answer."""
    gate = asyncio.Event()
    provider.set(error_status=400, gate=gate)
    async with start_service(database_url, provider.url, recovery_interval_seconds=3600) as api:
        await api.credit("C1", 100)
        order = asyncio.create_task(api.order("C1", 30, headers={"Idempotency-Key": "k1"}))
        await provider.simulator.wait_for_calls(1)  # paid for; the refusal waits at the gate
        blocker = await asyncpg.connect(plain_url(database_url))
        try:
            async with blocker.transaction():
                await blocker.execute("SELECT 1 FROM idempotency_keys WHERE key = 'k1' FOR UPDATE")
                gate.set()
                answer = await asyncio.wait_for(order, 30)  # while the key's row is still held
        finally:
            await blocker.close()
        assert answer.status_code == 502
        assert_failed_order(answer.json(), 30)
        await assert_held(api, "C1", 100, 0)
        again = await api.order("C1", 30, headers={"Idempotency-Key": "k1"})
        assert (again.status_code, again.content) == (502, answer.content)
        assert again.headers["Idempotent-Replayed"] == "true"


async def test_a_wallet_held_elsewhere_is_503_in_time_and_its_key_stays_free(
    database_url: str, direct_database_url: str, provider: Provider
) -> None:
    """Another session holds the wallet's row past the service's lock deadline: an order and an
    admin debit are answered 503 once it passes, not when the row is let go, and nothing moved;
    the order's Idempotency-Key was not spent, so the client's retry places the order."""
    await lock_deadline_behind_pooler(direct_database_url, 0.2)
    async with start_service(database_url, provider.url, db_lock_timeout_seconds=0.2) as api:
        await api.credit("C1", 100)
        key = {"Idempotency-Key": "k1"}
        async with rows_held(direct_database_url, "wallets", "client_id = 'C1'"):
            async with asyncio.timeout(30):  # bounds the hang this test is about
                order, debit = await asyncio.gather(api.order("C1", 30, headers=key), api.debit("C1", 10))
        assert (order.status_code, order.json()) == (
            503,
            {
                "success": False,
                "error": "Service temporarily unavailable; no money moved",
                "code": "SERVICE_UNAVAILABLE",
            },
        )
        assert (debit.status_code, debit.json()["code"]) == (503, "SERVICE_UNAVAILABLE")
        assert debit.json()["error"] == "Service temporarily unavailable; no money moved"
        await assert_held(api, "C1", 100, 0)
        assert await ledger_types(direct_database_url, "C1") == [("CREDIT", 10000, 0, 10000)]
        again = await api.order("C1", 30, headers=key)
        assert again.status_code == 201, again.text
        assert "Idempotent-Replayed" not in again.headers
        await assert_held(api, "C1", 70, 0)


async def test_an_order_held_elsewhere_when_it_completes_is_202_in_time_and_completed_later(
    database_url: str, direct_database_url: str, commits: Commits, provider: Provider
) -> None:
    """The provider fulfilled the order, but another session holds the order's row: once the
    lock deadline passes the request answers 202 with the order PENDING and its money held (the
    money moved, so never an anonymous 5xx), and the resolver completes it when the row is free."""
    await lock_deadline_behind_pooler(direct_database_url, 0.2)
    gate = asyncio.Event()
    provider.set(gate=gate)
    # One attempt: the request's lease on the order, after which the resolver takes it, is shorter.
    overrides = {"db_lock_timeout_seconds": 0.2, "fulfillment_max_attempts": 1}
    async with start_service(database_url, provider.url, **overrides) as api:
        await api.credit("C1", 100)
        order = asyncio.create_task(api.order("C1", 30))
        await provider.simulator.wait_for_calls(1)  # placed; the provider's answer waits at the gate
        async with rows_held(direct_database_url, "orders", "client_id = 'C1'"):
            gate.set()
            async with asyncio.timeout(30):  # bounds the hang this test is about
                answer = await order
        order_id = assert_accepted(answer, 30)
        await assert_held(api, "C1", 70, 30)
        await api.settled(commits, "C1", order_id)
        assert await api.order_status("C1", order_id) == "COMPLETED"
        await assert_held(api, "C1", 70, 0)


# --- unknown: money held, the resolver finds out -----------------------------------------


@pytest.mark.parametrize("status", [408, 409, 425, 429, 500, 502, 503, 504])
async def test_an_unknown_answer_holds_the_money_until_the_provider_answers(
    database_url: str, commits: Commits, provider: Provider, status: int
) -> None:
    """Never refunded while it may have been carried out; completed once the provider is back."""
    gate = asyncio.Event()
    provider.set(error_status=status)
    async with start_service(
        database_url, provider.url, fulfillment_max_attempts=3, fulfillment_backoff_seconds=0.01
    ) as api:
        await api.credit("C1", 100)
        response = await api.order("C1", 30)
        order_id = assert_accepted(response, 30)
        assert provider.simulator.attempts_for(order_id) >= 3
        # Until the provider is healthy again the resolver keeps asking, and the money stays held.
        provider.set(gate=gate)
        await provider.simulator.wait_for_calls(len(provider.simulator.calls) + 1)
        await assert_held(api, "C1", 70, 30)
        gate.set()
        await api.settled(commits, "C1", order_id)
        assert await api.order_status("C1", order_id) == "COMPLETED"
        await assert_held(api, "C1", 70, 0)
        assert [t for t, *_ in await ledger_types(database_url, "C1")] == ["CREDIT", "ORDER_DEDUCTION"]
        assert {c.idempotency_key for c in provider.simulator.calls} == {order_id}


@pytest.mark.parametrize("status_lookup", [False, True])
async def test_a_slow_provider_that_recorded_the_order_is_not_refunded(
    database_url: str, commits: Commits, provider: Provider, status_lookup: bool
) -> None:
    """The provider carries the order out but answers after the timeout, every time: the order
    completes with the id the provider gave the first time, and was fulfilled once."""
    # Lookups answer 503 (proving nothing) until the money is seen held: else the resolver may
    # find the order carried out and complete it before the check.
    provider.set(answer_late_seconds=1.0, lookup_status=503)
    status_url = provider.url if status_lookup else None
    async with start_service(
        database_url,
        provider.url,
        fulfillment_timeout_seconds=0.2,
        fulfillment_max_attempts=2,
        fulfillment_status_url=status_url,
    ) as api:
        await api.credit("C1", 100)
        order_id = assert_accepted(await api.order("C1", 30), 30)
        await assert_held(api, "C1", 70, 30)
        provider.set()  # answering in time again
        await api.settled(commits, "C1", order_id)
        order = (await api.get_order("C1", order_id)).json()["data"]
        assert order["status"] == "COMPLETED"
        assert order["fulfillmentId"] == provider.simulator.by_order[order_id]
        assert provider.simulator.fulfilled == {order_id: order["fulfillmentId"]}
        assert {c.idempotency_key for c in provider.simulator.calls} == {order_id}
        if status_lookup:
            assert order_id in provider.simulator.lookups
        await assert_held(api, "C1", 70, 0)


async def test_a_provider_down_for_a_while_ends_every_order_completed_once(
    database_url: str, commits: Commits, provider: Provider
) -> None:
    provider.set(error_status=503)
    async with start_service(database_url, provider.url, fulfillment_max_attempts=2) as api:
        await api.credit("C1", 1000)
        responses = await asyncio.gather(*(api.order("C1", 10) for _ in range(20)))
        order_ids = [assert_accepted(r, 10) for r in responses]
        await assert_held(api, "C1", 800, 200)
        provider.set()
        await api.settled(commits, "C1", *order_ids)
        assert {await api.order_status("C1", o) for o in order_ids} == {"COMPLETED"}
        assert set(provider.simulator.fulfilled) == set(order_ids)  # each fulfilled, under its own key
        await assert_held(api, "C1", 800, 0)
        assert "ORDER_REFUND" not in [t for t, *_ in await ledger_types(database_url, "C1")]


async def test_every_attempt_carries_the_order_id_as_idempotency_key(
    database_url: str, provider: Provider
) -> None:
    provider.set(error_status=500)
    async with start_service(
        database_url, provider.url, fulfillment_max_attempts=3, recovery_interval_seconds=3600
    ) as api:
        await api.credit("C1", 100)
        response = await api.order("C1", 30, headers={"X-Request-ID": "req-42"})
        order_id = assert_accepted(response, 30)
        calls = provider.simulator.calls
        assert [c.idempotency_key for c in calls] == [order_id] * 3
        assert [c.request_id for c in calls] == ["req-42"] * 3


async def test_provider_recovering_mid_order_completes_it(database_url: str, provider: Provider) -> None:
    """Two 503s then a success: the order completes on its third attempt, in the request."""
    provider.set(error_status=503, fail_first=2)
    async with start_service(database_url, provider.url, fulfillment_max_attempts=3) as api:
        await api.credit("C1", 100)
        response = await api.order("C1", 30)
        assert response.status_code == 201
        assert [c.status for c in provider.simulator.calls] == [503, 503, 201]
        assert response.json()["data"]["status"] == "COMPLETED"
        await assert_held(api, "C1", 70, 0)


# --- FULFILLMENT_ON_UNKNOWN=refund: the original behaviour --------------------------------


async def test_refund_on_unknown_fails_and_refunds_a_5xx_with_502(
    database_url: str, provider: Provider
) -> None:
    provider.set(error_status=500)
    async with start_service(
        database_url, provider.url, fulfillment_max_attempts=2, fulfillment_on_unknown="refund"
    ) as api:
        await api.credit("C1", 100)
        response = await api.order("C1", 30)
        assert response.status_code == 502
        assert_failed_order(response.json(), 30)
        await assert_held(api, "C1", 100, 0)


async def test_refund_on_unknown_fails_and_refunds_a_timeout_with_503(
    database_url: str, provider: Provider
) -> None:
    provider.set(hang=True)
    async with start_service(
        database_url,
        provider.url,
        fulfillment_timeout_seconds=0.2,
        fulfillment_max_attempts=2,
        fulfillment_on_unknown="refund",
    ) as api:
        await api.credit("C1", 100)
        response = await api.order("C1", 30)
        assert response.status_code == 503
        order_id = assert_failed_order(response.json(), 30)
        assert provider.simulator.attempts_for(order_id) == 2
        await assert_held(api, "C1", 100, 0)


async def test_refund_on_unknown_never_refunds_an_order_the_provider_accepted(
    database_url: str, provider: Provider
) -> None:
    """A 2xx whose id is unusable still says the provider took the order: held, not refunded."""
    provider.set(success_body=b"{}")
    async with start_service(
        database_url,
        provider.url,
        fulfillment_max_attempts=2,
        fulfillment_on_unknown="refund",
        recovery_interval_seconds=3600,
    ) as api:
        await api.credit("C1", 100)
        assert_accepted(await api.order("C1", 30), 30)
        await assert_held(api, "C1", 70, 30)


# --- replays tell the current state --------------------------------------------------------


async def test_replaying_a_202_tells_the_order_as_it_is_now(
    database_url: str, commits: Commits, provider: Provider
) -> None:
    provider.set(error_status=503)
    key = {"Idempotency-Key": "order-1"}
    async with start_service(
        database_url, provider.url, fulfillment_max_attempts=1, recovery_interval_seconds=3600
    ) as api:
        await api.credit("C1", 100)
        first = await api.order("C1", 30, headers=key)
        order_id = assert_accepted(first, 30)
        again = await api.order("C1", 30, headers=key)
        assert assert_accepted(again, 30) == order_id
        assert again.headers["Idempotent-Replayed"] == "true"
        assert again.content == first.content
    provider.set()
    async with start_service(database_url, provider.url) as api:
        await api.settled(commits, "C1", order_id)
        later = await api.order("C1", 30, headers=key)
        assert later.status_code == 201
        assert later.headers["Idempotent-Replayed"] == "true"
        assert later.json()["data"]["status"] == "COMPLETED"
        assert later.json()["data"]["orderId"] == order_id
        await assert_held(api, "C1", 70, 0)


async def test_held_money_counts_against_the_credit_cap(database_url: str, provider: Provider) -> None:
    """A held order may come back as a refund, so a credit may not use its room."""
    provider.set(error_status=503)
    async with start_service(
        database_url, provider.url, fulfillment_max_attempts=1, recovery_interval_seconds=3600
    ) as api:
        top = Decimal("9999999999999.99")
        assert (await api.credit("C1", top)).status_code == 200
        assert_accepted(await api.order("C1", 100), 100)
        refused = await api.credit("C1", 100)
        assert refused.status_code == 400
        assert refused.json()["code"] == "BALANCE_LIMIT_EXCEEDED"
        assert (await api.credit("C1", Decimal("0.01"))).status_code == 400


# --- settling under a PENDING backlog ----------------------------------------------------

_BULK_ORDERS = """
INSERT INTO orders (order_id, client_id, amount, status, fulfillment_id, next_attempt_at, sent_by,
                    created_at, updated_at)
SELECT 'ORD-' || ($1::bigint + g) || '-' || lpad(to_hex(g), 8, '0'), 'w' || (g % 10), 100, $2,
       CASE WHEN $2 = 'COMPLETED' THEN 'F' END,
       CASE WHEN $2 = 'PENDING' THEN now() + interval '1 day' END, now(), now(), now()
FROM generate_series(1, $3) AS g
"""


@pytest.mark.parametrize("analyzed", [True, False], ids=["stale statistics", "no statistics"])
async def test_settling_reads_only_its_orders_whatever_the_pending_backlog(
    direct_database_url: str, analyzed: bool
) -> None:
    """A provider outage leaves thousands of orders PENDING before autovacuum re-analyzes a big
    table, so the statistics still say PENDING is rare; a new database has no statistics at
    all. Settling an order (completing it, alone or in a batch, refunding it, rescheduling it)
    must still find it by its key, not read every PENDING order (or every order) for each one
    it settles: that made the resolver's catch-up quadratic."""
    conn = await asyncpg.connect(plain_url(direct_database_url))
    try:
        await conn.execute("ALTER TABLE orders SET (autovacuum_enabled = false)")
        for c in range(10):
            await conn.execute("INSERT INTO clients (client_id) VALUES ($1)", f"w{c}")
            await conn.execute("INSERT INTO wallets (client_id) VALUES ($1)", f"w{c}")
        await conn.execute(_BULK_ORDERS, 1_000_000_000_000, "COMPLETED", 100_000)
        if analyzed:
            await conn.execute("ANALYZE orders")
        await conn.execute(_BULK_ORDERS, 2_000_000_000_000, "PENDING", 10_000)
        # Each statement settles orders of its own: one rolled back leaves index entries behind.
        pending = await conn.fetch("SELECT client_id, order_id FROM orders WHERE status = 'PENDING' LIMIT 9")
        six = [r["order_id"] for r in pending[:6]]
        one = {
            "order_id": None,
            "fulfillment_id": "F-1",
            "attempts": 1,
            "resolved_by": None,
            "note": None,
            "failure": "PROVIDER_ERROR",
            "detail": "test",
            "delay": 1.0,
            "resolver_attempt": 0,
            "sent_by": None,
            "review_after": 3600.0,
            "announce": False,
            **ledger_key().sql_params(),
        }
        batch = {
            "client_ids": [r["client_id"] for r in pending[:6]],
            "order_ids": six,
            "fulfillment_ids": [f"F-{n}" for n in range(6)],
            "attempts": [1] * 6,
        }
        cases = [
            ("completion of six", orders._COMPLETE_MANY, batch, 6),
            ("completion", Statement.of(orders._COMPLETE), {**one, "order_id": pending[6]["order_id"]}, 1),
            ("refund", Statement.of(ledger._REFUND_ORDER), {**one, "order_id": pending[7]["order_id"]}, 1),
            ("reschedule", Statement.of(orders._RESCHEDULE), {**one, "order_id": pending[8]["order_id"]}, 1),
        ]
        for name, statement, params, settled in cases:
            scans = await scans_of(conn, statement, params, "orders")
            assert scans, name
            assert max(rows for _, rows in scans) <= settled, (name, scans)
    finally:
        await conn.close()
