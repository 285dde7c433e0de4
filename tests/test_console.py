"""The operator console over HTTP (routes.py, sessions.py): sessions, CSRF, the login limit, and
actions that go through the API's operations with their rules, idempotency and audit trail."""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import pytest
from prometheus_client import REGISTRY

from tests.builders import (
    ADMIN_KEY,
    WEBHOOKS_ONE_RETRY,
    Api,
    Commits,
    Provider,
    dead_redis_url,
    delivered_again,
    failed_endpoint,
    mute_redis,
    start_receiver,
    start_service,
)
from wallet.console.routes import money, parse_amount
from wallet.console.sessions import COOKIE
from wallet.database import plain_url
from wallet.ratelimit import REDIS_TIMEOUT_SECONDS


async def login(api: Api) -> httpx.AsyncClient:
    """A browser-like client of the same server, logged in."""
    browser = httpx.AsyncClient(base_url=str(api.http.base_url), timeout=30)
    response = await browser.post("/console/login", data={"key": ADMIN_KEY})
    assert response.status_code == 303, response.text
    assert response.headers["location"] == "/console"
    return browser


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf" value="([0-9a-f]{64})"', html)
    assert match is not None, html
    return match.group(1)


def nonce_of(html: str, suffix: str) -> str:
    match = re.search(rf'name="nonce" value="([A-Za-z0-9_-]+-{suffix})"', html)
    assert match is not None
    return match.group(1)


async def sql(database_url: str, query: str, *args: Any) -> list[Any]:
    conn = await asyncpg.connect(plain_url(database_url))
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


def test_money_is_exact_with_separators() -> None:
    assert money(0) == "0.00"
    assert money(5) == "0.05"
    assert money(123456789) == "1,234,567.89"
    assert money(999999999999999) == "9,999,999,999,999.99"
    assert money(-100050) == "-1,000.50"


def test_typed_amounts_read_thousands_separators_only_in_threes() -> None:
    for typed in ("1,234,567.89", "1 234 567.89", "1\u202f234\u202f567.89", "1234567.89", " 1,234,567.89 "):
        assert parse_amount(typed) == Decimal("1234567.89")
    assert parse_amount("5") == Decimal(5)


async def test_login_sets_a_strict_httponly_session_cookie(database_url: str, provider: Provider) -> None:
    async with start_service(database_url, provider.url, console_session_hours=2) as api:
        page = await api.http.get("/console/login")
        assert page.status_code == 200
        assert 'for="key"' in page.text
        wrong = await api.http.post("/console/login", data={"key": "not-the-key"})
        assert wrong.status_code == 403
        assert COOKIE not in wrong.headers.get("set-cookie", "")
        right = await api.http.post("/console/login", data={"key": ADMIN_KEY})
        assert right.status_code == 303
        cookie = right.headers["set-cookie"].lower()
        assert "httponly" in cookie
        assert "samesite=strict" in cookie
        assert "max-age=7200" in cookie
        assert "path=/console" in cookie
        assert "secure" not in cookie  # development over http; production sets it
        rows = await sql(
            database_url, "SELECT expires_at - created_at AS ttl, revoked_at FROM console_sessions"
        )
        assert len(rows) == 1
        assert rows[0]["ttl"].total_seconds() == 7200
        # Only the secret's digest is stored.
        secret = right.cookies[COOKIE]
        stored = await sql(database_url, "SELECT id_hash FROM console_sessions")
        assert secret.encode() not in bytes(stored[0]["id_hash"])


async def test_pages_redirect_and_actions_refuse_without_a_session(
    database_url: str, provider: Provider
) -> None:
    async with start_service(database_url, provider.url) as api:
        await api.credit("C1", 10)
        for path in (
            "/console",
            "/console/clients",
            "/console/clients/C1",
            "/console/orders",
            "/console/ledger",
            "/console/webhooks",
            "/console/ledger/digest",
            "/console/clients/C1/statement",
        ):
            response = await api.http.get(path)
            assert response.status_code == 303, path
            assert response.headers["location"] == "/console/login"
        for path in (
            "/console/clients/C1/credit",
            "/console/clients/C1/keys/new",
            "/console/ledger/verify",
            "/console/orders/ORD-1703251234567-a1b2c3d4/resolve",
            "/console/webhooks/we_0123456789abcdef01234567/enabled",
            "/console/webhooks/we_0123456789abcdef01234567/replay",
            "/console/logout",
        ):
            response = await api.http.post(path, data={"amount": "5", "confirm": "yes", "csrf": "0" * 64})
            assert response.status_code == 403, path
            assert "text/html" in response.headers["content-type"]
        assert await api.balance("C1") == 10
        # The console is not part of the API's document.
        paths = (await api.http.get("/openapi.json")).json()["paths"]
        assert not [p for p in paths if p.startswith("/console")]


