"""The resolver and the review queue (SPEC §4.5-4.6): orders whose outcome is unknown are found
out later, flagged when that takes too long, and finished by an operator; the database failing
mid-burst and a process killed mid-call lose nothing and double nothing."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx

from tests.builders import ADMIN_KEY, Api, Commits, Provider, settings_env, spawn_service, start_service
from tests.servers import Relay, relay
from tests.test_orders import assert_accepted, assert_held, ledger_types
from tests.test_workers import metric
from wallet.database import create_engine, plain_url
from wallet.settings import Settings
from wallet.verify import verify_ledger

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


async def resolve(api: Api, order_id: str, body: dict[str, Any], **headers: str) -> httpx.Response:
    return await api.http.post(f"/admin/orders/{order_id}/resolve", json=body, headers={**ADMIN, **headers})


async def admin_order(api: Api, order_id: str) -> dict[str, Any]:
    response = await api.http.get(f"/admin/orders/{order_id}", headers=ADMIN)
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()["data"]
    return data


async def resolver_fulfilled(api: Api) -> float:
    """How many times the resolver heard "fulfilled" from the provider (in this process)."""
    text = (await api.http.get("/metrics")).text
    return metric(text, "wallet_order_outcomes_total", kind="fulfilled", path="resolver")


async def review_queue(api: Api) -> list[str]:
    response = await api.http.get("/admin/orders", params={"needsReview": "true"}, headers=ADMIN)
    assert response.status_code == 200, response.text
    return [o["orderId"] for o in response.json()["data"]]


@contextlib.asynccontextmanager
async def stuck_orders(
    database_url: str, provider: Provider, count: int = 1, **overrides: Any
) -> AsyncIterator[tuple[Api, list[str]]]:
    """A service whose provider answers 503 to everything, with `count` orders of 10 from C1
    accepted and held, flagged for review within a second."""
    provider.set(error_status=503)
    settings = {
        "fulfillment_max_attempts": 1,
        "fulfillment_backoff_seconds": 0.01,
        "fulfillment_retry_max_seconds": 0.05,
        "fulfillment_resolve_hours": 0.5 / 3600,
        **overrides,
    }
    async with start_service(database_url, provider.url, **settings) as api:
        await api.credit("C1", 100)
        order_ids = [assert_accepted(await api.order("C1", 10), 10) for _ in range(count)]
        yield api, order_ids


async def flagged(commits: Commits, api: Api, *order_ids: str) -> None:
    async def all_flagged() -> bool:
        return set(order_ids) <= set(await review_queue(api))

    await commits.until(all_flagged, what="orders flagged for review")


async def test_an_order_unknown_too_long_is_flagged_and_resolved_as_fulfilled(
    database_url: str, commits: Commits, provider: Provider
) -> None:
    async with stuck_orders(database_url, provider) as (api, [order_id]):
        await flagged(commits, api, order_id)
        order = await admin_order(api, order_id)
        assert order["status"] == "PENDING"
        assert order["needsReview"] is True
        assert order["flaggedAt"] is not None
        assert order["lastError"] == "provider answered 503"
        assert order["resolverAttempts"] >= 1
        await assert_held(api, "C1", 90, 10)  # flagged, still held
        metrics = (await api.http.get("/metrics")).text
        assert "wallet_orders_review_queue 1.0" in metrics

        done = await resolve(
            api, order_id, {"outcome": "fulfilled", "fulfillmentId": "ff-77", "note": "seen in their portal"}
        )
        assert done.status_code == 200, done.text
        data = done.json()["data"]
        assert (data["status"], data["fulfillmentId"], data["needsReview"]) == ("COMPLETED", "ff-77", False)
        assert data["resolution"]["outcome"] == "fulfilled"
        assert data["resolution"]["by"] == "admin"
        assert data["resolution"]["note"] == "seen in their portal"
        assert (await admin_order(api, order_id))["resolution"] == data["resolution"]
        assert await review_queue(api) == []
        await assert_held(api, "C1", 90, 0)
        client_view = (await api.get_order("C1", order_id)).json()["data"]
        assert (client_view["status"], client_view["fulfillmentId"]) == ("COMPLETED", "ff-77")
        assert "resolution" not in client_view  # operators' notes are not the client's business


async def test_resolving_as_failed_refunds_once_and_a_second_resolution_is_409(
    database_url: str, commits: Commits, provider: Provider
) -> None:
    async with stuck_orders(database_url, provider) as (api, [order_id]):
        await flagged(commits, api, order_id)
        key = {"Idempotency-Key": "resolve-1"}
        body = {"outcome": "failed", "note": "provider confirms it never shipped"}
        first = await resolve(api, order_id, body, **key)
        assert first.status_code == 200, first.text
        assert first.json()["data"]["status"] == "FAILED"
        assert first.json()["data"]["failure"] == "RESOLVED_FAILED"
        replay = await resolve(api, order_id, body, **key)
        assert replay.status_code == 200
        assert replay.headers["Idempotent-Replayed"] == "true"
        assert replay.content == first.content
        again = await resolve(api, order_id, {"outcome": "fulfilled", "fulfillmentId": "x", "note": "oops"})
        assert again.status_code == 409
        assert again.json()["code"] == "ORDER_ALREADY_FINAL"
        assert again.json()["data"]["status"] == "FAILED"
        await assert_held(api, "C1", 100, 0)
        assert [t for t, *_ in await ledger_types(database_url, "C1")] == [
            "CREDIT",
            "ORDER_DEDUCTION",
            "ORDER_REFUND",
        ]
        # The client sees the refusal the way a refused order always looks.
        replayed_order = await api.get_order("C1", order_id)
        assert replayed_order.json()["data"]["status"] == "FAILED"
        # A client retrying its order request learns who decided, not that the provider refused.
        keyed = assert_accepted(await api.order("C1", 10, headers={"Idempotency-Key": "o-1"}), 10)
        await resolve(api, keyed, {"outcome": "failed", "note": "never shipped"})
        retried = await api.order("C1", 10, headers={"Idempotency-Key": "o-1"})
        assert (retried.status_code, retried.json()["error"]) == (
            502,
            "An operator found the order was not carried out; it failed and was refunded",
        )


async def test_a_provider_that_never_received_the_order_has_it_refunded_without_another_post(
    database_url: str, commits: Commits, provider: Provider
) -> None:
    """Every POST answers 500 (proves nothing) and the status lookup says it has no record. The
    resolver retries faster than the request's calls could settle: it believes the lookup once no
    earlier call can still arrive, and never posts again meanwhile (which would restart that wait)."""
    provider.set(error_status=500, lookup_status=404)
    async with start_service(
        database_url,
        provider.url,
        fulfillment_timeout_seconds=0.3,
        fulfillment_max_attempts=2,
        fulfillment_retry_max_seconds=0.05,
        fulfillment_status_url=provider.url,
    ) as api:
        await api.credit("C1", 100)
        order_id = assert_accepted(await api.order("C1", 30), 30)
        await api.settled(commits, "C1", order_id)
        order = await admin_order(api, order_id)
        assert (order["status"], order["failure"]) == ("FAILED", "UNREACHABLE")
        await assert_held(api, "C1", 100, 0)
        assert [t for t, *_ in await ledger_types(database_url, "C1")] == [
            "CREDIT",
            "ORDER_DEDUCTION",
            "ORDER_REFUND",
        ]
        assert len(provider.simulator.calls) == 2  # the request's two attempts, no more
        assert provider.simulator.lookups.count(order_id) >= 1


async def test_resolve_requests_are_validated(database_url: str, provider: Provider) -> None:
    async with stuck_orders(database_url, provider, recovery_interval_seconds=3600) as (api, [order_id]):
        for body in (
            {"outcome": "fulfilled", "note": "no id"},
            {"outcome": "failed", "fulfillmentId": "x", "note": "id on a failure"},
            {"outcome": "maybe", "note": "n"},
            {"outcome": "failed"},
            {"outcome": "failed", "note": ""},
        ):
            response = await resolve(api, order_id, body)
            assert response.status_code == 400, body
        missing = await resolve(api, "ORD-1703251234567-00000000", {"outcome": "failed", "note": "n"})
        assert missing.status_code == 404
        unauthenticated = await api.http.post(
            f"/admin/orders/{order_id}/resolve", json={"outcome": "failed", "note": "n"}
        )
        assert unauthenticated.status_code == 401
        assert (await admin_order(api, order_id))["status"] == "PENDING"


async def test_an_operator_and_the_resolver_racing_for_one_order_exactly_one_wins(
    database_url: str, commits: Commits, provider: Provider
) -> None:
    """The resolver is at the provider for the order when the operator resolves it: the
    operator wins, and the resolver's answer, arriving after, changes nothing."""
    gate = asyncio.Event()
    async with stuck_orders(database_url, provider, fulfillment_resolve_hours=1) as (api, [order_id]):
        calls = len(provider.simulator.calls)
        provider.set(gate=gate)  # the next call blocks: the resolver holds its claim
        await provider.simulator.wait_for_calls(calls + 1)
        won = await resolve(api, order_id, {"outcome": "failed", "note": "cancelled with the provider"})
        assert won.status_code == 200
        answered = await resolver_fulfilled(api)
        gate.set()  # the provider now says it fulfilled it: too late, the order is final

        async def resolver_heard_back() -> bool:
            return await resolver_fulfilled(api) > answered

        await commits.until(resolver_heard_back, what="the resolver to get the provider's answer")
        assert (await admin_order(api, order_id))["status"] == "FAILED"
        await assert_held(api, "C1", 100, 0)
        types = [t for t, *_ in await ledger_types(database_url, "C1")]
        assert types == ["CREDIT", "ORDER_DEDUCTION", "ORDER_REFUND"]


