"""Webhook endpoints and delivery (SPEC §6), end to end: the service, a real receiver on
loopback, signatures checked with the `standardwebhooks` library as a receiver would."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from tests.builders import (
    BAD_PAGING,
    Api,
    Commits,
    Delivery,
    Provider,
    Receiver,
    all_pages,
    free_port,
    start_receiver,
    start_service,
)
from wallet.database import plain_url

FAST = {
    "webhook_allow_private": True,
    "webhook_interval_seconds": 0.05,
    "webhook_retry_schedule": (0.05,) * 5,
    "webhook_timeout_seconds": 2.0,
}


@contextlib.asynccontextmanager
async def service(database_url: str, provider: Provider, **overrides: Any) -> AsyncIterator[Api]:
    async with start_service(database_url, provider.url, **{**FAST, **overrides}) as api:
        yield api


async def register(api: Api, url: str, client_id: str | None = "C1", **body: Any) -> dict[str, Any]:
    """As the client itself, or as the admin when client_id is None (a global endpoint)."""
    if client_id is None:
        response = await api.http.post(
            "/admin/webhook-endpoints", json={"url": url, **body}, headers=api.admin_headers
        )
    else:
        response = await api.http.post(
            "/webhook-endpoints", json={"url": url, **body}, headers={"client-id": client_id}
        )
    assert response.status_code == 201, response.text
    data: dict[str, Any] = response.json()["data"]
    return data


def verify(delivery: Delivery, secret: str) -> dict[str, Any]:
    event: dict[str, Any] = Webhook(secret).verify(delivery.body, delivery.headers)
    return event


async def test_deliveries_are_signed_per_standard_webhooks(database_url: str, provider: Provider) -> None:
    async with start_receiver() as receiver, service(database_url, provider) as api:
        await api.credit("C1", 10)
        endpoint = await register(api, receiver.url)
        assert endpoint["secret"].startswith("whsec_")
        assert endpoint["clientId"] == "C1"
        await api.debit("C1", 2.5)
        await receiver.arrived(1)
        delivery = receiver.got[0]
        event = verify(delivery, endpoint["secret"])
        assert delivery.headers["webhook-id"] == event["id"]
        assert event["type"] == "wallet.debited"
        assert event["data"] == {
            "clientId": "C1",
            "previousBalance": 10,
            "newBalance": 7.5,
            "amountDebited": 2.5,
        }
        listed = (await api.http.get("/webhook-endpoints", headers={"client-id": "C1"})).json()["data"]
        assert "secret" not in listed[0]
        with pytest.raises(WebhookVerificationError):
            Webhook(endpoint["secret"]).verify(delivery.body.replace(b"7.5", b"8.5"), delivery.headers)
        old = str(int(time.time()) - 600)
        stale = {**delivery.headers, "webhook-timestamp": old}
        stale["webhook-signature"] = Webhook(endpoint["secret"]).sign(
            event["id"], datetime.fromtimestamp(int(old), UTC), delivery.body.decode()
        )
        with pytest.raises(WebhookVerificationError, match="too old"):
            Webhook(endpoint["secret"]).verify(delivery.body, stale)


async def test_a_receiver_down_then_up_gets_every_event(
    database_url: str, commits: Commits, provider: Provider
) -> None:
    port = free_port()
    async with service(database_url, provider) as api:
        await api.credit("C1", 100)
        endpoint = await register(api, f"http://127.0.0.1:{port}/hook")
        for _ in range(5):
            await api.debit("C1", 1)
        log_path = f"/webhook-endpoints/{endpoint['id']}/deliveries"

        async def refused_a_few() -> bool:
            attempts = (await api.http.get(log_path, headers={"client-id": "C1"})).json()["data"]
            return len(attempts) >= 5 and all(a["statusCode"] is None and a["error"] for a in attempts)

        await commits.until(refused_a_few, what="failed attempts while the receiver is down")
        async with start_receiver(port=port) as receiver:
            await receiver.arrived(5)
            ids = {verify(d, endpoint["secret"])["id"] for d in receiver.got}
        events = (
            await api.http.get("/events", params={"type": "wallet.debited"}, headers={"client-id": "C1"})
        ).json()
        assert ids == {e["id"] for e in events["data"]}


async def test_an_order_pending_then_completed_is_told_in_order_to_its_client_only(
    database_url: str, commits: Commits, provider: Provider
) -> None:
    provider.set(error_status=503)
    async with (
        start_receiver() as mine,
        start_receiver() as theirs,
        service(database_url, provider, fulfillment_max_attempts=1) as api,
    ):
        await api.credit("C1", 100)
        await api.credit("C2", 100)
        await register(api, mine.url, eventTypes=["order.pending", "order.completed"])
        await register(api, theirs.url, client_id="C2")
        await api.debit("C2", 1)
        response = await api.order("C1", 10)
        assert response.status_code == 202
        provider.set()
        await api.settled(commits, "C1", response.json()["data"]["orderId"])
        await mine.arrived(2)
        assert mine.types() == ["order.pending", "order.completed"]
        assert [e["data"]["status"] for e in mine.events()] == ["PENDING", "COMPLETED"]
        await theirs.arrived(1)
        assert {e["clientId"] for e in theirs.events()} == {"C2"}


async def test_410_disables_the_endpoint_with_an_event(
    database_url: str, commits: Commits, provider: Provider
) -> None:
    async with (
        start_receiver(Receiver(answers=[410])) as gone,
        start_receiver() as other,
        service(database_url, provider) as api,
    ):
        await api.credit("C1", 10)
        endpoint = await register(api, gone.url)
        await register(api, other.url, eventTypes=["webhook_endpoint.disabled"])
        await api.debit("C1", 1)

        async def disabled() -> bool:
            got = await api.http.get(f"/webhook-endpoints/{endpoint['id']}", headers={"client-id": "C1"})
            return got.json()["data"]["enabled"] is False

        await commits.until(disabled, what="the endpoint disabled")
        await other.arrived(1)
        assert other.events()[0]["data"]["id"] == endpoint["id"]
        assert other.events()[0]["data"]["disabledReason"] == "answered 410 Gone"
        await api.debit("C1", 1)
        await other.arrived(1)
        assert len(gone.got) == 1


async def test_an_endpoint_failing_every_retry_is_disabled(
    database_url: str, commits: Commits, provider: Provider
) -> None:
    async with (
        start_receiver(Receiver(answers=[500] * 100)) as failing,
        service(database_url, provider) as api,
    ):
        await api.credit("C1", 10)
        endpoint = await register(api, failing.url)
        await api.debit("C1", 1)

        async def disabled() -> bool:
            got = await api.http.get(f"/webhook-endpoints/{endpoint['id']}", headers={"client-id": "C1"})
            return got.json()["data"]["enabled"] is False

        await commits.until(disabled, what="the endpoint disabled")
        assert len(failing.got) == 1 + len(FAST["webhook_retry_schedule"])  # type: ignore[arg-type]
        log = await api.http.get(
            f"/webhook-endpoints/{endpoint['id']}/deliveries", headers={"client-id": "C1"}
        )
        assert [a["statusCode"] for a in log.json()["data"]] == [500] * 6
        assert len(log.json()["data"][0]["responseBody"]) == 1024  # truncated


async def test_retry_after_is_honoured(database_url: str, provider: Provider) -> None:
    receiver = Receiver(answers=[503], answer_headers={"Retry-After": "1"})
    async with start_receiver(receiver), service(database_url, provider) as api:
        await api.credit("C1", 10)
        await register(api, receiver.url)
        await api.debit("C1", 1)
        await receiver.arrived(2)
        assert receiver.got[1].at - receiver.got[0].at >= 1.0  # the schedule alone says 0.05 s
        assert receiver.got[0].headers["webhook-id"] == receiver.got[1].headers["webhook-id"]


async def test_a_rotated_secret_and_the_old_one_both_verify(database_url: str, provider: Provider) -> None:
    async with start_receiver() as receiver, service(database_url, provider) as api:
        await api.credit("C1", 10)
        endpoint = await register(api, receiver.url)
        rotated = await api.http.post(
            f"/webhook-endpoints/{endpoint['id']}/rotate-secret", headers={"client-id": "C1"}
        )
        new_secret = rotated.json()["data"]["secret"]
        assert new_secret != endpoint["secret"]
        await api.debit("C1", 1)
        await receiver.arrived(1)
        assert len(receiver.got[0].headers["webhook-signature"].split(" ")) == 2
        assert verify(receiver.got[0], endpoint["secret"]) == verify(receiver.got[0], new_secret)


async def test_type_filters_global_endpoints_and_isolation(database_url: str, provider: Provider) -> None:
    async with (
        start_receiver() as credits_only,
        start_receiver() as everyone,
        service(database_url, provider) as api,
    ):
        await api.credit("C1", 10)
        await api.credit("C2", 10)
        mine = await register(api, credits_only.url, eventTypes=["wallet.credited"])
        await register(api, everyone.url, client_id=None)
        await api.debit("C1", 1)
        await api.credit("C1", 1)
        await api.debit("C2", 1)
        await everyone.arrived(3)
        await credits_only.arrived(1)
        assert credits_only.types() == ["wallet.credited"]
        assert {(e["clientId"], e["type"]) for e in everyone.events()} == {
            ("C1", "wallet.debited"),
            ("C1", "wallet.credited"),
            ("C2", "wallet.debited"),
        }
        assert credits_only.events()[0]["clientId"] == "C1"
        for path in ("", "/deliveries", "/rotate-secret"):
            method = "POST" if path == "/rotate-secret" else "GET"
            other = await api.http.request(
                method, f"/webhook-endpoints/{mine['id']}{path}", headers={"client-id": "C2"}
            )
            assert other.status_code == 404
        assert (await api.http.get("/webhook-endpoints", headers={"client-id": "C2"})).json()["data"] == []
        deleted = await api.http.delete(f"/webhook-endpoints/{mine['id']}", headers={"client-id": "C2"})
        assert deleted.status_code == 404


async def test_replay_one_event_or_every_failed_one(
    database_url: str, commits: Commits, provider: Provider
) -> None:
    receiver = Receiver(answers=[500] * 1000)
    async with start_receiver(receiver), service(database_url, provider) as api:
        await api.credit("C1", 10)
        endpoint = await register(api, receiver.url, eventTypes=["wallet.debited"])  # not its own disabling
        await api.debit("C1", 1)
        await api.debit("C1", 2)
        path = f"/webhook-endpoints/{endpoint['id']}"
        await commits.until(lambda: _enabled(api, path, False), what="disabled after failing")
        receiver.answers.clear()
        before = len(receiver.got)
        enabled = await api.http.patch(path, json={"enabled": True}, headers={"client-id": "C1"})
        assert enabled.json()["data"]["enabled"] is True
        since = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
        replayed = await api.http.post(f"{path}/replay", json={"since": since}, headers={"client-id": "C1"})
        assert replayed.json()["data"] == {"replayed": 2}
        debits = await api.http.get("/events", params={"type": "wallet.debited"}, headers={"client-id": "C1"})
        wanted = {e["id"] for e in debits.json()["data"]}

        await receiver.wait_for(
            lambda: wanted <= {d.headers["webhook-id"] for d in receiver.got[before:]},
            what="both failed events delivered again",
        )
        again = receiver.got[-1].headers["webhook-id"]
        before = len(receiver.got)
        one = await api.http.post(f"{path}/replay", json={"eventId": again}, headers={"client-id": "C1"})
        assert one.json()["data"] == {"replayed": 1}
        await receiver.arrived(before + 1)
        assert receiver.got[-1].headers["webhook-id"] == again
        nothing = await api.http.post(f"{path}/replay", json={"since": since}, headers={"client-id": "C1"})
        assert nothing.json()["data"] == {"replayed": 0}
        both = await api.http.post(
            f"{path}/replay", json={"since": since, "eventId": again}, headers={"client-id": "C1"}
        )
        assert both.status_code == 400


async def test_events_of_a_disabled_endpoint_are_sent_by_a_replay_since_once_it_is_enabled(
    database_url: str, commits: Commits, provider: Provider
) -> None:
    """The recovery the README gives (fix the receiver, enable, replay since): the events made
    while the endpoint was off are among the failed ones, dated when they failed."""
    receiver = Receiver()
    async with start_receiver(receiver), service(database_url, provider) as api:
        await api.credit("C1", 10)
        endpoint = await register(api, receiver.url)
        path = f"/webhook-endpoints/{endpoint['id']}"
        since = datetime.now(UTC).isoformat()
        off = await api.http.patch(path, json={"enabled": False}, headers={"client-id": "C1"})
        assert off.json()["data"]["enabled"] is False
        await api.debit("C1", 1)
        await api.debit("C1", 2)

        async def missed() -> bool:
            conn = await asyncpg.connect(plain_url(database_url))
            try:
                failed = await conn.fetchval(
                    "SELECT count(*) FROM webhook_deliveries WHERE endpoint_id = $1 AND status = 'FAILED'",
                    endpoint["id"],
                )
            finally:
                await conn.close()
            return bool(failed == 2)

        await commits.until(missed, what="the disabled endpoint's deliveries made, failed")
        assert receiver.got == []
        await api.http.patch(path, json={"enabled": True}, headers={"client-id": "C1"})
        replayed = await api.http.post(f"{path}/replay", json={"since": since}, headers={"client-id": "C1"})
        assert replayed.json()["data"] == {"replayed": 2}
        await receiver.arrived(2)
        assert sorted(e["data"]["amountDebited"] for e in receiver.events()) == [1, 2]


async def test_a_receiver_that_hangs_holds_up_no_other_endpoint(
    database_url: str, provider: Provider
) -> None:
    """Each endpoint's deliveries are a task of their own: one receiver that never answers (here
    until the test ends, far inside its 60 s timeout) delays only its own events."""
    hanging = Receiver(gate=asyncio.Event())
    healthy = Receiver()
    async with (
        start_receiver(hanging),
        start_receiver(healthy),
        service(database_url, provider, webhook_timeout_seconds=60.0) as api,
    ):
        await api.credit("C1", 10)
        await api.credit("C2", 10)
        await register(api, hanging.url, client_id="C1")
        await register(api, healthy.url, client_id="C2")
        await api.debit("C1", 1)
        await hanging.arrived(1)  # at the receiver, unanswered
        await api.debit("C2", 2)
        await healthy.wait_for(lambda: len(healthy.got) == 1, within=20, what="the healthy endpoint's event")
        assert [e["data"]["amountDebited"] for e in healthy.events()] == [2]
        assert not hanging.gate.is_set()  # type: ignore[union-attr]
        hanging.gate.set()  # type: ignore[union-attr]


async def test_an_event_replays_only_to_an_endpoint_that_subscribes_to_its_type(
    database_url: str, provider: Provider
) -> None:
    """A replay is a delivery again, not a new subscription: an endpoint that never takes
    wallet.debited is not sent one by replaying it (404, as an event the endpoint never had)."""
    async with start_receiver() as receiver, service(database_url, provider) as api:
        await api.credit("C1", 10)
        await api.debit("C1", 1)
        endpoint = await register(api, receiver.url, eventTypes=["wallet.credited"])
        events = (await api.http.get("/events", headers={"client-id": "C1"})).json()["data"]
        by_type = {e["type"]: e["id"] for e in events}
        path = f"/webhook-endpoints/{endpoint['id']}/replay"
        refused = await api.http.post(
            path, json={"eventId": by_type["wallet.debited"]}, headers={"client-id": "C1"}
        )
        assert (refused.status_code, refused.json()["code"]) == (404, "EVENT_NOT_FOUND")
        taken = await api.http.post(
            path, json={"eventId": by_type["wallet.credited"]}, headers={"client-id": "C1"}
        )
        assert taken.json()["data"] == {"replayed": 1}
        await receiver.arrived(1)
        assert receiver.types() == ["wallet.credited"]


async def _enabled(api: Api, path: str, expected: bool) -> bool:
    got = await api.http.get(path, headers={"client-id": "C1"})
    return bool(got.json()["data"]["enabled"] is expected)


async def test_a_global_endpoint_disabled_is_an_operator_event_no_client_sees(
    database_url: str, commits: Commits, provider: Provider
) -> None:
    async with (
        start_receiver(Receiver(answers=[500] * 100)) as failing,
        start_receiver() as operators,
        start_receiver() as client_side,
        service(database_url, provider) as api,
    ):
        await api.credit("C1", 10)
        endpoint = await register(api, failing.url, client_id=None, eventTypes=["wallet.debited"])
        await register(api, operators.url, client_id=None, eventTypes=["webhook_endpoint.disabled"])
        await register(api, client_side.url, eventTypes=["webhook_endpoint.disabled", "wallet.debited"])
        await api.debit("C1", 1)
        path = f"/admin/webhook-endpoints/{endpoint['id']}"

        async def disabled() -> bool:
            got = await api.http.get(path, headers=api.admin_headers)
            return got.json()["data"]["enabled"] is False

        await commits.until(disabled, what="the global endpoint disabled after failing its whole schedule")
        await operators.arrived(1)
        told = operators.events()[0]
        assert told["type"] == "webhook_endpoint.disabled"
        assert told["clientId"] is None
        assert told["data"]["id"] == endpoint["id"]
        assert told["data"]["clientId"] is None
        assert told["data"]["disabledReason"] == "failed every delivery for the whole retry schedule"
        admin_feed = await api.http.get(
            "/admin/events", params={"type": "webhook_endpoint.disabled"}, headers=api.admin_headers
        )
        assert [e["id"] for e in admin_feed.json()["data"]] == [told["id"]]
        own = await api.http.get(
            "/events", params={"type": "webhook_endpoint.disabled"}, headers={"client-id": "C1"}
        )
        assert own.json()["data"] == []
        # The client's endpoint got its debit but never the operators' event. A later event
        # proves the fan-out of the disable event is behind us.
        await api.debit("C1", 1)
        await client_side.arrived(2)
        assert client_side.types() == ["wallet.debited", "wallet.debited"]


async def test_endpoint_lists_and_the_delivery_log_are_keyset_paged(
    database_url: str, commits: Commits, provider: Provider
) -> None:
    async with start_receiver() as receiver, service(database_url, provider) as api:
        await api.credit("C1", 10)
        await api.credit("C2", 10)
        mine = [(await register(api, f"{receiver.url}/{n}"))["id"] for n in range(5)]
        theirs = (await register(api, receiver.url, client_id="C2"))["id"]
        global_ = (await register(api, receiver.url, client_id=None))["id"]
        client = {"client-id": "C1"}
        listed = await all_pages(api, "/webhook-endpoints", client, 2)
        assert [e["id"] for e in listed] == mine[::-1]  # newest first
        everyone = await all_pages(api, "/admin/webhook-endpoints", api.admin_headers, 3)
        assert [e["id"] for e in everyone] == [global_, theirs, *mine[::-1]]
        one_client = await all_pages(api, "/admin/webhook-endpoints", api.admin_headers, 1, clientId="C2")
        assert [e["id"] for e in one_client] == [theirs]
        for _ in range(3):
            await api.debit("C1", 1)
        log_path = f"/webhook-endpoints/{mine[0]}/deliveries"

        async def logged() -> bool:
            return len((await api.http.get(log_path, headers=client)).json()["data"]) == 3

        await commits.until(logged, what="three attempts in the delivery log")
        attempts = await all_pages(api, log_path, client, 2)
        assert len({a["id"] for a in attempts}) == 3
        assert [a["id"] for a in attempts] == sorted((a["id"] for a in attempts), reverse=True)
        admin_log = f"/admin/webhook-endpoints/{mine[0]}/deliveries"
        assert await all_pages(api, admin_log, api.admin_headers, 1) == attempts


@pytest.mark.parametrize("params", BAD_PAGING)
async def test_bad_paging_of_endpoints_and_the_delivery_log_is_400(
    database_url: str, provider: Provider, params: dict[str, str]
) -> None:
    async with service(database_url, provider) as api:
        await api.credit("C1", 1)
        endpoint = await register(api, "http://127.0.0.1:9/hook")
        for path, headers in (
            ("/webhook-endpoints", {"client-id": "C1"}),
            ("/admin/webhook-endpoints", api.admin_headers),
            (f"/webhook-endpoints/{endpoint['id']}/deliveries", {"client-id": "C1"}),
            (f"/admin/webhook-endpoints/{endpoint['id']}/deliveries", api.admin_headers),
        ):
            response = await api.http.get(path, params=params, headers=headers)
            assert response.status_code == 400, (path, params, response.text)
            assert response.json()["success"] is False
