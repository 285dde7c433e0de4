"""Orders against a provider that fails (SPEC §4): attempts, refunds, status codes, ledger."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import asyncpg
import pytest

from tests.builders import Provider, dead_url, start_service
from wallet.database import plain_url


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


async def test_provider_down_is_503_after_every_attempt_and_refunded(database_url: str) -> None:
    async with start_service(database_url, dead_url(), fulfillment_max_attempts=3) as api:
        await api.credit("C1", 100)
        response = await api.order("C1", 30)
        assert response.status_code == 503
        order_id = assert_failed_order(response.json(), 30)
        assert await api.balance("C1") == Decimal(100)
        details = (await api.get_order("C1", order_id)).json()["data"]
        assert details["status"] == "FAILED"
        assert await ledger_types(database_url, "C1") == [
            ("CREDIT", 10000, 0, 10000),
            ("ORDER_DEDUCTION", 3000, 10000, 7000),
            ("ORDER_REFUND", 3000, 7000, 10000),
        ]


async def test_hanging_provider_times_out_each_attempt(database_url: str, provider: Provider) -> None:
    provider.set(hang=True)
    async with start_service(
        database_url, provider.url, fulfillment_timeout_seconds=0.2, fulfillment_max_attempts=2
    ) as api:
        await api.credit("C1", 100)
        response = await api.order("C1", 30)
        assert response.status_code == 503
        order_id = assert_failed_order(response.json(), 30)
        assert provider.simulator.attempts_for(order_id) == 2
        assert await api.balance("C1") == Decimal(100)


async def test_final_4xx_is_502_after_one_attempt(database_url: str, provider: Provider) -> None:
    provider.set(error_status=400)
    async with start_service(database_url, provider.url, fulfillment_max_attempts=3) as api:
        await api.credit("C1", 100)
        response = await api.order("C1", 30)
        assert response.status_code == 502
        order_id = assert_failed_order(response.json(), 30)
        assert provider.simulator.attempts_for(order_id) == 1
        assert await api.balance("C1") == Decimal(100)


@pytest.mark.parametrize("status", [408, 429, 500, 503])
async def test_retryable_statuses_are_retried_then_502(
    database_url: str, provider: Provider, status: int
) -> None:
    provider.set(error_status=status)
    async with start_service(database_url, provider.url, fulfillment_max_attempts=3) as api:
        await api.credit("C1", 100)
        response = await api.order("C1", 30)
        assert response.status_code == 502
        order_id = assert_failed_order(response.json(), 30)
        assert provider.simulator.attempts_for(order_id) == 3
        assert await api.balance("C1") == Decimal(100)


async def test_every_attempt_carries_the_order_id_as_idempotency_key(
    database_url: str, provider: Provider
) -> None:
    provider.set(error_status=500)
    async with start_service(database_url, provider.url, fulfillment_max_attempts=3) as api:
        await api.credit("C1", 100)
        response = await api.order("C1", 30, headers={"X-Request-ID": "req-42"})
        order_id = response.json()["data"]["orderId"]
        calls = provider.simulator.calls
        assert [c.idempotency_key for c in calls] == [order_id] * 3
        assert [c.request_id for c in calls] == ["req-42"] * 3


async def test_flaky_provider_every_order_ends_completed_or_refunded(
    database_url: str, provider: Provider
) -> None:
    provider.set(error_status=500, error_rate=0.6)
    async with start_service(database_url, provider.url, fulfillment_max_attempts=3) as api:
        await api.credit("C1", 1000)
        responses = await asyncio.gather(*(api.order("C1", 10) for _ in range(30)))
        completed = [r for r in responses if r.status_code == 201]
        failed = [r for r in responses if r.status_code == 502]
        assert len(completed) + len(failed) == 30
        for r in failed:
            assert_failed_order(r.json(), 10)
        assert await api.balance("C1") == Decimal(1000 - 10 * len(completed))
        # Every call was an attempt of some order, and no order made more than three.
        order_ids = [r.json()["data"]["orderId"] for r in responses]
        attempts = [provider.simulator.attempts_for(o) for o in order_ids]
        assert sum(attempts) == len(provider.simulator.calls)
        assert all(1 <= a <= 3 for a in attempts)
        assert all(provider.simulator.attempts_for(r.json()["data"]["orderId"]) == 3 for r in failed)
        # With 60 % failures, 30 orders make one of each outcome all but certain (p < 1e-6).
        assert completed
        assert failed
        for r in responses:
            details = (await api.get_order("C1", r.json()["data"]["orderId"])).json()["data"]
            assert details["status"] == ("COMPLETED" if r.status_code == 201 else "FAILED")


async def test_provider_recovering_mid_order_completes_it(database_url: str, provider: Provider) -> None:
    """Two 503s then a success: the order completes on its third attempt."""
    provider.set(error_status=503, fail_first=2)
    async with start_service(database_url, provider.url, fulfillment_max_attempts=3) as api:
        await api.credit("C1", 100)
        response = await api.order("C1", 30)
        assert response.status_code == 201
        assert [c.status for c in provider.simulator.calls] == [503, 503, 201]
        assert response.json()["data"]["status"] == "COMPLETED"
        assert await api.balance("C1") == Decimal(70)
