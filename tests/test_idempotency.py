"""Idempotency-Key: a retried request never moves money twice (SPEC §5)."""

from __future__ import annotations

import asyncio
import json
import uuid
from decimal import Decimal

import asyncpg
import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.builders import ADMIN_KEY, Api, Provider, spell_amount, start_service
from wallet import idempotency
from wallet.database import create_engine, plain_url


def key(value: str) -> dict[str, str]:
    return {"Idempotency-Key": value}


async def credit_with_key(api: Api, client_id: str, amount: float, idem: str) -> httpx.Response:
    return await api.http.post(
        "/admin/wallet/credit",
        json={"client_id": client_id, "amount": amount},
        headers={**api.admin_headers, **key(idem)},
    )


async def ledger_count(database_url: str, client_id: str) -> int:
    conn = await asyncpg.connect(plain_url(database_url))
    try:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM ledger_entries WHERE client_id = $1", client_id
        )
        return count
    finally:
        await conn.close()


async def test_replayed_credit_returns_the_stored_answer_and_moves_nothing(
    database_url: str, provider: Provider
) -> None:
    async with start_service(database_url, provider.url) as api:
        first = await credit_with_key(api, "C1", 100, "credit-1")
        again = await credit_with_key(api, "C1", 100, "credit-1")
        assert first.status_code == again.status_code == 200
        assert again.content == first.content
        assert again.headers["Idempotent-Replayed"] == "true"
        assert "Idempotent-Replayed" not in first.headers
        assert await api.balance("C1") == Decimal(100)
        assert await ledger_count(database_url, "C1") == 1


async def test_same_key_with_another_body_is_422_and_moves_nothing(
    database_url: str, provider: Provider
) -> None:
    async with start_service(database_url, provider.url) as api:
        assert (await credit_with_key(api, "C1", 100, "k")).status_code == 200
        other = await credit_with_key(api, "C1", 101, "k")
        assert other.status_code == 422
        assert other.json()["code"] == "IDEMPOTENCY_KEY_REUSED"
        debit = await api.http.post(
            "/admin/wallet/debit",
            json={"client_id": "C1", "amount": 100},
            headers={**api.admin_headers, **key("k")},
        )
        assert debit.status_code == 422
        assert await api.balance("C1") == Decimal(100)


async def test_the_admin_s_key_is_one_scope_across_clients(database_url: str, provider: Provider) -> None:
    """Admin records are placed by their key, not by the client they credit: reusing a key for
    another client is the same key with another body."""
    async with start_service(database_url, provider.url) as api:
        assert (await credit_with_key(api, "C1", 100, "k")).status_code == 200
        other = await credit_with_key(api, "C2", 100, "k")
        assert other.status_code == 422
        assert other.json()["code"] == "IDEMPOTENCY_KEY_REUSED"
        again = await credit_with_key(api, "C1", 100, "k")
        assert again.headers["Idempotent-Replayed"] == "true"
        assert await api.balance("C1") == Decimal(100)


async def test_keys_are_scoped_per_caller(database_url: str, provider: Provider) -> None:
    async with start_service(database_url, provider.url) as api:
        await api.credit("A", 100)
        await api.credit("B", 100)
        a = await api.order("A", 10, headers=key("shared"))
        b = await api.order("B", 10, headers=key("shared"))
        assert a.status_code == b.status_code == 201
        assert a.json()["data"]["orderId"] != b.json()["data"]["orderId"]
        assert "Idempotent-Replayed" not in b.headers
        # "admin" is a caller of its own: the same key on a credit is a new request.
        assert (await credit_with_key(api, "A", 5, "shared")).status_code == 200
        assert await api.balance("A") == Decimal(95)
        assert await api.balance("B") == Decimal(90)


async def test_no_client_id_can_share_keys_with_the_admin_or_another_client(
    database_url: str, provider: Provider
) -> None:
    """Client ids that spell the admin's scope, or another client's scope, still get scopes of
    their own: nobody can replay or block anybody else's request."""
    # "admin:shared" also shares its records' tenant with the admin's key "shared" (0007).
    lookalikes = ["admin", "client:admin", "client", "client:", "client:client:admin", "admin:shared"]
    async with start_service(database_url, provider.url) as api:
        for n, client in enumerate(lookalikes):
            assert (await credit_with_key(api, client, 100, f"setup-{n}")).status_code == 200
        assert (await credit_with_key(api, "admin", 1, "shared")).status_code == 200
        for client in lookalikes:
            order = await api.order(client, 10, headers=key("shared"))
            assert order.status_code == 201, (client, order.text)
            assert "Idempotent-Replayed" not in order.headers
        again = await credit_with_key(api, "admin", 1, "shared")
        assert again.headers["Idempotent-Replayed"] == "true"
        assert await api.balance("admin") == Decimal(91)
        for client in lookalikes[1:]:
            assert await api.balance(client) == Decimal(90)