async def test_actions_need_the_sessions_csrf_token(database_url: str, provider: Provider) -> None:
    async with start_service(database_url, provider.url) as api:
        await api.credit("C1", 10)
        browser = await login(api)
        other = await login(api)
        page = await browser.get("/console/clients/C1")
        token = csrf_of(page.text)
        form = {"amount": "5", "confirm": "yes", "nonce": "n1"}
        for bad in (
            {},
            {"csrf": ""},
            {"csrf": "0" * 64},
            {"csrf": csrf_of((await other.get("/console")).text)},
        ):
            response = await browser.post("/console/clients/C1/debit", data={**form, **bad})
            assert response.status_code == 403
        assert await api.balance("C1") == 10
        ok = await browser.post("/console/clients/C1/debit", data={**form, "csrf": token})
        assert ok.status_code == 303
        assert await api.balance("C1") == 5


async def test_a_body_that_is_not_a_form_is_refused_not_a_500(database_url: str, provider: Provider) -> None:
    broken = {"content": b"garbage", "headers": {"content-type": "multipart/form-data; boundary=xx"}}
    async with start_service(database_url, provider.url) as api:
        await api.credit("C1", 10)
        for path in ("/console/logout", "/console/clients/C1/credit"):
            assert (await api.http.post(path, **broken)).status_code == 403, path  # type: ignore[arg-type]
        login_page = await api.http.post("/console/login", **broken)  # type: ignore[arg-type]
        assert login_page.status_code == 400
        assert "could not be read" in login_page.text
        browser = await login(api)
        response = await browser.post("/console/clients/C1/credit", **broken)  # type: ignore[arg-type]
        assert response.status_code == 400
        assert "text/html" in response.headers["content-type"]
        assert await api.balance("C1") == 10


async def test_expired_and_logged_out_sessions_are_refused(database_url: str, provider: Provider) -> None:
    async with start_service(database_url, provider.url) as api:
        browser = await login(api)
        assert (await browser.get("/console")).status_code == 200
        await sql(database_url, "UPDATE console_sessions SET expires_at = now() - interval '1 second'")
        expired = await browser.get("/console")
        assert expired.status_code == 303
        assert expired.headers["location"] == "/console/login"

        browser = await login(api)
        page = await browser.get("/console")
        secret = browser.cookies[COOKIE]
        out = await browser.post("/console/logout", data={"csrf": csrf_of(page.text)})
        assert out.status_code == 303
        replayed = await api.http.get("/console", headers={"Cookie": f"{COOKIE}={secret}"})
        assert replayed.status_code == 303  # the cookie is dead on every worker, not just deleted here


async def test_login_attempts_are_limited_per_ip(
    database_url: str, provider: Provider, redis_url: str | None
) -> None:
    settings = {"console_login_rate": "3/minute", "redis_url": redis_url, "trusted_proxies": "127.0.0.1/32"}
    # An address of its own, so that counts left in a shared Redis by other runs do not matter.
    me = {"X-Forwarded-For": f"10.{secrets.randbelow(256)}.{secrets.randbelow(256)}.{secrets.randbelow(256)}"}
    async with start_service(database_url, provider.url, **settings) as api:
        for _ in range(3):
            wrong = await api.http.post("/console/login", data={"key": "wrong-key"}, headers=me)
            assert wrong.status_code == 403
        refusals = REGISTRY.get_sample_value("wallet_rate_limited_total") or 0.0
        limited = await api.http.post("/console/login", data={"key": ADMIN_KEY}, headers=me)
        assert limited.status_code == 429
        assert REGISTRY.get_sample_value("wallet_rate_limited_total") == refusals + 1  # on /metrics
        other = {"X-Forwarded-For": f"10.{secrets.randbelow(256)}.{secrets.randbelow(256)}.1"}
        assert (
            await api.http.post("/console/login", data={"key": ADMIN_KEY}, headers=other)
        ).status_code == 303
        assert COOKIE not in limited.headers.get("set-cookie", "")


