"""The console in a real browser: Debian's headless Chromium (/usr/bin/chromium, installed by
`make test`) driven by Playwright, against a real service. An operator's tasks end to end, the
refusals a browser meets, and accessibility checked with axe-core (tests/vendor/axe-core).

On failure, a screenshot of every page the test saw is saved under tests/artifacts/.
`UPDATE_SCREENSHOTS=1` also writes the README's docs/console-overview.png.
"""

from __future__ import annotations

import asyncio
import csv
import io
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from playwright.async_api import Browser, Page, async_playwright

from tests.builders import (
    ADMIN_KEY,
    WEBHOOKS_ONE_RETRY,
    Api,
    Commits,
    Provider,
    delivered_again,
    failed_endpoint,
    start_receiver,
    start_service,
)
from wallet.database import plain_url

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ROOT = Path(__file__).parent.parent
ARTIFACTS = Path(__file__).parent / "artifacts"
AXE = Path(__file__).parent / "vendor" / "axe-core" / "axe.min.js"


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield launched
        finally:
            await launched.close()


@dataclass
class Console:
    """A page of the console, and a screenshot of every page it showed (kept for failures)."""

    page: Page
    base: str
    shots: list[tuple[str, bytes]] = field(default_factory=list)

    async def shot(self) -> None:
        name = re.sub(r"[^A-Za-z0-9]+", "_", self.page.url.removeprefix(self.base)).strip("_") or "root"
        self.shots.append((f"{len(self.shots):02d}-{name}", await self.page.screenshot(full_page=True)))

    async def goto(self, path: str) -> None:
        await self.page.goto(self.base + path)
        await self.shot()

    async def login(self) -> None:
        await self.goto("/console")
        assert self.page.url.endswith("/console/login")
        await self.page.get_by_label("Admin API key").fill(ADMIN_KEY)
        await self.page.get_by_role("button", name="Log in").click()
        await self.page.wait_for_url(self.base + "/console")
        await self.shot()

    async def text(self, selector: str) -> str:
        return (await self.page.locator(selector).inner_text()).strip()

    async def axe(self) -> list[Any]:
        """axe-core's WCAG 2 A/AA violations on the current page."""
        await self.page.add_script_tag(path=str(AXE))
        result = await self.page.evaluate(
            "async () => (await axe.run(document, "
            "{runOnly: ['wcag2a', 'wcag2aa', 'best-practice']})).violations"
        )
        return [{"id": v["id"], "nodes": [n["target"] for n in v["nodes"]]} for v in result]


@pytest.fixture
async def console(
    request: pytest.FixtureRequest, browser: Browser, database_url: str, provider: Provider
) -> AsyncIterator[tuple[Console, Api]]:
    overrides: dict[str, Any] = getattr(request, "param", {})  # settings, by indirect parametrize
    async with start_service(database_url, provider.url, **overrides) as api:
        # bypass_csp: the console's CSP (rightly) refuses the axe-core script the tests inject.
        context = await browser.new_context(
            viewport={"width": 1280, "height": 900}, accept_downloads=True, bypass_csp=True
        )
        view = Console(await context.new_page(), str(api.http.base_url).rstrip("/"))
        try:
            yield view, api
        finally:
            report = getattr(request.node, "rep_call", None)
            if report is None or report.failed:
                ARTIFACTS.mkdir(exist_ok=True)
                for name, png in view.shots:
                    (ARTIFACTS / f"{request.node.name}-{name}.png").write_bytes(png)
                if not view.page.is_closed():
                    await view.page.screenshot(path=str(ARTIFACTS / f"{request.node.name}-last.png"))
            await context.close()


def cents(text: str) -> int:
    """A figure as the console shows it ("12,345.67") in integer cents."""
    return int(Decimal(text.replace(",", "")) * 100)


async def test_overview_matches_the_api(console: tuple[Console, Api], provider: Provider) -> None:
    view, api = console
    await api.credit("ACME", 12345.67, name="Acme Ltd")
    await api.credit("BETA", 1000000)
    await api.order("ACME", 45.6)
    provider.set(error_status=503)
    held = await api.order("BETA", 250)
    assert held.status_code == 202
    provider.set()
    await view.login()
    balances = [await api.wallet(c) for c in ("ACME", "BETA")]
    expected_balances = sum(cents(str(w["balance"])) for w in balances)
    expected_held = sum(cents(str(w["held"])) for w in balances)
    assert cents(await view.text("#balances")) == expected_balances
    assert await view.text("#balances") == "1,012,050.07"
    assert cents(await view.text("#held")) in (expected_held, 0)  # the resolver may settle it meanwhile
    assert await view.text("#orders-today") == "2"
    queue = await api.http.get("/admin/orders", params={"needsReview": "true"}, headers=api.admin_headers)
    assert await view.text("#review") == str(len(queue.json()["data"]))
    assert await view.page.locator("svg.chart rect").count() >= 2
    if os.environ.get("UPDATE_SCREENSHOTS"):
        await view.page.screenshot(path=str(ROOT / "docs" / "console-overview.png"), full_page=True)


