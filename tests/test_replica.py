"""DATABASE_READ_URL: history pages and admin reads come from a streaming replica; anything a client
must see right after its own write comes from the primary; a dead replica costs the primary load,
not an outage. A primary and a replica of our own, from the machine's PostgreSQL binaries."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from tests.builders import Api, Provider, start_service
from tests.servers import Replicated, primary_and_replica
from wallet.database import migrate_url, plain_url
from wallet.settings import Settings


@pytest.fixture(scope="module")
def replicated() -> Iterator[Replicated]:
    with primary_and_replica() as servers:
        asyncio.run(migrate_url(servers.primary_url))
        yield servers


async def caught_up(replicated: Replicated, *, applied: bool = True) -> None:
    """Until the replica has replayed (or, with `applied=False`, only received) everything the
    primary has written so far: a transaction on the primary whose commit waits for the standby
    (synchronous_commit remote_apply, or `on`: flushed there, which the replica reports as
    received). The primary names any standby synchronous; every other commit stays local. The
    standby takes WAL in order, so once it has this commit it has every earlier one."""
    primary = await asyncpg.connect(plain_url(replicated.primary_url))
    try:
        async with asyncio.timeout(30), primary.transaction():
            wait_for = "remote_apply" if applied else "on"
            await primary.execute(f"SET LOCAL synchronous_commit = {wait_for}")
            # A write of no table, so that the commit waits (a transaction that wrote no WAL does not).
            await primary.execute("SELECT pg_logical_emit_message(true, 'wallet-tests', 'caught up?')")
    finally:
        await primary.close()


async def replay(replicated: Replicated, *, paused: bool) -> None:
    replica = await asyncpg.connect(plain_url(replicated.replica_url))
    try:
        await replica.execute("SELECT pg_wal_replay_pause()" if paused else "SELECT pg_wal_replay_resume()")
    finally:
        await replica.close()


async def history(api: Api, client_id: str) -> list[str]:
    """The references of the client's ledger entries and the ids of its orders, as listed."""
    ledger = await api.http.get("/wallet/transactions", headers={"client-id": client_id})
    orders = await api.http.get("/orders", headers={"client-id": client_id})
    assert ledger.status_code == 200, ledger.text
    assert orders.status_code == 200, orders.text
    return [e["type"] for e in ledger.json()["data"]] + [o["orderId"] for o in orders.json()["data"]]


async def test_history_from_the_replica_own_writes_from_the_primary(
    replicated: Replicated, provider: Provider
) -> None:
    async with start_service(
        replicated.primary_url, provider.url, database_read_url=replicated.replica_url
    ) as api:
        assert (await api.credit("REPL", 100)).status_code == 200
        await caught_up(replicated)
        assert await history(api, "REPL") == ["CREDIT"]

        await replay(replicated, paused=True)  # the replica lags from here on, as far as it likes
        try:
            placed = await api.order("REPL", 30)
            assert placed.status_code == 201, placed.text
            order_id = placed.json()["data"]["orderId"]
            # The client's own write, read back at once: from the primary.
            assert await api.balance("REPL") == 70
            assert await api.order_status("REPL", order_id) == "COMPLETED"
            # History comes from the replica, which has not replayed the order yet.
            assert await history(api, "REPL") == ["CREDIT"]
            profile = await api.http.get("/admin/clients/REPL", headers=api.admin_headers)
            assert profile.json()["data"]["balance"] == 100
        finally:
            await replay(replicated, paused=False)
        await caught_up(replicated)
        assert await history(api, "REPL") == ["ORDER_DEDUCTION", "CREDIT", order_id]

        ready = await api.http.get("/ready")
        assert ready.status_code == 200
        assert ready.json()["data"]["replica"]["status"] == "ok"


async def statement(api: Api, path: str, headers: dict[str, str]) -> tuple[list[str], float]:
    """The types of a statement's entries and its closing balance."""
    response = await api.http.get(path, headers=headers)
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    return [e["type"] for e in data["entries"]], data["closingBalance"]


async def balance_at(api: Api, client_id: str, moment: datetime) -> float:
    response = await api.http.get(
        "/wallet/balance", params={"at": moment.isoformat()}, headers={"client-id": client_id}
    )
    assert response.status_code == 200, response.text
    return float(response.json()["data"]["balance"])


