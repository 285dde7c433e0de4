"""The HTTP contract of the original service (SPEC §3): envelopes, status codes, bad input."""

from __future__ import annotations

import asyncio
import json
import re
from datetime import datetime
from decimal import Decimal
from typing import Any

import httpx
import pytest

from tests.builders import ADMIN_KEY, Api, Provider, raw_exchange, start_service

ORDER_ID = re.compile(r"^ORD-\d{13}-[0-9a-f]{8}$")


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    assert body["success"] is False
    assert isinstance(body["error"], str)
    assert body["error"]
    assert isinstance(body["code"], str)
    assert body["code"]
    if code is not None:
        assert body["code"] == code, body
    return body


def assert_iso(value: str) -> None:
    assert datetime.fromisoformat(value.replace("Z", "+00:00")).tzinfo is not None


async def raw_post(api: Api, path: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return await api.http.post(path, content=body, headers={"Content-Type": "application/json", **headers})


ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


async def test_success_envelopes_match_the_original(database_url: str, provider: Provider) -> None:
    async with start_service(database_url, provider.url) as api:
        credit = (await api.credit("CLIENT123", 1000.50, name="Acme", email="ops@acme.test")).json()
        assert credit == {
            "success": True,
            "message": "Wallet credited successfully",
            "data": {
                "clientId": "CLIENT123",
                "previousBalance": 0,
                "newBalance": 1000.5,
                "amountCredited": 1000.5,
            },
        }
        debit = (await api.debit("CLIENT123", 250)).json()
        assert debit["message"] == "Wallet debited successfully"
        assert debit["data"] == {
            "clientId": "CLIENT123",
            "previousBalance": 1000.5,
            "newBalance": 750.5,
            "amountDebited": 250,
        }
        created = await api.order("CLIENT123", 99.99)
        assert created.status_code == 201
        body = created.json()
        assert body["success"] is True
        assert body["message"] == "Order created successfully"
        order = body["data"]
        assert set(order) == {"orderId", "amount", "status", "fulfillmentId", "createdAt"}
        assert ORDER_ID.match(order["orderId"])
        assert (order["amount"], order["status"]) == (99.99, "COMPLETED")
        assert isinstance(order["fulfillmentId"], str)
        assert_iso(order["createdAt"])
        fetched = (await api.get_order("CLIENT123", order["orderId"])).json()
        assert fetched["success"] is True
        assert set(fetched["data"]) == {*order, "updatedAt"}
        assert_iso(fetched["data"]["updatedAt"])
        balance = (await api.http.get("/wallet/balance", headers={"client-id": "CLIENT123"})).json()
        assert balance["data"]["clientId"] == "CLIENT123"
        assert balance["data"]["balance"] == 650.51
        assert_iso(balance["data"]["lastUpdated"])


async def test_admin_authentication(database_url: str, provider: Provider) -> None:
    async with start_service(database_url, provider.url) as api:
        body = {"client_id": "C1", "amount": 10}
        missing = await api.http.post("/admin/wallet/credit", json=body)
        assert_error(missing, 401, "UNAUTHORIZED")
        wrong = await api.http.post(
            "/admin/wallet/credit", json=body, headers={"Authorization": "Bearer nope-nope"}
        )
        assert_error(wrong, 403, "INVALID_API_KEY")
        basic = await api.http.post(
            "/admin/wallet/credit", json=body, headers={"Authorization": f"Basic {ADMIN_KEY}"}
        )
        assert_error(basic, 401)
        debit = await api.http.post("/admin/wallet/debit", json=body)
        assert_error(debit, 401)
        assert (await api.http.get("/wallet/balance", headers={"client-id": "C1"})).status_code == 404


@pytest.mark.parametrize(
    "client_id",
    ["", "x" * 65, "x" * 300, "bad\x00id", "bad\nid", 'quote"d', "spa ce", "semi;colon", "é"],
)
async def test_malformed_client_ids_are_400(database_url: str, provider: Provider, client_id: str) -> None:
    async with start_service(database_url, provider.url) as api:
        for method, path, content in [
            ("GET", "/wallet/balance", b""),
            ("POST", "/orders", b'{"amount": 1}'),
        ]:
            # Written by hand: HTTP clients refuse to send a NUL or a line break in a header.
            request = (
                (
                    f"{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(content)}\r\nConnection: close\r\nclient-id: "
                ).encode()
                + client_id.encode()
                + b"\r\n\r\n"
                + content
            )
            answer = await raw_exchange(api, request)
            assert (answer.status, answer.headers.get("content-type")) == (400, "application/json"), answer
            error = answer.json()
            assert error["success"] is False
            # A NUL or a line break is refused by the HTTP parser itself, anything else by us.
            assert error["code"] == (
                "MALFORMED_HTTP" if {"\x00", "\n"} & set(client_id) else "INVALID_CLIENT_ID"
            )
        credit = await raw_post(
            api,
            "/admin/wallet/credit",
            b'{"client_id": ' + _json_str(client_id) + b', "amount": 5}',
            ADMIN,
        )
        assert_error(credit, 400)


def _json_str(value: str) -> bytes:
    return json.dumps(value).encode()


async def test_missing_client_id_is_400(database_url: str, provider: Provider) -> None:
    async with start_service(database_url, provider.url) as api:
        assert_error(await api.http.get("/wallet/balance"), 400, "MISSING_CLIENT_ID")
        assert_error(await api.http.post("/orders", json={"amount": 1}), 400)


async def test_unknown_clients_are_404(database_url: str, provider: Provider) -> None:
    async with start_service(database_url, provider.url) as api:
        response = await api.http.get("/wallet/balance", headers={"client-id": "ghost"})
        assert_error(response, 404)
        assert_error(await api.debit("ghost", 1), 404)
        assert_error(await api.order("ghost", 1), 404)
        # The client's lists too, as its balance: an unknown client is not an empty one.
        for path in ("/orders", "/wallet/transactions", "/events", "/wallet/statement"):
            assert_error(await api.http.get(path, headers={"client-id": "ghost"}), 404, "CLIENT_NOT_FOUND")
        assert provider.simulator.calls == []


async def test_another_clients_order_looks_like_no_order(database_url: str, provider: Provider) -> None:
    async with start_service(database_url, provider.url) as api:
        await api.credit("alice", 100)
        await api.credit("bob", 100)
        order_id = (await api.order("alice", 10)).json()["data"]["orderId"]
        foreign = await api.get_order("bob", order_id)
        missing = await api.get_order("bob", "ORD-1703251234567-a1b2c3d4")
        assert_error(foreign, 404)
        assert foreign.json() == missing.json()
        for bad in ["x" * 2000, "ORD-1%00", "%00", "ORD-1703251234567-A1B2C3D4"]:
            assert_error(await api.get_order("alice", bad), 404)


AMOUNTS_REFUSED = [
    b"0",
    b"-5",
    b"-0.01",
    b"1.005",
    b"0.001",
    b"1e20",
    b"10000000000000",
    b'"10"',
    b"null",
    b"true",
    b"[1]",
    b'{"a": 1}',
    b"NaN",
    b"Infinity",
    b"-Infinity",
    b"1e-7",
    # Exact evaluation: never rounded by a 28-digit context, never overflowing or underflowing.
    b"1.000000000000000000000000000001",
    b"0.0000000000000000000000000000001",
    b"1e999999999",
    b"1e-999999999",
    b"1E+100000000000000000000",
    b"9" * 5000,
]


@pytest.mark.parametrize("amount", AMOUNTS_REFUSED, ids=lambda a: a.decode())
async def test_bad_amounts_are_400_and_move_nothing(
    database_url: str, provider: Provider, amount: bytes
) -> None:
    async with start_service(database_url, provider.url) as api:
        await api.credit("C1", 100)
        order = await raw_post(api, "/orders", b'{"amount": ' + amount + b"}", {"client-id": "C1"})
        refusal = assert_error(order, 400)
        assert "Value error" not in refusal["error"]  # our sentence, not pydantic's wrapping of it
        debit = await raw_post(
            api, "/admin/wallet/debit", b'{"client_id": "C1", "amount": ' + amount + b"}", ADMIN
        )
        assert_error(debit, 400)
        credit = await raw_post(
            api, "/admin/wallet/credit", b'{"client_id": "C2", "amount": ' + amount + b"}", ADMIN
        )
        assert_error(credit, 400)
        assert await api.balance("C1") == Decimal(100)
        assert (await api.http.get("/wallet/balance", headers={"client-id": "C2"})).status_code == 404
        assert provider.simulator.calls == []


# Refused by every money-moving endpoint, except where noted (a body without client_id is a
# valid order).
BODIES_REFUSED = {
    "missing amount": b"{}",
    "missing client_id": b'{"amount": 5}',
    "duplicate keys": b'{"client_id": "C1", "amount": 1, "amount": 2}',
    "malformed": b'{"client_id": "C1", "amount": ',
    "not an object": b"[1, 2]",
    "a bare number": b"5",
    "empty": b"",
    "not utf-8": b'{"client_id": "\xff\xfe", "amount": 1}',
    "unknown field": b'{"client_id": "C1", "amount": 1, "amont": 2}',
    "client_id not a string": b'{"client_id": 12, "amount": 1}',
    "description with NUL": b'{"client_id": "C1", "amount": 1, "description": "a\\u0000b"}',
    "name with NUL": b'{"client_id": "C1", "amount": 1, "name": "a\\u0000b"}',
    "email with NUL": b'{"client_id": "C1", "amount": 1, "email": "a\\u0000@b.test"}',
    "email that is no address": b'{"client_id": "C1", "amount": 1, "email": "not-an-email"}',
    "email with a space": b'{"client_id": "C1", "amount": 1, "email": "ops @acme.test"}',
    "client_id with NUL": b'{"client_id": "C1\\u0000", "amount": 1}',
    "name as a number": b'{"client_id": "C1", "amount": 1, "name": 12}',
    "deeply nested": b'{"client_id": "C1", "amount": 1, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    # Valid JSON whose numbers no amount could be, wherever they sit: refused before evaluation.
    "huge exponent in description": b'{"client_id": "C1", "amount": 1, "description": 1e999999999}',
    "tiny exponent in name": b'{"client_id": "C1", "amount": 1, "name": 1e-999999999}',
    "huge exponent in an unknown field": b'{"client_id": "C1", "amount": 1, "x": [1E+100000000000000000000]}',
    "huge integer in an unknown field": b'{"client_id": "C1", "amount": 1, "x": ' + b"9" * 5000 + b"}",
    "number as description": b'{"client_id": "C1", "amount": 1, "description": 1E+20}',
    # A lone surrogate escape cannot be encoded as UTF-8 for the database, the logs or a reply.
    "lone surrogate in description": b'{"client_id": "C1", "amount": 1, "description": "a\\ud800"}',
    "lone surrogate in name": b'{"client_id": "C1", "amount": 1, "name": "\\udfff"}',
    "lone surrogate in email": b'{"client_id": "C1", "amount": 1, "email": "a\\udbff@b.test"}',
    "lone surrogate in client_id": b'{"client_id": "C\\ud800", "amount": 1}',
    "lone surrogate as a key": b'{"client_id": "C1", "amount": 1, "\\ud800": 1}',
}


@pytest.mark.parametrize("body", BODIES_REFUSED.values(), ids=BODIES_REFUSED.keys())
async def test_bad_bodies_are_4xx_and_move_nothing(
    database_url: str, provider: Provider, body: bytes
) -> None:
    async with start_service(database_url, provider.url, max_body_bytes=1024 * 1024) as api:
        await api.credit("C1", 100)
        for path in ["/admin/wallet/credit", "/admin/wallet/debit"]:
            response = await raw_post(api, path, body, ADMIN)
            assert_error(response, 400)
        if body != BODIES_REFUSED["missing client_id"]:
            order = await raw_post(api, "/orders", body, {"client-id": "C1"})
            assert_error(order, 400)
        assert await api.balance("C1") == Decimal(100)
        assert provider.simulator.calls == []


async def test_non_json_body_is_400(database_url: str, provider: Provider) -> None:
    async with start_service(database_url, provider.url) as api:
        await api.credit("C1", 100)
        response = await api.http.post(
            "/orders", content=b"amount=5", headers={"client-id": "C1", "Content-Type": "text/plain"}
        )
        assert_error(response, 400, "INVALID_JSON")
        assert await api.balance("C1") == Decimal(100)


async def test_large_body_is_413(database_url: str, provider: Provider) -> None:
    async with start_service(database_url, provider.url) as api:
        await api.credit("C1", 100)
        huge = b'{"amount": 1, "pad": "' + b"x" * (5 * 1024 * 1024) + b'"}'
        response = await raw_post(api, "/orders", huge, {"client-id": "C1"})
        assert_error(response, 413, "PAYLOAD_TOO_LARGE")

        async def chunks() -> Any:
            yield b'{"amount": 1, "pad": "'
            for _ in range(100):
                yield b"x" * 65536
            yield b'"}'

        streamed = await api.http.post(
            "/orders", content=chunks(), headers={"client-id": "C1", "Content-Type": "application/json"}
        )
        assert_error(streamed, 413)
        assert await api.balance("C1") == Decimal(100)


async def test_credit_past_the_cap_is_refused(database_url: str, provider: Provider) -> None:
    async with start_service(database_url, provider.url) as api:
        top = await api.credit("C1", 9_999_999_999_999.99)
        assert top.status_code == 200
        assert top.json()["data"]["newBalance"] == 9_999_999_999_999.99
        assert_error(await api.credit("C1", 0.01), 400, "BALANCE_LIMIT_EXCEEDED")
        assert await api.balance("C1") == Decimal("9999999999999.99")


async def test_credit_leaves_room_for_refunds_of_pending_orders(
    database_url: str, provider: Provider
) -> None:
    """Money out for a PENDING order may come back; a credit must not take its place."""

    gate = asyncio.Event()
    provider.set(gate=gate, error_status=400)
    async with start_service(database_url, provider.url) as api:
        await api.credit("C1", 9_999_999_999_999.99)
        order = asyncio.create_task(api.order("C1", 100))
        await provider.simulator.wait_for_calls(1)
        assert_error(await api.credit("C1", 100), 400, "BALANCE_LIMIT_EXCEEDED")
        gate.set()
        assert (await order).status_code == 502
        assert await api.balance("C1") == Decimal("9999999999999.99")


async def test_exact_decimal_arithmetic(database_url: str, provider: Provider) -> None:
    async with start_service(database_url, provider.url) as api:
        await api.credit("C1", 0.1)
        second = await raw_post(api, "/admin/wallet/credit", b'{"client_id": "C1", "amount": 0.2}', ADMIN)
        assert b'"newBalance":0.3' in second.content
        assert await api.balance("C1") == Decimal("0.3")
        spaced = await raw_post(api, "/admin/wallet/credit", b'{"client_id":"C1","amount":1.10}', ADMIN)
        assert spaced.json()["data"]["amountCredited"] == 1.1


async def test_insufficient_funds_changes_nothing(database_url: str, provider: Provider) -> None:
    async with start_service(database_url, provider.url) as api:
        await api.credit("C1", 10)
        body = assert_error(await api.order("C1", 10.01), 400, "INSUFFICIENT_FUNDS")
        assert body["error"] == "Insufficient wallet balance for order"  # the original's words
        assert body["details"] == {"balance": 10, "requested": 10.01}
        debit = assert_error(await api.debit("C1", 11), 400, "INSUFFICIENT_FUNDS")
        assert debit["error"] == "Insufficient wallet balance"
        assert await api.balance("C1") == Decimal(10)
        assert provider.simulator.calls == []


async def test_unknown_routes_and_methods_use_the_envelope(database_url: str, provider: Provider) -> None:
    async with start_service(database_url, provider.url) as api:
        assert_error(await api.http.get("/nope"), 404, "NOT_FOUND")
        for method, path in (("GET", "/wallet/balance/"), ("POST", "/orders/"), ("GET", "/orders/x/")):
            headers = {"client-id": "C1", "Host": "evil.example"}
            slashed = await api.http.request(method, path, headers=headers)
            assert_error(slashed, 404, "NOT_FOUND")
            assert "location" not in slashed.headers
        refused = await api.http.get("/admin/wallet/credit", headers=ADMIN)
        assert_error(refused, 405)
        assert refused.headers["Allow"] == "POST"
        # GET and POST /orders are separate routes; Allow must name both.
        refused = await api.http.put("/orders", json={})
        assert_error(refused, 405)
        assert refused.headers["Allow"] == "GET, HEAD, POST"
        refused = await api.http.get("/admin/clients/C1/api-keys/k1", headers=ADMIN)
        assert refused.headers["Allow"] == "DELETE"
        assert_error(await api.http.delete("/wallet/balance"), 405)


async def test_head_is_served_wherever_get_is(database_url: str, provider: Provider) -> None:
    """RFC 9110: a general-purpose server supports HEAD with GET: the GET's status and headers,
    no body."""
    async with start_service(database_url, provider.url) as api:
        await api.credit("C1", 10)
        for path, headers in (("/health", {}), ("/wallet/balance", {"client-id": "C1"})):
            got = await api.http.get(path, headers=headers)
            head = await api.http.head(path, headers=headers)
            assert (head.status_code, head.content) == (got.status_code, b""), path
            assert head.headers["content-type"] == got.headers["content-type"]
            assert head.headers["content-length"] == got.headers["content-length"]
        assert (await api.http.head("/wallet/balance", headers={"client-id": "nobody"})).status_code == 404
        refused = await api.http.head("/admin/wallet/credit", headers=ADMIN)
        assert (refused.status_code, refused.headers["Allow"]) == (405, "POST")
        assert await api.balance("C1") == Decimal(10)


async def test_responses_carry_a_request_id(database_url: str, provider: Provider) -> None:
    async with start_service(database_url, provider.url) as api:
        given = await api.http.get("/health", headers={"X-Request-ID": "trace-123"})
        assert given.headers["X-Request-ID"] == "trace-123"
        fresh = await api.http.get("/health", headers={"X-Request-ID": "bad id\twith tab"})
        assert re.fullmatch(r"[0-9a-f]{32}", fresh.headers["X-Request-ID"])


async def test_a_header_sent_twice_with_different_values_is_refused(
    database_url: str, provider: Provider
) -> None:
    """Who asks, and which request this is, must not depend on which copy a reader takes."""
    async with start_service(database_url, provider.url) as api:
        await api.credit("C1", 100)
        await api.credit("C2", 100)
        who = await api.http.get("/wallet/balance", headers=[("client-id", "C1"), ("client-id", "C2")])
        assert_error(who, 400, "DUPLICATE_HEADER")
        keys = [("client-id", "C1"), ("Idempotency-Key", "k-1"), ("Idempotency-Key", "k-2")]
        order = await api.http.post("/orders", json={"amount": 5}, headers=keys)
        assert_error(order, 400, "DUPLICATE_HEADER")
        assert await api.balance("C1") == Decimal(100)
        assert provider.simulator.calls == []
        same = await api.http.get("/wallet/balance", headers=[("client-id", "C1"), ("client-id", "C1")])
        assert same.status_code == 200
