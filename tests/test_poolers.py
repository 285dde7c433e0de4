"""DB_POOLER=transaction: the service behind a transaction-pooling PgBouncer (Debian's 1.18, no
prepared-statement tracking), started by the tests with fewer server connections than the
service has clients, so that transactions really move between server connections."""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import make_url

from tests.builders import ADMIN_KEY, LEDGER_KEY, Provider, spawn_service, start_service, watch_commits
from tests.servers import pgbouncer, primary_and_replica, relay
from tests.test_resolver import cut_once_it_waits
from wallet.database import MIGRATION_LOCK, migrate_url, plain_url

CLIENTS = [f"pool-{n}" for n in range(16)]
CREDIT = 1000
BURST = 360  # orders, credits and reads, all at once


@pytest.fixture(scope="module")
def tcp_server(postgres_url: str) -> Iterator[str]:
    """PgBouncer reaches PostgreSQL over TCP, as the `postgres` user when the tests run as root:
    the tests' server when it listens on TCP, else one of our own (the embedded server listens on
    a socket in a private directory only)."""
    if make_url(postgres_url).host:
        yield postgres_url
        return
    with primary_and_replica(with_replica=False) as servers:
        yield servers.primary_url


@pytest.fixture(scope="module")
def bouncer(tcp_server: str) -> Iterator[str]:
    """4 server connections for 2 instances x 2 workers x 20 pooled connections."""
    with pgbouncer(tcp_server, pool_size=4) as url:
        yield url


@pytest.fixture
async def own_database(tcp_server: str) -> AsyncIterator[str]:
    """A migrated database of the test's own on the server PgBouncer is in front of."""
    name = f"wallet_pool_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(plain_url(tcp_server))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        url = make_url(plain_url(tcp_server)).set(database=name).render_as_string(hide_password=False)
        await migrate_url(url)
        yield url
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def through(bouncer: str, database_url: str) -> str:
    """`database_url`'s database, reached through the PgBouncer."""
    return (
        make_url(bouncer).set(database=make_url(database_url).database).render_as_string(hide_password=False)
    )


@pytest.fixture
def pooled_url(bouncer: str, own_database: str) -> str:
    return through(bouncer, own_database)


def pooled_env(url: str, provider: Provider, pooler: str = "transaction") -> dict[str, str]:
    return {
        "DATABASE_URL": url,
        "DB_POOLER": pooler,
        "WORKERS": "2",
        "ADMIN_API_KEY": ADMIN_KEY,
        "LEDGER_KEY": LEDGER_KEY,
        "FULFILLMENT_API_URL": provider.url,
        "FULFILLMENT_TIMEOUT_SECONDS": "3",
        "FULFILLMENT_BACKOFF_SECONDS": "0.01",
        "FULFILLMENT_RETRY_MAX_SECONDS": "0.2",
        "RECOVERY_INTERVAL_SECONDS": "0.1",
        "RATE_LIMIT": "off",
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "info",
    }


