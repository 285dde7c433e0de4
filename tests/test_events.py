"""Events (SPEC §6): written with the change they describe, in the shapes the API answers with,
never for a change that did not happen, immutable, readable by their client only."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from tests.builders import Api, Commits, Provider, start_service
from wallet.database import plain_url


async def feed(api: Api, client_id: str | None = None, **params: Any) -> list[dict[str, Any]]:
    """Every event the caller sees, oldest first (following nextCursor)."""
    path, headers = (
        ("/events", {"client-id": client_id}) if client_id else ("/admin/events", api.admin_headers)
    )
    found: list[dict[str, Any]] = []
    cursor = None
    while True:
        query = {**params, "limit": 2, **({"cursor": cursor} if cursor else {})}
        response = await api.http.get(path, params=query, headers=headers)
        assert response.status_code == 200, response.text
        body = response.json()
        found.extend(body["data"])
        cursor = body["nextCursor"]
        if cursor is None:
            return found[::-1]


async def test_movements_write_events_shaped_like_their_answers(
    database_url: str, provider: Provider
) -> None:
    async with start_service(database_url, provider.url) as api:
        credited = await api.credit("C1", 1000.5)
        debited = await api.debit("C1", 0.3)
        placed = await api.order("C1", 250)
        assert placed.status_code == 201
        order = (await api.get_order("C1", placed.json()["data"]["orderId"])).json()["data"]
        events = await feed(api, "C1")
        assert [e["type"] for e in events] == [
            "wallet.credited",
            "wallet.debited",
            "order.created",
            "order.completed",
        ]
        assert events[0]["data"] == credited.json()["data"]
        assert events[1]["data"] == debited.json()["data"]
        assert events[1]["data"]["newBalance"] == 1000.2
        assert events[2]["data"] == {
            **order,
            "status": "PENDING",
            "fulfillmentId": None,
            "updatedAt": order["createdAt"],
        }
        assert events[3]["data"] == order
        for event in events:
            assert event["id"].startswith("evt_")
            assert event["clientId"] == "C1"


async def test_a_refused_or_replayed_operation_writes_no_event(database_url: str, provider: Provider) -> None:
    async with start_service(database_url, provider.url) as api:
        await api.credit("C1", 10)
        assert (await api.order("C1", 11)).status_code == 400
        assert (await api.debit("C1", 11)).status_code == 400
        key = {"Idempotency-Key": "once"}
        first = await api.http.post(
            "/admin/wallet/debit", json={"client_id": "C1", "amount": 1}, headers={**api.admin_headers, **key}
        )
        again = await api.http.post(
            "/admin/wallet/debit", json={"client_id": "C1", "amount": 1}, headers={**api.admin_headers, **key}
        )
        assert again.headers["Idempotent-Replayed"] == "true"
        assert first.json() == again.json()
        assert [e["type"] for e in await feed(api, "C1")] == ["wallet.credited", "wallet.debited"]


async def test_each_client_sees_only_its_events_and_admins_filter(
    database_url: str, provider: Provider
) -> None:
    async with start_service(database_url, provider.url) as api:
        await api.credit("A", 5)
        await api.credit("B", 7)
        await api.debit("B", 1)
        assert [e["data"]["clientId"] for e in await feed(api, "A")] == ["A"]
        assert [e["type"] for e in await feed(api, "B", type="wallet.debited")] == ["wallet.debited"]
        assert len(await feed(api)) == 3
        assert [e["clientId"] for e in await feed(api, clientId="B")] == ["B", "B"]
        assert len(await feed(api, after="2000-01-01T00:00:00Z")) == 3
        assert await feed(api, "B", after="2999-01-01T00:00:00+01:00") == []
        bad = await api.http.get("/events", params={"type": "nope"}, headers={"client-id": "A"})
        assert bad.status_code == 400
        # A time is read by the one rule statements use: with its zone, or a 400.
        for after in ("2000-01-01T00:00:00", "0001-01-01T00:00:00+14:00", "noon"):
            bad = await api.http.get("/events", params={"after": after}, headers={"client-id": "A"})
            assert (bad.status_code, bad.json()["code"]) == (400, "INVALID_TIME")


async def test_balance_low_when_a_movement_crosses_the_threshold(
    database_url: str, provider: Provider
) -> None:
    async with start_service(database_url, provider.url) as api:
        await api.credit("C1", 100)
        path = "/admin/clients/C1/low-balance-threshold"
        assert (await api.http.put(path, json={"amount": 50.5}, headers=api.admin_headers)).status_code == 200
        profile = (await api.http.get("/admin/clients/C1", headers=api.admin_headers)).json()["data"]
        assert profile["lowBalanceThreshold"] == 50.5
        await api.debit("C1", 49.5)  # 50.5: not below
        await api.order("C1", 1)  # 49.5: crosses
        await api.debit("C1", 1)  # 48.5: already below, no second alert
        lows = await feed(api, "C1", type="balance.low")
        assert [e["data"] for e in lows] == [{"clientId": "C1", "balance": 49.5, "threshold": 50.5}]
        cleared = await api.http.put(path, json={"amount": None}, headers=api.admin_headers)
        assert cleared.json()["data"] == {"clientId": "C1", "lowBalanceThreshold": None}
        unknown = await api.http.put(
            "/admin/clients/nobody/low-balance-threshold", json={"amount": 1}, headers=api.admin_headers
        )
        assert unknown.status_code == 404


async def test_api_key_events_carry_no_secret(database_url: str, provider: Provider) -> None:
    async with start_service(database_url, provider.url) as api:
        await api.credit("C1", 1)
        issued = (await api.http.post("/admin/clients/C1/api-keys", headers=api.admin_headers)).json()["data"]
        for _ in range(2):  # revoking twice: one event
            await api.http.delete(f"/admin/clients/C1/api-keys/{issued['keyId']}", headers=api.admin_headers)
        keys = [e for e in await feed(api, "C1") if e["type"].startswith("api_key.")]
        assert [e["type"] for e in keys] == ["api_key.created", "api_key.revoked"]
        assert keys[0]["data"] == {
            "keyId": issued["keyId"],
            "clientId": "C1",
            "createdAt": issued["createdAt"],
        }
        assert issued["apiKey"] not in str(keys)


@pytest.mark.parametrize(
    "statement", ["UPDATE events SET type = 'order.failed'", "DELETE FROM events", "TRUNCATE events CASCADE"]
)
async def test_events_are_immutable_but_old_ones_can_be_purged(
    database_url: str, provider: Provider, statement: str
) -> None:
    async with start_service(database_url, provider.url) as api:
        await api.credit("C1", 1)
    conn = await asyncpg.connect(plain_url(database_url))
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(statement)
        async with conn.transaction():  # the purge's setting lets only events older than it go
            await conn.execute("SELECT set_config('wallet.events_retention_days', '1', true)")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute("DELETE FROM events")
        assert await conn.fetchval("SELECT count(*) FROM events") == 1
    finally:
        await conn.close()


@pytest.mark.parametrize("outcome", ["fulfilled", "failed"])
async def test_review_and_resolution_are_events(
    database_url: str, commits: Commits, provider: Provider, outcome: str
) -> None:
    from tests.test_resolver import flagged, resolve, stuck_orders

    async with stuck_orders(database_url, provider) as (api, [order_id]):
        await flagged(commits, api, order_id)
        body = {"outcome": outcome, "note": "checked"} | (
            {"fulfillmentId": "ff-1"} if outcome == "fulfilled" else {}
        )
        assert (await resolve(api, order_id, body)).status_code == 200
        order = (await api.get_order("C1", order_id)).json()["data"]
        events = [e for e in await feed(api, "C1") if e["type"].startswith("order.")]
        final = "order.completed" if outcome == "fulfilled" else "order.failed"
        assert [e["type"] for e in events] == [
            "order.created",
            "order.pending",
            "order.needs_review",
            final,
            "order.resolved",
        ]
        assert events[-1]["data"] == events[-2]["data"] == order


async def test_an_order_s_pending_event_is_stamped_when_it_is_written(
    database_url: str, provider: Provider
) -> None:
    """A client polling with `after=` the newest time it has seen must not miss the event that
    says its order is pending: that event is written after the provider's attempts, later than
    the order's creation."""
    provider.set(error_status=503, latency_seconds=0.05)
    async with start_service(database_url, provider.url, fulfillment_max_attempts=2) as api:
        await api.credit("C1", 100)
        created = await feed(api, "C1")
        response = await api.order("C1", 10)
        assert response.status_code == 202
        seen = [e for e in await feed(api, "C1") if e not in created]
        assert [e["type"] for e in seen] == ["order.created", "order.pending"]
        newer = await feed(api, "C1", after=seen[0]["createdAt"])
        assert [e["type"] for e in newer] == ["order.pending"]