async def test_refused_request_leaves_the_key_free(database_url: str, provider: Provider) -> None:
    async with start_service(database_url, provider.url) as api:
        await api.credit("C1", 10)
        refused = await api.order("C1", 50, headers=key("retry-me"))
        assert refused.status_code == 400
        assert refused.json()["code"] == "INSUFFICIENT_FUNDS"
        await api.credit("C1", 40)
        accepted = await api.order("C1", 50, headers=key("retry-me"))
        assert accepted.status_code == 201
        assert "Idempotent-Replayed" not in accepted.headers
        assert await api.balance("C1") == Decimal(0)


async def test_invalid_keys_are_rejected(database_url: str, provider: Provider) -> None:
    async with start_service(database_url, provider.url) as api:
        await api.credit("C1", 10)
        for bad in ["x" * 256, "clé-non-ascii"]:
            response = await api.http.post(
                "/orders",
                json={"amount": 1},
                headers=[(b"client-id", b"C1"), (b"Idempotency-Key", bad.encode())],
            )
            assert response.status_code == 400, bad
            assert response.json()["success"] is False
        assert await api.balance("C1") == Decimal(10)


async def test_ten_concurrent_credits_with_one_key_move_money_once(
    database_url: str, provider: Provider
) -> None:
    async with start_service(database_url, provider.url) as api:
        responses = await asyncio.gather(*(credit_with_key(api, "C1", 25, "burst") for _ in range(10)))
        statuses = sorted(r.status_code for r in responses)
        assert set(statuses) <= {200, 409}
        originals = [r for r in responses if r.status_code == 200 and "Idempotent-Replayed" not in r.headers]
        assert len(originals) == 1
        for r in responses:
            if r.status_code == 200:
                assert r.content == originals[0].content
        assert await api.balance("C1") == Decimal(25)
        assert await ledger_count(database_url, "C1") == 1


async def test_order_retry_while_fulfilling_is_409_then_replays_the_final_answer(
    database_url: str, provider: Provider
) -> None:
    gate = asyncio.Event()
    provider.set(gate=gate)
    async with start_service(database_url, provider.url) as api:
        await api.credit("C1", 100)
        first = asyncio.create_task(api.order("C1", 30, headers=key("order-1")))
        await provider.simulator.wait_for_calls(1)
        concurrent = await asyncio.gather(*(api.order("C1", 30, headers=key("order-1")) for _ in range(9)))
        assert [r.status_code for r in concurrent] == [409] * 9
        assert all(r.json()["code"] == "IDEMPOTENCY_IN_PROGRESS" for r in concurrent)
        gate.set()
        done = await first
        assert done.status_code == 201
        replay = await api.order("C1", 30, headers=key("order-1"))
        assert replay.status_code == 201
        assert replay.content == done.content
        assert replay.headers["Idempotent-Replayed"] == "true"
        assert len(provider.simulator.calls) == 1
        assert await api.balance("C1") == Decimal(70)


async def test_failed_order_replays_its_502_without_a_second_refund(
    database_url: str, provider: Provider
) -> None:
    provider.set(error_status=400)
    async with start_service(database_url, provider.url) as api:
        await api.credit("C1", 100)
        failed = await api.order("C1", 30, headers=key("order-x"))
        assert failed.status_code == 502
        assert failed.json()["data"]["status"] == "FAILED"
        provider.set()  # the provider works again; a replay must still not place a new order
        replay = await api.order("C1", 30, headers=key("order-x"))
        assert (replay.status_code, replay.content) == (502, failed.content)
        assert await api.balance("C1") == Decimal(100)
        assert await ledger_count(database_url, "C1") == 3  # credit, deduction, refund