async def wallet_cli(env: dict[str, str], *args: str) -> tuple[int, str]:
    """Run a `wallet` command; one that runs a minute has hung."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "wallet.cli",
        *args,
        env={**os.environ, **env},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


async def burst(instances: list[httpx.AsyncClient]) -> Counter[int]:
    """BURST requests at once, spread over the instances: orders, credits, balance reads and
    history pages, mixed."""
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    rng = random.Random(16)

    def one(n: int) -> asyncio.Task[httpx.Response]:
        client = rng.choice(CLIENTS)
        http = instances[n % len(instances)]
        kind = n % 6
        if kind in (0, 1):
            request = http.post("/orders", json={"amount": 3}, headers={"client-id": client})
        elif kind == 2:
            request = http.post(
                "/admin/wallet/credit",
                json={"client_id": client, "amount": 1},
                headers={**admin, "Idempotency-Key": uuid.uuid4().hex},
            )
        elif kind == 3:
            request = http.get("/wallet/balance", headers={"client-id": client})
        elif kind == 4:
            request = http.get("/wallet/transactions", headers={"client-id": client})
        else:
            request = http.get("/orders?limit=5", headers={"client-id": client})
        return asyncio.create_task(request)

    responses = await asyncio.gather(*(one(n) for n in range(BURST)))
    for response in responses:
        assert response.status_code < 500, response.text
    return Counter(r.status_code for r in responses)


async def test_a_burst_through_pgbouncer_in_transaction_mode(
    pooled_url: str, own_database: str, provider: Provider
) -> None:
    """Two instances (two `wallet serve`, 2 workers each), as two hosts would run them."""
    provider.set(error_status=503, error_rate=0.3)  # unknown outcomes: the resolver works too
    env = pooled_env(pooled_url, provider)
    limits = httpx.Limits(max_connections=200)
    async with (
        watch_commits(own_database) as commits,
        spawn_service(env) as server,
        spawn_service(env) as other,
        httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as http,
        httpx.AsyncClient(base_url=other.url, timeout=60, limits=limits) as other_http,
    ):
        await server.wait_for("Application startup complete", count=2)
        await other.wait_for("Application startup complete", count=2)
        # The sizing line: 2 workers x DB_POOL_SIZE 20, all PgBouncer's clients.
        sizing = [line for line in server.lines if '"database connections"' in line]
        assert len(sizing) == 1, server.lines[:20]
        assert json.loads(sizing[0])["total"] == 40, sizing
        # Its role has no lock_timeout, which only the role could give it here: said at start.
        assert any("wait for locks without a deadline" in line for line in server.lines), server.lines[:20]
        for client in CLIENTS:
            credited = await http.post(
                "/admin/wallet/credit",
                json={"client_id": client, "amount": CREDIT},
                headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            )
            assert credited.status_code == 200, credited.text
        statuses = await burst([http, other_http])
        assert statuses[201] > 0, statuses
        assert statuses[200] > 0, statuses
        provider.set()  # the provider recovers: the resolver finishes what is still unknown

        direct = await asyncpg.connect(plain_url(own_database))
        try:

            async def none_pending() -> bool:
                pending: int = await direct.fetchval("SELECT count(*) FROM orders WHERE status = 'PENDING'")
                return pending == 0

            await commits.until(none_pending, what="the resolver to finish every order through PgBouncer")
            # The money audit: what was credited, less what completed orders took, is in the wallets.
            credited_total = await direct.fetchval(
                "SELECT sum(amount) FROM ledger_entries WHERE type = 'CREDIT'"
            )
            taken = await direct.fetchval(
                "SELECT coalesce(sum(amount), 0) FROM orders WHERE status = 'COMPLETED'"
            )
            balances = await direct.fetchval("SELECT sum(balance) FROM wallets")
            assert balances == credited_total - taken
        finally:
            await direct.close()
        for instance in (server, other):
            assert not [line for line in instance.lines if "prepared statement" in line], instance.lines[-20:]

    code, output = await wallet_cli(env, "verify")
    assert code == 0, output


async def test_migrations_through_pgbouncer_twice_and_together(
    bouncer: str, tcp_server: str, provider: Provider
) -> None:
    """An empty database migrated through PgBouncer, by two processes at once and then again: none
    hangs, and no migration lock is left held on any server connection."""
    name = f"wallet_pool_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(plain_url(tcp_server))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        env = pooled_env(through(bouncer, f"postgresql:///{name}"), provider)
        first, second = await asyncio.gather(wallet_cli(env, "migrate"), wallet_cli(env, "migrate"))
        assert first[0] == 0, first
        assert second[0] == 0, second
        again = await wallet_cli(env, "migrate")
        assert again[0] == 0, again
        held = await admin.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = $1", MIGRATION_LOCK
        )
        assert held == 0
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


# A COMMIT that inserted an order waits for advisory lock 4242 (a deferred trigger of this
# test's own database), so a test can hold a placement's COMMIT on the server.
HOLD_COMMITS = """
CREATE FUNCTION hold_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_advisory_xact_lock(4242); RETURN NULL; END $$;
CREATE CONSTRAINT TRIGGER hold_commit AFTER INSERT ON orders
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION hold_commit();
"""


async def test_an_order_whose_commit_was_cut_off_behind_pgbouncer_is_answered_once_it_ended(
    own_database: str, pooled_url: str, provider: Provider
) -> None:
    """Behind a transaction pooler every statement runs between BEGIN and COMMIT, and the server
    process cannot be named, so the service cannot end it. When the network fails during the
    COMMIT, the server goes on and commits: the service must wait for that before it looks, and
    answer with the order."""
    holder = await asyncpg.connect(plain_url(own_database))
    watcher = await asyncpg.connect(plain_url(own_database))
    try:
        await holder.execute(HOLD_COMMITS)
        async with (
            relay(pooled_url) as path,
            start_service(path.url, provider.url, db_pooler="transaction") as api,
        ):
            await api.credit("C1", 100)
            await holder.execute("SELECT pg_advisory_lock(4242)")
            order = asyncio.create_task(api.order("C1", 30))
            await cut_once_it_waits(watcher, path, order)
            await holder.execute("SELECT pg_advisory_unlock(4242)")  # the COMMIT goes on
            response = await order
            placed = [row["order_id"] for row in await watcher.fetch("SELECT order_id FROM orders")]
    finally:
        await holder.close()
        await watcher.close()
    assert response.status_code in (201, 202), response.text
    assert placed == [response.json()["data"]["orderId"]]
