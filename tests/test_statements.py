"""Statements and the balance at a moment (SPEC §6): `from` inclusive, `to` exclusive, balances
that agree with the entries, CSV a spreadsheet opens as text, and clear 400s for bad periods."""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest

from tests.builders import Api, Provider, rows_held, start_service
from wallet import statements
from wallet.database import plain_url


async def entry_times(database_url: str, client_id: str) -> list[datetime]:
    """Ledger times with their microseconds (the API shows milliseconds)."""
    conn = await asyncpg.connect(plain_url(database_url))
    try:
        rows = await conn.fetch(
            "SELECT created_at FROM ledger_entries WHERE client_id = $1 ORDER BY entry_no", client_id
        )
    finally:
        await conn.close()
    return [row["created_at"] for row in rows]


async def shown_time(api: Api, client_id: str, n: int) -> str:
    """The createdAt the API shows for the client's n-th entry (from 0, oldest first)."""
    response = await api.http.get("/wallet/transactions", headers={"client-id": client_id})
    created: str = list(reversed(response.json()["data"]))[n]["createdAt"]
    return created


def at(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat()


async def get_statement(api: Api, client_id: str, **params: str) -> dict[str, Any]:
    response = await api.http.get("/wallet/statement", params=params, headers={"client-id": client_id})
    assert response.status_code == 200, response.text
    assert response.headers["vary"] == "Accept"
    data: dict[str, Any] = response.json()["data"]
    return data


async def test_whole_history_statement(database_url: str, provider: Provider) -> None:
    async with start_service(database_url, provider.url) as api:
        await api.credit("C1", 1000.5)
        await api.debit("C1", 0.3)
        await api.order("C1", 100)
        await api.credit("C2", 7)
        data = await get_statement(api, "C1")
        assert data["clientId"] == "C1"
        assert data["from"] is None
        assert data["openingBalance"] == 0
        assert data["closingBalance"] == 900.2
        assert data["totals"] == {"CREDIT": 1000.5, "DEBIT": 0.3, "ORDER_DEDUCTION": 100}
        assert [e["entryNo"] for e in data["entries"]] == [1, 2, 3]
        assert [e["type"] for e in data["entries"]] == ["CREDIT", "DEBIT", "ORDER_DEDUCTION"]
        admin = await api.http.get("/admin/clients/C1/statement", headers=api.admin_headers)
        assert admin.status_code == 200
        assert admin.json()["data"]["entries"] == data["entries"]
        assert (await api.http.get("/admin/clients/C1/statement")).status_code == 401


async def test_from_is_inclusive_and_to_exclusive(database_url: str, provider: Provider) -> None:
    """Periods are cut at the times the API shows (milliseconds): an entry shown at `from` is in
    the period, one shown at `to` is in the next, whatever microseconds it was stored with."""
    async with start_service(database_url, provider.url) as api:
        for amount in (10, 20, 30, 40):
            await api.credit("C1", amount)
        shown = [e["createdAt"] for e in (await get_statement(api, "C1"))["entries"]]
        start, end = shown[1], shown[3]
        data = await get_statement(api, "C1", **{"from": start, "to": end})
        assert (data["from"], data["to"]) == (start, end)
        inside = [n for n, t in enumerate(shown, 1) if start <= t < end]
        assert 2 in inside
        assert 4 not in inside
        assert [e["entryNo"] for e in data["entries"]] == inside
        assert data["openingBalance"] == sum((10, 20, 30, 40)[: inside[0] - 1])
        assert data["closingBalance"] == sum((10, 20, 30, 40)[: inside[-1]])
        # Consecutive periods neither share nor miss an entry, cut at a time copied from an answer
        # or at any microsecond within that millisecond.
        for cut in (end, end.replace("Z", "999+00:00")):
            rest = await get_statement(api, "C1", **{"from": cut})
            assert rest["from"] == end
            assert [e["entryNo"] for e in rest["entries"]] == list(range(inside[-1] + 1, 5))
            assert rest["openingBalance"] == data["closingBalance"]
        empty = await get_statement(api, "C1", **{"from": end, "to": end})
        assert empty["entries"] == []
        assert empty["openingBalance"] == empty["closingBalance"] == data["closingBalance"]


# Any session of the test's database waiting for a row lock (here only the service's credit).
WAITING_ON_A_LOCK = """SELECT count(*) FROM pg_stat_activity
    WHERE datname = current_database() AND wait_event_type = 'Lock'"""


@pytest.mark.parametrize("movement", ["credit", "debit", "order"])
async def test_a_statement_read_while_a_movement_waits_stays_true(
    database_url: str, direct_database_url: str, provider: Provider, movement: str
) -> None:
    """A movement that waited for its wallet's lock (another session held the row) is dated when
    it got the lock: a statement read while it waited says the same when asked again later, and
    the movement falls in the period after it. (An order is paid by group commit's statement.)"""
    async with start_service(database_url, provider.url) as api:
        await api.credit("C1", 10)
        move: Callable[[str, int], Coroutine[Any, Any, httpx.Response]] = getattr(api, movement)
        watcher = await asyncpg.connect(plain_url(direct_database_url))
        try:
            async with rows_held(direct_database_url, "wallets", "client_id = 'C1'"):
                moving = asyncio.create_task(move("C1", 5))
                async with asyncio.timeout(30):
                    while not await watcher.fetchval(WAITING_ON_A_LOCK):
                        pass
                during = await get_statement(api, "C1")
            assert (await moving).status_code in (200, 201)
        finally:
            await watcher.close()
        assert during["closingBalance"] == 10
        assert await get_statement(api, "C1", to=during["to"]) == during
        after = await get_statement(api, "C1", **{"from": during["to"]})
        assert [e["amount"] for e in after["entries"]] == [5]
        assert after["openingBalance"] == 10


async def test_balance_at_a_moment(database_url: str, provider: Provider) -> None:
    async with start_service(database_url, provider.url) as api:
        await api.credit("C1", 10)
        await api.credit("C1", 20.05)
        times = await entry_times(database_url, "C1")

        async def balance_at(moment: str) -> Any:
            response = await api.http.get(
                "/wallet/balance", params={"at": moment}, headers={"client-id": "C1"}
            )
            assert response.status_code == 200, response.text
            return response.json()["data"]["balance"]

        assert await balance_at("2000-01-01T00:00:00Z") == 0
        # An entry dated at `at` is in it, read to the millisecond the API shows: an entry's
        # createdAt gives the balance after it, the millisecond before gives the one before.
        shown = [await shown_time(api, "C1", n) for n in (0, 1)]
        assert await balance_at(shown[0]) == 10
        assert await balance_at(at(times[0])) == 10
        assert await balance_at(at(times[0] - timedelta(milliseconds=1))) == 0
        assert await balance_at(shown[1]) == 30.05
        assert await balance_at("2999-01-01T00:00:00+02:00") == 30.05
        # Without `at`, the usual answer; `at` its lastUpdated gives that balance again.
        now = await api.wallet("C1")
        assert now["balance"] == 30.05
        assert await balance_at(now["lastUpdated"]) == 30.05
        assert "held" in now
        missing = await api.http.get(
            "/wallet/balance", params={"at": at(times[0])}, headers={"client-id": "X"}
        )
        assert missing.status_code == 404


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"from": "yesterday"}, "INVALID_TIME"),
        ({"to": "2026-01-01T00:00:00"}, "INVALID_TIME"),  # no zone: a different moment for each reader
        ({"from": "2026-13-01T00:00:00Z"}, "INVALID_TIME"),
        ({"from": "0001-01-01T00:00:00+14:00"}, "INVALID_TIME"),  # before year 1 in UTC: no moment
        ({"to": "9999-12-31T23:59:59-12:00"}, "INVALID_TIME"),
        ({"from": "2026-01-02T00:00:00Z", "to": "2026-01-01T00:00:00Z"}, "INVALID_PERIOD"),
        ({"format": "xml"}, "VALIDATION_ERROR"),
        ({"from": "2026-01-01T00:00:00Z" + " " * 60}, "VALIDATION_ERROR"),
    ],
)
async def test_bad_periods_are_400s(
    database_url: str, provider: Provider, params: dict[str, str], code: str
) -> None:
    async with start_service(database_url, provider.url) as api:
        await api.credit("C1", 1)
        response = await api.http.get("/wallet/statement", params=params, headers={"client-id": "C1"})
        assert response.status_code == 400, response.text
        assert response.json()["code"] == code
        balance = await api.http.get("/wallet/balance", params={"at": "noon"}, headers={"client-id": "C1"})
        assert balance.status_code == 400
        assert balance.json()["code"] == "INVALID_TIME"