async def test_many_resolutions_at_once_exactly_one_wins(database_url: str, provider: Provider) -> None:
    async with stuck_orders(database_url, provider, recovery_interval_seconds=3600) as (api, [order_id]):
        bodies = [
            {"outcome": "failed", "note": f"operator {n}"}
            if n % 2
            else {"outcome": "fulfilled", "fulfillmentId": f"f{n}", "note": f"operator {n}"}
            for n in range(8)
        ]
        responses = await asyncio.gather(*(resolve(api, order_id, b) for b in bodies))
        assert sorted(r.status_code for r in responses) == [200] + [409] * 7
        final = await admin_order(api, order_id)
        winner = next(r for r in responses if r.status_code == 200).json()["data"]
        assert final == winner
        assert all(r.json()["data"]["status"] == final["status"] for r in responses)
        refunds = [t for t, *_ in await ledger_types(database_url, "C1")].count("ORDER_REFUND")
        assert refunds == (1 if final["status"] == "FAILED" else 0)


async def test_admin_orders_are_paged_and_filtered(database_url: str, provider: Provider) -> None:
    async with stuck_orders(database_url, provider, count=3, recovery_interval_seconds=3600) as (
        api,
        order_ids,
    ):
        provider.set()
        await api.credit("C2", 100)
        done = await api.order("C2", 5)
        assert done.status_code == 201
        everything = await api.http.get("/admin/orders", params={"limit": 2}, headers=ADMIN)
        page = everything.json()
        assert [o["orderId"] for o in page["data"]] == [done.json()["data"]["orderId"], order_ids[2]]
        rest = await api.http.get(
            "/admin/orders", params={"limit": 2, "cursor": page["nextCursor"]}, headers=ADMIN
        )
        assert [o["orderId"] for o in rest.json()["data"]] == [order_ids[1], order_ids[0]]
        assert rest.json()["nextCursor"] is None
        pending = await api.http.get(
            "/admin/orders", params={"status": "PENDING", "clientId": "C1"}, headers=ADMIN
        )
        assert {o["orderId"] for o in pending.json()["data"]} == set(order_ids)
        assert all(o["clientId"] == "C1" for o in pending.json()["data"])
        of_c2 = await api.http.get("/admin/orders", params={"clientId": "C2"}, headers=ADMIN)
        assert [o["status"] for o in of_c2.json()["data"]] == ["COMPLETED"]
        bad = await api.http.get("/admin/orders", params={"needsReview": "perhaps"}, headers=ADMIN)
        assert bad.status_code == 400