async def test_credit_a_client_and_see_the_balance_change(console: tuple[Console, Api]) -> None:
    view, api = console
    await api.credit("ACME", 100, name="Acme Ltd", email="ops@acme.test")
    await view.login()
    await view.page.get_by_role("link", name="Clients").click()
    await view.page.get_by_label("Search id, name or email").fill("acme.test")
    await view.page.get_by_role("button", name="Show").click()
    await view.page.get_by_role("link", name="ACME").click()
    await view.shot()
    assert await view.text("#balance") == "100.00"
    await view.page.get_by_label("Amount").first.fill("1,234.50")
    await view.page.get_by_label("Note (recorded in the ledger)").first.fill("top-up by phone")
    await view.page.get_by_role("button", name="Review credit").click()
    await view.shot()
    assert await view.text("#confirm-amount") == "1,234.50"
    assert await api.balance("ACME") == 100  # nothing moves before the confirmation
    await view.page.get_by_role("button", name="Yes, credit 1,234.50").click()
    await view.page.wait_for_url(re.compile(r".*/console/clients/ACME\?done=.*"))
    await view.shot()
    assert await view.text("#balance") == "1,334.50"
    assert await api.balance("ACME") == Decimal("1334.5")
    ledger = await api.http.get("/admin/clients/ACME/ledger", headers=api.admin_headers)
    assert ledger.json()["data"][0]["description"] == "console: top-up by phone"


async def test_resolve_an_order_from_the_review_queue(
    console: tuple[Console, Api], provider: Provider, database_url: str
) -> None:
    view, api = console
    await api.credit("ACME", 500)
    provider.set(error_status=503)
    placed = await api.order("ACME", 120)
    assert placed.status_code == 202
    order_id = placed.json()["data"]["orderId"]
    conn = await asyncpg.connect(plain_url(database_url))
    try:  # flagged as the resolver would after FULFILLMENT_RESOLVE_HOURS
        await conn.execute(
            "UPDATE orders SET needs_review = true, flagged_at = now(), "
            "next_attempt_at = now() + interval '1 day' WHERE order_id = $1",
            order_id,
        )
    finally:
        await conn.close()
    await view.login()
    await view.page.locator("#review a").click()
    await view.shot()
    row = view.page.locator(f"tr[id='{order_id}']")
    await row.get_by_label("Outcome").select_option("fulfilled")
    await row.get_by_label("Provider id (if fulfilled)").fill("prov-778")
    await row.get_by_label("Note").fill("confirmed by the provider's support")
    await row.get_by_role("button", name="Resolve").click()
    await view.page.wait_for_url(re.compile(r".*/console/orders\?review=1&done=.*"))
    await view.shot()
    data = (await api.http.get(f"/admin/orders/{order_id}", headers=api.admin_headers)).json()["data"]
    assert data["status"] == "COMPLETED"
    assert data["fulfillmentId"] == "prov-778"
    assert data["resolution"]["by"] == "console"
    assert await view.page.locator(f"tr[id='{order_id}']").count() == 0


async def test_issue_and_revoke_a_key(console: tuple[Console, Api]) -> None:
    view, api = console
    await api.credit("ACME", 1)
    await view.login()
    await view.goto("/console/clients/ACME")
    await view.page.get_by_role("button", name="Issue a new key").click()
    await view.shot()
    key = await view.text("#new-key")
    assert key.startswith("wk_")
    key_id = (await view.page.locator("tbody tr[id^='key_']").first.get_attribute("id")) or ""
    await view.page.get_by_role("button", name=f"Revoke {key_id}").click()
    await view.page.wait_for_url(re.compile(r".*/console/clients/ACME\?done=.*"))
    await view.shot()
    assert await view.page.get_by_role("button", name=f"Revoke {key_id}").count() == 0
    keys = await api.http.get("/admin/clients/ACME", headers=api.admin_headers)
    assert keys.status_code == 200
    revoke_again = await api.http.delete(f"/admin/clients/ACME/api-keys/{key_id}", headers=api.admin_headers)
    assert revoke_again.json()["data"]["revokedAt"] is not None


async def test_download_a_statement(console: tuple[Console, Api]) -> None:
    view, api = console
    await api.credit("ACME", 10, description="=cmd|' /C calc'!A0")
    await api.debit("ACME", 2.5)
    await view.login()
    await view.goto("/console/clients/ACME")
    async with view.page.expect_download() as waiting:
        await view.page.get_by_role("button", name="Download statement").click()
    download = await waiting.value
    assert download.suggested_filename.startswith("statement-ACME-")
    saved = await download.path()
    content = await asyncio.to_thread(Path(saved).read_bytes)
    rows = list(csv.reader(io.StringIO(content.decode("utf-8-sig"), newline="")))
    assert rows[0][:4] == ["entryNo", "createdAt", "type", "amount"]
    assert [r[2] for r in rows[1:]] == ["OPENING_BALANCE", "CREDIT", "DEBIT", "CLOSING_BALANCE"]
    assert [r[3] for r in rows[2:-1]] == ["10.00", "2.50"]
    assert rows[2][7] == "'=cmd|' /C calc'!A0"
    assert rows[-1][5] == "7.50"