async def test_unknown_client_is_404(database_url: str, provider: Provider) -> None:
    async with start_service(database_url, provider.url) as api:
        response = await api.http.get("/wallet/statement", headers={"client-id": "NOPE"})
        assert response.status_code == 404
        admin = await api.http.get("/admin/clients/NOPE/statement", headers=api.admin_headers)
        assert admin.status_code == 404


async def test_csv_opens_as_text_in_a_spreadsheet(database_url: str, provider: Provider) -> None:
    hostile = ['=HYPERLINK("http://x")', "+1+1", "-2", "@SUM(A1)", "\tTAB", "\rCR", 'plain, "quoted"']
    async with start_service(database_url, provider.url) as api:
        for n, description in enumerate(hostile, start=1):
            await api.credit("C1", 1000 + n / 100, description=description)
        for headers, params in (
            ({"client-id": "C1"}, {"format": "csv"}),
            ({"client-id": "C1", "Accept": "text/csv"}, {}),
        ):
            response = await api.http.get("/wallet/statement", params=params, headers=headers)
            assert response.status_code == 200, response.text
            assert response.headers["content-type"].startswith("text/csv")
            assert "attachment" in response.headers["content-disposition"]
            assert response.content.startswith(b"\xef\xbb\xbf")  # UTF-8 byte-order mark
            rows = list(csv.reader(io.StringIO(response.content.decode("utf-8-sig"), newline="")))
            assert rows[0] == statements.CSV_HEADER
            assert len(rows) == 1 + 1 + len(hostile) + 1
            # The balances the JSON gives, as rows of their own around the entries.
            assert rows[1] == ["", "", "OPENING_BALANCE", "", "", "0.00", "", ""]
            assert rows[-1][2:] == ["CLOSING_BALANCE", "", "", "7000.28", "", ""]
            assert rows[-1][1] >= rows[-2][1]  # the period's end: "until now"
            assert response.headers["vary"] == "Accept"  # the same URL answers JSON or CSV
            rows = rows[1:-1]
            descriptions = [row[7] for row in rows[1:]]
            assert descriptions == [
                '\'=HYPERLINK("http://x")',
                "'+1+1",
                "'-2",
                "'@SUM(A1)",
                "'\tTAB",
                "'\rCR",
                'plain, "quoted"',
            ]
            assert [row[3] for row in rows[1:3]] == ["1000.01", "1000.02"]
            assert rows[2][4] == "1000.01"
            assert all(not cell.startswith(("=", "+", "-", "@")) for row in rows for cell in row)