async def test_database_connections_cut_mid_burst_leave_no_anonymous_charge(
    database_url: str, commits: Commits, provider: Provider
) -> None:
    """Every answer that follows a deduction names the order; an answer that names none moved no
    money; afterwards nothing is PENDING and the ledger verifies."""
    async with start_service(database_url, provider.url, fulfillment_backoff_seconds=0.01) as api:
        await api.credit("C1", 1000)
        killer = await asyncpg.connect(plain_url(database_url))
        stop = asyncio.Event()

        async def cut_connections() -> int:
            cuts = 0
            while not stop.is_set():
                cuts += await killer.fetchval(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND application_name = 'wallet'"
                    " AND pid <> pg_backend_pid()"
                )
            return cuts

        cutter = asyncio.create_task(cut_connections())
        orders = [
            api.order("C1", 5, headers={"Idempotency-Key": f"k{n}"} if n % 2 else None) for n in range(60)
        ]
        responses = await asyncio.gather(*orders)
        stop.set()
        assert await cutter > 0
        await killer.close()

        named: set[str] = set()
        for response in responses:
            assert response.status_code in (201, 202, 502, 503), response.text
            body = response.json()
            order_id = (body.get("data") or {}).get("orderId") or (body.get("details") or {}).get("orderId")
            if order_id:
                named.add(order_id)
        conn = await asyncpg.connect(plain_url(database_url))
        try:
            placed = {r["order_id"] for r in await conn.fetch("SELECT order_id FROM orders")}
        finally:
            await conn.close()
        assert placed <= named  # no order exists that its answer did not name
        await api.settled(commits, "C1", *placed)
        wallet = await api.wallet("C1")
        assert wallet["held"] == 0
        statuses = [await api.order_status("C1", o) for o in placed]
        assert wallet["balance"] == 1000 - 5 * statuses.count("COMPLETED")
    engine = create_engine(database_url, pool_size=2)
    try:
        verdict = await verify_ledger(engine, Settings(**settings_env(database_url, provider.url)).chain_key)
    finally:
        await engine.dispose()
    assert verdict.ok, verdict.faults