async def test_forged_forms_and_expired_sessions_are_refused(
    console: tuple[Console, Api], database_url: str
) -> None:
    view, api = console
    await api.credit("ACME", 50)
    await view.login()
    await view.goto("/console/clients/ACME")
    # A form whose CSRF token is not this session's: refused, nothing moves.
    await view.page.evaluate(
        "document.querySelectorAll('input[name=csrf]').forEach(i => i.value = 'f'.repeat(64))"
    )
    await view.page.get_by_label("Amount").nth(1).fill("10")
    await view.page.get_by_role("button", name="Review debit").click()
    await view.shot()
    assert "This form has expired" in await view.page.content()
    assert await api.balance("ACME") == 50
    # The session expires: pages lead to the login, actions are refused.
    await view.goto("/console/clients/ACME")
    conn = await asyncpg.connect(plain_url(database_url))
    try:
        await conn.execute("UPDATE console_sessions SET expires_at = now() - interval '1 second'")
    finally:
        await conn.close()
    await view.page.get_by_label("Amount").nth(1).fill("10")
    await view.page.get_by_role("button", name="Review debit").click()
    await view.shot()
    assert "Your session has ended" in await view.page.content()
    await view.goto("/console")
    assert view.page.url.endswith("/console/login")
    assert await api.balance("ACME") == 50


async def test_every_page_passes_axe_and_works_from_the_keyboard(
    console: tuple[Console, Api], provider: Provider
) -> None:
    view, api = console
    await api.credit("ACME", 10)
    provider.set(error_status=503)
    await api.order("ACME", 1)
    provider.set()
    await view.goto("/console/login")
    assert await view.axe() == []
    # Keyboard only: the key field has the focus, Tab reaches the button, Enter submits.
    assert await view.page.evaluate("document.activeElement.id") == "key"
    await view.page.keyboard.press("Tab")
    assert await view.page.evaluate("document.activeElement.textContent") == "Log in"
    await view.page.keyboard.press("Shift+Tab")
    await view.page.keyboard.type(ADMIN_KEY)
    await view.page.keyboard.press("Enter")
    await view.page.wait_for_url(view.base + "/console")
    for path in (
        "/console",
        "/console/clients",
        "/console/clients/ACME",
        "/console/orders",
        "/console/ledger",
        "/console/webhooks",
    ):
        await view.goto(path)
        assert await view.axe() == [], path
    # A phone: nothing wider than the screen but the tables' own scrolling boxes.
    await view.page.set_viewport_size({"width": 390, "height": 844})
    await view.goto("/console")
    overflow = await view.page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0


@pytest.mark.parametrize("console", [WEBHOOKS_ONE_RETRY], indirect=True)
async def test_replay_a_failed_delivery_to_a_real_receiver(
    console: tuple[Console, Api], database_url: str, commits: Commits
) -> None:
    view, api = console
    async with start_receiver() as receiver:
        await api.credit("ACME", 10)
        endpoint, event_id = await failed_endpoint(api, commits, receiver, "ACME")
        await view.login()
        await view.page.get_by_role("link", name="Webhooks").click()
        await view.page.wait_for_url(view.base + "/console/webhooks")
        await view.shot()
        row = view.page.locator(f"tr[id='{endpoint}']")
        assert (await row.locator(".state").inner_text()).startswith("disabled")
        assert await view.axe() == []
        await view.page.get_by_role("button", name=f"Enable {endpoint}").click()
        await view.page.wait_for_url(re.compile(r".*/console/webhooks\?done=.*"))
        await view.shot()
        assert await row.locator(".state").inner_text() == "enabled"
        await view.page.get_by_role("button", name=f"Replay {event_id} to {endpoint}").click()
        await view.shot()
        assert event_id in await view.text("#replay-what")
        assert await view.axe() == []
        assert len(receiver.got) == 2  # nothing is sent before the confirmation
        await view.page.get_by_role("button", name="Yes, replay").click()
        await view.page.wait_for_url(re.compile(r".*/console/webhooks\?endpoint=.*&done=.*"))
        await view.shot()

        await commits.until(
            lambda: delivered_again(database_url, event_id), what="the replayed event delivered"
        )
        assert len(receiver.got) == 3
        assert receiver.got[2].headers["webhook-id"] == event_id
        await view.page.reload()
        await view.shot()
        states = await view.page.locator("td.delivery").all_inner_texts()
        assert states[0] == "DELIVERED"
        # On a phone the wide tables scroll in their boxes; the page itself does not.
        await view.page.set_viewport_size({"width": 390, "height": 844})
        await view.page.reload()
        await view.shot()
        overflow = await view.page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0