async def expire_and_purge(database_url: str) -> tuple[int, int]:
    """Every key past its expiry, then the purge job: (keys it purged, keys left)."""
    conn = await asyncpg.connect(plain_url(database_url))
    engine = create_engine(database_url, pool_size=1)
    try:
        await conn.execute("UPDATE idempotency_keys SET expires_at = now() - interval '1 second'")
        purged = await idempotency.purge_expired(engine)
        return purged, await conn.fetchval("SELECT count(*) FROM idempotency_keys")
    finally:
        await engine.dispose()
        await conn.close()


async def test_expired_keys_are_purged_and_then_free(database_url: str, provider: Provider) -> None:
    async with start_service(database_url, provider.url) as api:
        assert (await credit_with_key(api, "C1", 10, "old")).status_code == 200
        assert await expire_and_purge(database_url) == (1, 0)
        again = await credit_with_key(api, "C1", 10, "old")
        assert again.status_code == 200
        assert "Idempotent-Replayed" not in again.headers
        assert await api.balance("C1") == Decimal(20)


async def test_an_order_key_keeps_only_its_order_and_is_purged_too(
    database_url: str, provider: Provider
) -> None:
    """No answer is stored under an order's key: the replay is answered from the order, and past
    its expiry the key is purged like any."""
    async with start_service(database_url, provider.url) as api:
        await api.credit("C1", 100)
        placed = await api.order("C1", 30, headers=key("only-the-order"))
        assert placed.status_code == 201
        conn = await asyncpg.connect(plain_url(database_url))
        try:
            kept = await conn.fetch("SELECT order_id, result, response_status FROM idempotency_keys")
        finally:
            await conn.close()
        assert [tuple(row) for row in kept] == [(placed.json()["data"]["orderId"], None, None)]
        replay = await api.order("C1", 30, headers=key("only-the-order"))
        assert (replay.status_code, replay.content) == (201, placed.content)
        assert await expire_and_purge(database_url) == (1, 0)
        assert await api.balance("C1") == Decimal(70)


async def test_a_movement_is_kept_under_its_key_and_replayed_from_it(
    database_url: str, provider: Provider
) -> None:
    """The record keeps the movement, not the answer's bytes; the replay renders it to the same
    bytes. A record kept as bytes (before migration 0013) replays those bytes as they are."""
    async with start_service(database_url, provider.url) as api:
        await api.credit("C1", 100)
        first = await api.http.post(
            "/admin/wallet/debit",
            json={"client_id": "C1", "amount": 12.5},
            headers={**api.admin_headers, **key("d")},
        )
        assert first.status_code == 200, first.text
        await credit_with_key(api, "C1", 5, "legacy")
        conn = await asyncpg.connect(plain_url(database_url))
        try:
            kept = await conn.fetchval("SELECT result FROM idempotency_keys WHERE key = 'd'")
            legacy = b'{"success":true,"message":"kept as bytes","data":{}}'
            await conn.execute(
                "UPDATE idempotency_keys SET result = NULL, response_status = 200, response_body = $1"
                " WHERE key = 'legacy'",
                legacy,
            )
        finally:
            await conn.close()
        assert {name: value for name, value in json.loads(kept).items() if name != "created_at"} == {
            "client_id": "C1",
            "balance_before": 10000,
            "balance_after": 8750,
            "amount": 1250,
        }
        again = await api.http.post(
            "/admin/wallet/debit",
            json={"client_id": "C1", "amount": 12.5},
            headers={**api.admin_headers, **key("d")},
        )
        assert (again.status_code, again.content) == (200, first.content)
        assert again.headers["Idempotent-Replayed"] == "true"
        old = await credit_with_key(api, "C1", 5, "legacy")
        assert (old.status_code, old.content) == (200, legacy)
        assert old.headers["Idempotent-Replayed"] == "true"
        assert await api.balance("C1") == Decimal("92.5")


async def test_unpurged_expired_key_counts_as_new(database_url: str, provider: Provider) -> None:
    async with start_service(database_url, provider.url) as api:
        assert (await credit_with_key(api, "C1", 10, "stale")).status_code == 200
        conn = await asyncpg.connect(plain_url(database_url))
        try:
            await conn.execute("UPDATE idempotency_keys SET expires_at = now() - interval '1 second'")
        finally:
            await conn.close()
        again = await credit_with_key(api, "C1", 11, "stale")
        assert again.status_code == 200
        assert await api.balance("C1") == Decimal(21)