async def test_a_process_killed_during_the_resolvers_call_finishes_the_order_once_after_restart(
    database_url: str, commits: Commits, provider: Provider
) -> None:
    env = {
        "DATABASE_URL": database_url,
        "ADMIN_API_KEY": ADMIN_KEY,
        "FULFILLMENT_API_URL": provider.url,
        "FULFILLMENT_TIMEOUT_SECONDS": "1",
        "FULFILLMENT_MAX_ATTEMPTS": "1",
        "FULFILLMENT_BACKOFF_SECONDS": "0.05",
        "RECOVERY_INTERVAL_SECONDS": "0.1",
        "RATE_LIMIT": "off",
        "LOG_FORMAT": "json",
    }
    provider.set(error_status=503)
    gate = asyncio.Event()
    async with spawn_service(env) as server, httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        api = Api(http)
        await api.credit("C1", 100)
        order_id = assert_accepted(await api.order("C1", 30), 30)
        provider.set(gate=gate)  # the resolver's next call reaches the provider and waits there
        await provider.simulator.wait_for_calls(len(provider.simulator.calls) + 1)
        server.process.kill()
        await server.process.wait()
    gate.set()  # the provider carries it out, answering a process that is gone

    await asyncio.wait_for(provider.simulator.wait_for_fulfilled(order_id), 30)
    async with spawn_service(env) as server, httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        api = Api(http)
        await api.settled(commits, "C1", order_id)
        order = (await api.get_order("C1", order_id)).json()["data"]
        await assert_held(api, "C1", 70, 0)
    assert order["status"] == "COMPLETED"
    assert provider.simulator.fulfilled == {order_id: order["fulfillmentId"]}
    assert [t for t, *_ in await ledger_types(database_url, "C1")] == ["CREDIT", "ORDER_DEDUCTION"]