async def test_a_period_over_the_cap_is_refused(
    database_url: str, provider: Provider, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(statements, "STATEMENT_MAX_ENTRIES", 3)
    async with start_service(database_url, provider.url) as api:
        for _ in range(4):
            await api.credit("C1", 1)
        response = await api.http.get("/wallet/statement", headers={"client-id": "C1"})
        assert response.status_code == 400
        assert response.json()["code"] == "STATEMENT_TOO_LARGE"
        times = await entry_times(database_url, "C1")
        narrower = await get_statement(api, "C1", **{"from": at(times[1])})
        assert len(narrower["entries"]) == 3


async def test_statement_reads_a_range_of_the_time_index(database_url: str) -> None:
    """The period's entries come from one range scan of ledger_client_time, in order, no sort."""
    conn = await asyncpg.connect(plain_url(database_url))
    try:
        await conn.execute("SET enable_seqscan = off")
        rows = await conn.fetch(
            "EXPLAIN SELECT * FROM ledger_entries WHERE client_id = 'C1' AND created_at >= now() "
            "AND created_at < now() + interval '1 day' ORDER BY created_at, entry_no LIMIT 10"
        )
    finally:
        await conn.close()
    plan = "\n".join(row["QUERY PLAN"] for row in rows)
    assert "ledger_client_time" in plan
    assert "Sort" not in plan
