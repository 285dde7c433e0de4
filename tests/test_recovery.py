"""Crash safety (SPEC §4.5): a server killed mid-fulfillment loses no order and keeps no money."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter

import asyncpg
import httpx

from tests.builders import ADMIN_KEY, Provider, ServerProcess, ledger_key, settings_env, spawn_service
from wallet import ledger
from wallet.database import create_engine, plain_url
from wallet.fulfillment import Provider as FulfillmentProvider
from wallet.fulfillment import new_http_client
from wallet.orders import Orders, new_order_id
from wallet.settings import Settings

WALLETS = [f"crash-{n}" for n in range(5)]
ORDERS_PER_WALLET = 4
ORDER_AMOUNT = 10
CREDIT = 100
RECOVERED = '"order finished"'  # the JSON log event of a settled order


def server_env(database_url: str, provider: Provider) -> dict[str, str]:
    return {
        "DATABASE_URL": database_url,
        "ADMIN_API_KEY": ADMIN_KEY,
        "FULFILLMENT_API_URL": provider.url,
        "FULFILLMENT_TIMEOUT_SECONDS": "3",
        "FULFILLMENT_MAX_ATTEMPTS": "1",
        "RECOVERY_INTERVAL_SECONDS": "0.2",
        "RATE_LIMIT": "off",
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "info",
    }


async def crash_with_orders_in_flight(database_url: str, provider: Provider) -> list[str]:
    """Credit wallets, start 20 orders that block at the provider, SIGKILL the server."""
    gate = asyncio.Event()
    provider.set(gate=gate)
    async with (
        spawn_service(server_env(database_url, provider)) as server,
        httpx.AsyncClient(base_url=server.url, timeout=30) as http,
    ):
        for client_id in WALLETS:
            credited = await http.post(
                "/admin/wallet/credit",
                json={"client_id": client_id, "amount": CREDIT},
                headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            )
            assert credited.status_code == 200
        orders = [
            asyncio.create_task(http.post("/orders", json={"amount": ORDER_AMOUNT}, headers={"client-id": c}))
            for c in WALLETS
            for _ in range(ORDERS_PER_WALLET)
        ]
        await provider.simulator.wait_for_calls(len(orders))
        server.process.kill()
        await server.process.wait()
        results = await asyncio.gather(*orders, return_exceptions=True)
        assert all(isinstance(r, httpx.HTTPError) for r in results)
    pending = await fetch(database_url, "SELECT order_id FROM orders WHERE status = 'PENDING'")
    assert len(pending) == len(WALLETS) * ORDERS_PER_WALLET
    # The provider works again, but refuses some orders: recovery must refund those.
    provider.set(error_status=400, error_rate=0.3)
    gate.set()
    return [row["order_id"] for row in pending]


async def fetch(database_url: str, query: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(plain_url(database_url))
    try:
        rows: list[asyncpg.Record] = await conn.fetch(query)
        return rows
    finally:
        await conn.close()


async def assert_every_wallet_balances(database_url: str) -> None:
    """Balance = credits - completed orders, the ledger sums to it, and nothing is PENDING."""
    assert await fetch(database_url, "SELECT 1 FROM orders WHERE status = 'PENDING'") == []
    wallets = await fetch(
        database_url,
        """
        SELECT w.client_id, w.balance,
               (SELECT coalesce(sum(CASE WHEN type IN ('CREDIT', 'ORDER_REFUND') THEN amount
                                         ELSE -amount END), 0)
                FROM ledger_entries e WHERE e.client_id = w.client_id) AS ledger_sum,
               (SELECT coalesce(sum(amount), 0) FROM orders o
                WHERE o.client_id = w.client_id AND o.status = 'COMPLETED') AS completed
        FROM wallets w
        """,
    )
    assert {w["client_id"] for w in wallets} == set(WALLETS)
    for wallet in wallets:
        assert wallet["balance"] == CREDIT * 100 - wallet["completed"], wallet
        assert wallet["ledger_sum"] == wallet["balance"], wallet


def recovery_calls(provider: Provider, order_ids: list[str], before: int) -> Counter[str]:
    return Counter(call.order_id for call in provider.simulator.calls[before:] if call.order_id in order_ids)


async def test_killed_server_orders_are_finished_after_restart(database_url: str, provider: Provider) -> None:
    order_ids = await crash_with_orders_in_flight(database_url, provider)
    calls_before = len(provider.simulator.calls)
    async with spawn_service(server_env(database_url, provider)) as server:
        await asyncio.wait_for(server.wait_for(RECOVERED, len(order_ids)), 60)
    await assert_every_wallet_balances(database_url)
    calls = recovery_calls(provider, order_ids, calls_before)
    assert calls == Counter(dict.fromkeys(order_ids, 1))
    # Every recovery call carried the order id as its Idempotency-Key, like the first one did.
    keys = {c.order_id: c.idempotency_key for c in provider.simulator.calls[calls_before:]}
    assert all(keys[o] == o for o in order_ids)
    statuses = await fetch(database_url, "SELECT status, count(*) AS n FROM orders GROUP BY status")
    assert sum(row["n"] for row in statuses) == len(order_ids)


async def test_two_processes_recover_each_order_once(database_url: str, provider: Provider) -> None:
    order_ids = await crash_with_orders_in_flight(database_url, provider)
    calls_before = len(provider.simulator.calls)
    env = server_env(database_url, provider)
    async with contextlib.AsyncExitStack() as stack:
        first, second = await asyncio.gather(
            stack.enter_async_context(spawn_service(env)),
            stack.enter_async_context(spawn_service(env)),
        )
        # Both recovery loops compete for the same expired leases; wait until all are done.
        await asyncio.wait_for(_until_recovered(first, second, len(order_ids)), 60)
        assert first.count(RECOVERED) + second.count(RECOVERED) == len(order_ids)
    await assert_every_wallet_balances(database_url)
    assert recovery_calls(provider, order_ids, calls_before) == Counter(dict.fromkeys(order_ids, 1))


async def _until_recovered(first: ServerProcess, second: ServerProcess, total: int) -> None:
    """Wait for `total` recoveries across two servers, whichever did them."""
    while first.count(RECOVERED) + second.count(RECOVERED) < total:
        waiters = [
            asyncio.create_task(s.wait_for(RECOVERED, s.count(RECOVERED) + 1)) for s in (first, second)
        ]
        _done, pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


async def test_one_recovery_pass_drains_more_than_a_batch(database_url: str, provider: Provider) -> None:
    """45 abandoned orders, batches of 20: one pass finishes all of them, each fulfilled once."""
    engine = create_engine(database_url, pool_size=4)
    try:
        async with engine.begin() as conn:
            await ledger.credit(conn, "C1", 10_000, key=ledger_key())
            for _ in range(45):
                # A lease of zero: as if the process that placed them died at once.
                await ledger.place_order(
                    conn,
                    client_id="C1",
                    order_id=new_order_id(),
                    amount=100,
                    lease_seconds=0,
                    request_id=None,
                    key=ledger_key(),
                )
        settings = Settings(**settings_env(database_url, provider.url))
        async with new_http_client(settings) as http:
            orders = Orders(engine, FulfillmentProvider(settings, http), settings)
            assert await orders.resolve_due(batch=20) == 45
            assert await orders.resolve_due(batch=20) == 0
    finally:
        await engine.dispose()
    assert await fetch(database_url, "SELECT 1 FROM orders WHERE status <> 'COMPLETED'") == []
    calls = Counter(call.order_id for call in provider.simulator.calls)
    assert len(calls) == 45
    assert set(calls.values()) == {1}
    balance = await fetch(database_url, "SELECT balance FROM wallets WHERE client_id = 'C1'")
    assert balance[0]["balance"] == 10_000 - 45 * 100