WAITING_ON_A_LOCK = """SELECT count(*) FROM pg_stat_activity
    WHERE datname = current_database() AND application_name = 'wallet' AND wait_event_type = 'Lock'"""
WATCHING_WHAT_RUNS = """SELECT count(*) FROM pg_stat_activity
    WHERE datname = current_database() AND application_name = 'wallet'
      AND query LIKE '%FROM pg_stat_activity a%'"""


async def cut_once_it_waits(
    watcher: asyncpg.Connection, path: Relay, order: asyncio.Task[httpx.Response]
) -> None:
    """Once the order's statement waits on the server for a lock, cut the network to the
    database; return once the service has answered, or is watching for the statement it lost.
    `watcher` is outside any transaction: each look sees pg_stat_activity afresh."""

    async def seen(query: str) -> bool:
        return bool(await watcher.fetchval(query))

    while not await seen(WAITING_ON_A_LOCK):
        pass
    path.cut()
    while not order.done() and not await seen(WATCHING_WHAT_RUNS):
        pass


def assert_answer_agrees(response: httpx.Response, placed: list[str]) -> None:
    """An answer that names an order: that order, and only it, exists. One that names none:
    no order exists, so no money moved."""
    body = response.json()
    named = (body.get("data") or {}).get("orderId") or (body.get("details") or {}).get("orderId")
    if named is None:
        assert response.status_code == 503, response.text
        assert body["error"] == "Service temporarily unavailable; no money moved", body
        assert placed == []
    else:
        assert placed == [named], (response.text, placed)


async def test_an_order_whose_connection_was_cut_mid_statement_is_answered_as_it_ended(
    database_url: str, provider: Provider
) -> None:
    """The network to the database fails while the order's statement waits on the server (here
    for a lock the test holds). The server does not notice, and would run the statement and
    commit once the lock is free. So the service must not look for the order before that
    statement has ended one way or the other: its answer agrees with what is stored."""
    async with relay(database_url) as path, start_service(path.url, provider.url) as api:
        await api.credit("C1", 100)
        holder = await asyncpg.connect(plain_url(database_url))
        watcher = await asyncpg.connect(plain_url(database_url))
        try:
            async with holder.transaction():
                await holder.execute("SELECT 1 FROM wallets WHERE client_id = 'C1' FOR UPDATE")
                order = asyncio.create_task(api.order("C1", 30))
                await cut_once_it_waits(watcher, path, order)
            # The lock is released: a statement still alive goes on and commits.
            response = await order
            placed = [row["order_id"] for row in await watcher.fetch("SELECT order_id FROM orders")]
        finally:
            await holder.close()
            await watcher.close()
        assert_answer_agrees(response, placed)
        if not placed:
            await assert_held(api, "C1", 100, 0)


async def test_an_order_whose_statement_was_still_in_flight_when_the_connection_broke_never_lands_late(
    database_url: str, provider: Provider
) -> None:
    """The connection breaks while the placement's bytes are still in the network: the server
    has not read them, so it shows nothing running, and they may still arrive once the service
    has looked. The service must make sure they never run before it says no money moved."""
    async with relay(database_url) as path, start_service(path.url, provider.url) as api:
        await api.credit("C1", 100)
        path.strand(b"ORD-")  # the placement carries the new order's id; nothing before it does
        response = await api.order("C1", 30)
        assert path.stranded.is_set()
        await path.deliver()  # the stranded bytes arrive: they must find nothing to run on
        conn = await asyncpg.connect(plain_url(database_url))
        try:
            placed = [row["order_id"] for row in await conn.fetch("SELECT order_id FROM orders")]
        finally:
            await conn.close()
        assert_answer_agrees(response, placed)
        assert placed == []
        await assert_held(api, "C1", 100, 0)