async def test_statements_and_past_balances_from_the_replica_now_from_the_primary(
    replicated: Replicated, provider: Provider
) -> None:
    async with start_service(
        replicated.primary_url, provider.url, database_read_url=replicated.replica_url
    ) as api:
        assert (await api.credit("STMT", 100)).status_code == 200
        await caught_up(replicated)
        own = ("/wallet/statement", {"client-id": "STMT"})
        admin = ("/admin/clients/STMT/statement", api.admin_headers)
        assert await statement(api, *own) == (["CREDIT"], 100)

        await replay(replicated, paused=True)
        try:
            placed = await api.order("STMT", 30)
            assert placed.status_code == 201, placed.text
            after_the_order = datetime.now(UTC)
            # Statements and a past moment's balance come from the replica, which has not
            # replayed the order: the primary would answer 70.
            assert await statement(api, *own) == (["CREDIT"], 100)
            assert await statement(api, *admin) == (["CREDIT"], 100)
            assert await balance_at(api, "STMT", after_the_order) == 100
            # A client created since the replica stopped replaying exists all the same: its reads
            # that the replica cannot answer come from the primary, never a 404.
            assert (await api.credit("NEWCOMER", 5)).status_code == 200
            newcomer = {"client-id": "NEWCOMER"}
            for path, headers in (
                ("/wallet/transactions", newcomer),
                ("/orders", newcomer),
                ("/wallet/statement", newcomer),
                ("/admin/clients/NEWCOMER", api.admin_headers),
                ("/admin/clients/NEWCOMER/ledger", api.admin_headers),
                ("/admin/clients/NEWCOMER/statement", api.admin_headers),
            ):
                answer = await api.http.get(path, headers=headers)
                assert answer.status_code == 200, (path, answer.text)
            assert await balance_at(api, "NEWCOMER", datetime.now(UTC)) == 5
            assert (await api.http.get("/admin/clients/NOBODY", headers=api.admin_headers)).status_code == 404
            # The balance now (no `at`, or an `at` not yet past) must show the order: the primary.
            assert await api.balance("STMT") == 70
            assert await balance_at(api, "STMT", datetime.now(UTC) + timedelta(days=1)) == 70
            # /ready reports both: the primary answers, the replica answers and lags (it has
            # received the order's WAL and not replayed it).
            await caught_up(replicated, applied=False)
            ready = await api.http.get("/ready")
            assert ready.status_code == 200, ready.text
            assert ready.json()["data"]["primary"] == "ok"
            assert ready.json()["data"]["replica"]["status"] == "ok"
            assert ready.json()["data"]["replica"]["lagSeconds"] > 0
        finally:
            await replay(replicated, paused=False)
        await caught_up(replicated)
        assert await statement(api, *own) == (["CREDIT", "ORDER_DEDUCTION"], 70)
        assert await balance_at(api, "STMT", after_the_order) == 70
        ready = await api.http.get("/ready")
        assert ready.json()["data"]["replica"] == {"status": "ok", "lagSeconds": 0}


async def test_a_dead_replica_reads_fall_back_to_the_primary(provider: Provider) -> None:
    with primary_and_replica() as servers:
        await migrate_url(servers.primary_url)
        async with start_service(
            servers.primary_url, provider.url, database_read_url=servers.replica_url
        ) as api:
            assert (await api.credit("GONE", 10)).status_code == 200
            await caught_up(servers)
            assert await history(api, "GONE") == ["CREDIT"]
            servers.stop_replica()
            assert (await api.credit("GONE", 5)).status_code == 200
            # A read on a pooled connection to the dead replica fails (503) and takes the
            # connection out of the pool; once a new one is refused at connect, reads go to the
            # primary. Each read moves that along, whatever the time: at most a pool's worth fail.
            for _ in range(Settings.model_fields["db_pool_size"].default + 1):
                history_read = await api.http.get("/wallet/transactions", headers={"client-id": "GONE"})
                if history_read.status_code != 503:
                    break
            assert history_read.status_code == 200, history_read.text
            assert len(history_read.json()["data"]) == 2
            for _ in range(Settings.model_fields["db_pool_size"].default + 1):
                statement = await api.http.get("/wallet/statement", headers={"client-id": "GONE"})
                if statement.status_code != 503:
                    break
            assert statement.status_code == 200, statement.text
            assert statement.json()["data"]["closingBalance"] == 15
            ready = await api.http.get("/ready")
            assert ready.status_code == 200, ready.text
            assert ready.json()["data"]["replica"]["status"] == "unreachable"