@pytest.mark.parametrize("store", ["refused", "mute"])
async def test_an_operator_logs_in_while_the_login_limits_store_is_down(
    database_url: str, provider: Provider, store: str
) -> None:
    """Redis refusing connections, or accepting them and never answering: the login is counted
    in the process, or nowhere once the counts' deadline passes, and let through (logged). It
    was a 500 page, and a login that never ended."""
    async with contextlib.AsyncExitStack() as stack:
        url = dead_redis_url()
        if store == "mute":
            url = (await stack.enter_async_context(mute_redis())).url
        settings = {"console_login_rate": "3/minute", "redis_url": url}
        api = await stack.enter_async_context(start_service(database_url, provider.url, **settings))
        async with asyncio.timeout(REDIS_TIMEOUT_SECONDS + 3):
            response = await api.http.post("/console/login", data={"key": ADMIN_KEY})
        assert response.status_code == 303
        assert COOKIE in response.headers["set-cookie"]


async def test_credit_asks_to_confirm_then_moves_money_once_and_is_audited(
    database_url: str, provider: Provider
) -> None:
    async with start_service(database_url, provider.url) as api:
        await api.credit("C1", 10)
        browser = await login(api)
        page = await browser.get("/console/clients/C1")
        form = {
            "csrf": csrf_of(page.text),
            "nonce": nonce_of(page.text, "credit"),
            "amount": "1,234.56",
            "note": "goodwill",
        }
        confirm = await browser.post("/console/clients/C1/credit", data=form)
        assert confirm.status_code == 200
        assert "1,234.56" in confirm.text
        assert await api.balance("C1") == 10  # nothing moved yet
        for _ in range(2):  # a double submit of the confirmation moves money once
            done = await browser.post("/console/clients/C1/credit", data={**form, "confirm": "yes"})
            assert done.status_code == 303
        assert float(await api.balance("C1")) == 1244.56
        entries = await sql(
            database_url, "SELECT description FROM ledger_entries WHERE client_id = 'C1' ORDER BY entry_no"
        )
        assert [e["description"] for e in entries] == [None, "console: goodwill"]
        shown = await browser.get("/console/clients/C1")
        assert "1,244.56" in shown.text


# A decimal comma ('12,50') or stray separators are refused, never read as 1,250 or 123.
@pytest.mark.parametrize(
    "amount", ["0", "-5", "1.234", "abc", "", "99999999999999", "12,50", "1,2,3", "1.2,5", "12 50", "1,0000"]
)
async def test_bad_amounts_are_friendly_400s(database_url: str, provider: Provider, amount: str) -> None:
    async with start_service(database_url, provider.url) as api:
        await api.credit("C1", 10)
        browser = await login(api)
        page = await browser.get("/console/clients/C1")
        form = {"csrf": csrf_of(page.text), "nonce": "x", "amount": amount, "confirm": "yes"}
        response = await browser.post("/console/clients/C1/debit", data=form)
        assert response.status_code == 400
        assert "text/html" in response.headers["content-type"]
        assert await api.balance("C1") == 10


async def test_debit_refused_by_the_apis_rules(database_url: str, provider: Provider) -> None:
    async with start_service(database_url, provider.url) as api:
        await api.credit("C1", 10)
        browser = await login(api)
        page = await browser.get("/console/clients/C1")
        form = {"csrf": csrf_of(page.text), "nonce": "x", "amount": "10.01", "confirm": "yes"}
        response = await browser.post("/console/clients/C1/debit", data=form)
        assert response.status_code == 400
        assert "Insufficient" in response.text
        missing = await browser.get("/console/clients/NOBODY")
        assert missing.status_code == 404