# --- A retry is the same request when it means the same thing, however its JSON is spelled. ---

TEN = ["10", "10.0", "1e1", "10.00", "1.0E1", "100e-1", "0.001e4", "1000e-2", "10." + "0" * 30]
SPELLINGS = st.one_of(
    st.sampled_from(TEN),
    st.builds(
        spell_amount,
        st.just(1000),
        st.integers(min_value=0, max_value=30),
        st.integers(min_value=-30, max_value=20),
    ),
)
ROUTES = {
    "credit": ("/admin/wallet/credit", '{{"client_id": "{client}", "amount": {amount}{extra}}}'),
    "debit": ("/admin/wallet/debit", '{{"amount": {amount}, "client_id": "{client}"{extra}}}'),
    "order": ("/orders", '{{"amount": {amount}{extra}}}'),
}
ADMIN_JSON = {"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"}


def retries_of_one_request(
    http: httpx.Client, route: str, first: str, retries: list[str], null_description: bool
) -> None:
    """Ten (in `first`'s spelling) under a key, then the same in other spellings: each retry
    replays; another amount or description under the key is 422; the money moved once."""
    client = f"i{uuid.uuid4().hex[:12]}"
    seed = http.post("/admin/wallet/credit", json={"client_id": client, "amount": 100}, headers=ADMIN_JSON)
    assert seed.status_code == 200, seed.text
    path, template = ROUTES[route]
    headers = {**ADMIN_JSON, "client-id": client, "Idempotency-Key": uuid.uuid4().hex}

    def post(amount: str, extra: str = "") -> httpx.Response:
        body = template.format(client=client, amount=amount, extra=extra)
        return http.post(path, content=body.encode(), headers=headers)

    original = post(first)
    assert original.status_code in (200, 201), original.text
    for n, spelling in enumerate(retries):
        # An absent description and a null one mean the same (orders have none).
        null = null_description and route != "order" and n % 2 == 1
        again = post(spelling, ', "description": null' if null else "")
        assert again.headers.get("Idempotent-Replayed") == "true", (first, spelling, again.text)
        assert (again.status_code, again.content) == (original.status_code, original.content)
    for other in ["10.01", "1.001e1", "11", "1e0"]:
        refused = post(other)
        assert refused.status_code == 422, (other, refused.text)
        assert refused.json()["code"] == "IDEMPOTENCY_KEY_REUSED"
    if route != "order":
        refused = post(first, ', "description": "changed"')
        assert refused.status_code == 422, refused.text
    balance = http.get("/wallet/balance", headers={"client-id": client}).json()["data"]["balance"]
    assert balance == 100 + (10 if route == "credit" else -10)


async def test_any_spelling_of_the_same_request_replays(database_url: str, provider: Provider) -> None:
    async with start_service(database_url, provider.url) as api:
        base = str(api.http.base_url)

        def run() -> None:
            with httpx.Client(base_url=base, timeout=30) as http:

                @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
                @given(
                    route=st.sampled_from(sorted(ROUTES)),
                    first=SPELLINGS,
                    retries=st.lists(SPELLINGS, min_size=1, max_size=4),
                    null_description=st.booleans(),
                )
                def same_meaning(route: str, first: str, retries: list[str], null_description: bool) -> None:
                    retries_of_one_request(http, route, first, retries, null_description)

                same_meaning()

        await asyncio.to_thread(run)


async def test_records_keep_a_fractional_ttl(database_url: str, provider: Provider) -> None:
    """IDEMPOTENCY_TTL_HOURS is a number of hours, not a whole one: a credit's record and an
    order's (claimed in the order batch) both live exactly that long."""
    async with start_service(database_url, provider.url, idempotency_ttl_hours=24.5) as api:
        assert (await credit_with_key(api, "C1", 10, "credit")).status_code == 200
        assert (await api.order("C1", 3, headers=key("order"))).status_code == 201
        conn = await asyncpg.connect(plain_url(database_url))
        try:
            lives = await conn.fetch(
                "SELECT key, extract(epoch FROM expires_at - created_at) AS s FROM idempotency_keys"
            )
        finally:
            await conn.close()
        assert sorted((row["key"], float(row["s"])) for row in lives) == [
            ("credit", 24.5 * 3600),
            ("order", 24.5 * 3600),
        ]