async def test_resolve_from_the_review_queue(database_url: str, provider: Provider) -> None:
    async with start_service(database_url, provider.url, fulfillment_resolve_hours=0.0001) as api:
        await api.credit("C1", 100)
        provider.set(error_status=503)
        placed = await api.order("C1", 30)
        assert placed.status_code == 202
        order_id = placed.json()["data"]["orderId"]
        await sql(
            database_url,
            "UPDATE orders SET needs_review = true, flagged_at = now() WHERE order_id = $1",
            order_id,
        )
        browser = await login(api)
        queue = await browser.get("/console/orders", params={"review": "1"})
        assert order_id in queue.text
        form = {
            "csrf": csrf_of(queue.text),
            "nonce": "r1",
            "outcome": "failed",
            "note": "provider says never",
        }
        done = await browser.post(f"/console/orders/{order_id}/resolve", data=form)
        assert done.status_code == 303, done.text
        admin = await api.http.get(f"/admin/orders/{order_id}", headers=api.admin_headers)
        data = admin.json()["data"]
        assert data["status"] == "FAILED"
        assert data["resolution"]["by"] == "console"
        assert await api.balance("C1") == 100
        again = await browser.post(f"/console/orders/{order_id}/resolve", data={**form, "nonce": "r2"})
        assert again.status_code == 409


async def test_issue_and_revoke_a_key(database_url: str, provider: Provider) -> None:
    async with start_service(database_url, provider.url, client_auth="api_key") as api:
        await api.credit("C1", 10)
        browser = await login(api)
        page = await browser.get("/console/clients/C1")
        issued = await browser.post("/console/clients/C1/keys/new", data={"csrf": csrf_of(page.text)})
        assert issued.status_code == 200
        key = re.search(r'id="new-key">(wk_[A-Za-z0-9_-]+)<', issued.text)
        key_id = re.search(r"<code>(key_[0-9a-f]{16})</code>", issued.text)
        assert key is not None
        assert key_id is not None
        headers = {"client-id": "C1", "Authorization": f"Bearer {key.group(1)}"}
        assert (await api.http.get("/wallet/balance", headers=headers)).status_code == 200
        revoked = await browser.post(
            f"/console/clients/C1/keys/{key_id.group(1)}/revoke", data={"csrf": csrf_of(page.text)}
        )
        assert revoked.status_code == 303
        assert (await api.http.get("/wallet/balance", headers=headers)).status_code == 403


async def test_overview_figures_and_the_ledger_check(database_url: str, provider: Provider) -> None:
    async with start_service(database_url, provider.url) as api:
        await api.credit("C1", 1000.5)
        await api.credit("C2", 2000)
        await api.order("C1", 100)
        provider.set(error_status=400)
        await api.order("C2", 50)
        browser = await login(api)
        page = (await browser.get("/console")).text
        assert 'id="balances">2,900.50<' in page
        assert 'id="held">0.00<' in page
        assert 'id="orders-today">2<' in page
        assert 'id="failure-rate">50.0%<' in page
        assert 'id="last-check">never<' in page
        ledger = await browser.get("/console/ledger")
        verified = await browser.post("/console/ledger/verify", data={"csrf": csrf_of(ledger.text)})
        assert verified.status_code == 200
        assert "OK" in verified.text
        assert 'id="last-check">OK<' in (await browser.get("/console")).text
        digest = await browser.get("/console/ledger/digest")
        assert digest.status_code == 200
        assert "attachment" in digest.headers["content-disposition"]
        assert {w["clientId"] for w in digest.json()["wallets"]} == {"C1", "C2"}
        statement = await browser.get("/console/clients/C1/statement", params={"format": "csv"})
        assert statement.status_code == 200
        assert statement.headers["content-type"].startswith("text/csv")


async def test_an_unexpected_failure_is_an_html_page(database_url: str, provider: Provider) -> None:
    async with start_service(database_url, provider.url) as api:
        browser = await login(api)
        await sql(database_url, "ALTER TABLE ledger_checks RENAME TO ledger_checks_gone")
        response = await browser.get("/console/ledger")
        assert response.status_code == 500
        assert "text/html" in response.headers["content-type"]
        assert "Something went wrong" in response.text
        assert "ledger_checks" not in response.text  # no internals shown


async def test_production_session_cookies_are_secure(database_url: str, provider: Provider) -> None:
    async with start_service(database_url, provider.url, app_env="production") as api:
        response = await api.http.post("/console/login", data={"key": ADMIN_KEY})
        assert response.status_code == 303
        assert "secure" in [part.strip() for part in response.headers["set-cookie"].lower().split(";")]


async def test_webhooks_page_enables_and_replays_through_the_apis_operations(
    database_url: str, commits: Commits, provider: Provider
) -> None:
    async with (
        start_receiver() as receiver,
        start_service(database_url, provider.url, **WEBHOOKS_ONE_RETRY) as api,
    ):
        await api.credit("C1", 10)
        await api.http.post(
            "/admin/webhook-endpoints",
            json={"url": receiver.url, "eventTypes": ["api_key.created"]},
            headers=api.admin_headers,
        )
        endpoint, event_id = await failed_endpoint(api, commits, receiver, "C1")
        path = f"/webhook-endpoints/{endpoint}"
        browser = await login(api)
        shown = await browser.get("/console/webhooks")
        assert shown.status_code == 200
        assert "global (every client)" in shown.text
        assert re.search(rf'id="{endpoint}">.*?disabled</strong>: failed every delivery', shown.text, re.S)
        assert f'value="{event_id}"' in shown.text  # its failed delivery offers a replay
        token = csrf_of(shown.text)
        replay = {"event_id": event_id, "confirm": "yes"}

        async def deliveries() -> int:
            rows = await sql(database_url, "SELECT count(*) AS n FROM webhook_deliveries")
            return int(rows[0]["n"])

        for bad in ({}, {"csrf": "0" * 64}):
            refused = await browser.post(f"/console/webhooks/{endpoint}/replay", data={**replay, **bad})
            assert refused.status_code == 403
            refused = await browser.post(
                f"/console/webhooks/{endpoint}/enabled", data={"enabled": "yes", **bad}
            )
            assert refused.status_code == 403
        assert await deliveries() == 1
        still_off = await browser.post(f"/console/webhooks/{endpoint}/replay", data={**replay, "csrf": token})
        assert still_off.status_code == 409
        assert "enable it first" in still_off.text
        enabled = await browser.post(
            f"/console/webhooks/{endpoint}/enabled", data={"enabled": "yes", "csrf": token}
        )
        assert enabled.status_code == 303
        assert (await api.http.get(path, headers={"client-id": "C1"})).json()["data"]["enabled"] is True
        confirm = await browser.post(
            f"/console/webhooks/{endpoint}/replay", data={"event_id": event_id, "csrf": token}
        )
        assert confirm.status_code == 200
        assert event_id in confirm.text
        assert await deliveries() == 1  # nothing is sent before the confirmation
        done = await browser.post(f"/console/webhooks/{endpoint}/replay", data={**replay, "csrf": token})
        assert done.status_code == 303
        assert "Replay%20scheduled%3A%201%20delivery" in done.headers["location"]

        await commits.until(
            lambda: delivered_again(database_url, event_id), what="the replayed event delivered"
        )
        assert len(receiver.got) == 3
        assert receiver.got[2].headers["webhook-id"] == event_id
        log = await browser.get("/console/webhooks", params={"endpoint": endpoint})
        assert log.text.count("DELIVERED") == 1
        # Every failed delivery since a time: the one above was delivered again, so none is left.
        since = {"since": "2000-01-01T00:00:00Z", "confirm": "yes", "csrf": token}
        none_left = await browser.post(f"/console/webhooks/{endpoint}/replay", data=since)
        assert "Replay%20scheduled%3A%200%20deliveries" in none_left.headers["location"]
        for bad_form in ({"since": "yesterday"}, {"event_id": "evt_nope"}, {}):
            refused = await browser.post(
                f"/console/webhooks/{endpoint}/replay", data={**bad_form, "csrf": token}
            )
            assert refused.status_code == 400, bad_form
        unknown = await browser.post(
            "/console/webhooks/we_ffffffffffffffffffffffff/replay", data={**replay, "csrf": token}
        )
        assert unknown.status_code == 404
        assert (await browser.get("/console/webhooks", params={"before": "0"})).status_code == 400
