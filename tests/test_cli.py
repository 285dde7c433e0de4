"""`wallet serve` and `wallet migrate` as an operator runs them: real processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import make_url

from tests.builders import Provider, spawn_service
from wallet.database import connection_limit, migrate_url, plain_url


async def test_serve_with_embedded_postgres_answers_the_original_examples(
    tmp_path: Path, provider: Provider
) -> None:
    """No DATABASE_URL: an embedded PostgreSQL starts under DATA_DIR and stops with the server.
    SIGTERM lets the order in flight finish before the process exits."""
    data_dir = tmp_path / "data"
    gate = asyncio.Event()
    env = {
        "DATA_DIR": str(data_dir),
        "FULFILLMENT_API_URL": provider.url,
        "LOG_LEVEL": "info",
        "RATE_LIMIT": "100/minute",
    }
    async with (
        spawn_service(env, unset=("DATABASE_URL", "REDIS_URL", "ADMIN_API_KEY")) as server,
        httpx.AsyncClient(base_url=server.url, timeout=30) as http,
    ):
        key_lines = [line for line in server.lines if "development admin key:" in line]
        assert len(key_lines) == 1
        admin_key = key_lines[0].rsplit(" ", 1)[-1]
        assert (data_dir / "postmaster.pid").exists()

        credit = await http.post(
            "/admin/wallet/credit",
            json={"client_id": "TEST_CLIENT", "amount": 1000},
            headers={"Authorization": f"Bearer {admin_key}"},
        )
        assert credit.status_code == 200
        assert credit.headers["RateLimit-Limit"] == "100"
        balance = await http.get("/wallet/balance", headers={"client-id": "TEST_CLIENT"})
        assert balance.json()["data"]["balance"] == 1000
        order = await http.post("/orders", json={"amount": 50.00}, headers={"client-id": "TEST_CLIENT"})
        assert order.status_code == 201
        order_id = order.json()["data"]["orderId"]
        details = await http.get(f"/orders/{order_id}", headers={"client-id": "TEST_CLIENT"})
        assert details.json()["data"]["status"] == "COMPLETED"

        provider.set(gate=gate)
        in_flight = asyncio.create_task(
            http.post("/orders", json={"amount": 25}, headers={"client-id": "TEST_CLIENT"})
        )
        await provider.simulator.wait_for_calls(2)
        server.process.send_signal(signal.SIGTERM)
        await server.wait_for("Shutting down")
        gate.set()
        finished = await in_flight
        assert finished.status_code == 201
        assert await asyncio.wait_for(server.process.wait(), 60) == 0
    assert not (data_dir / "postmaster.pid").exists(), "the embedded PostgreSQL was left running"


async def test_serve_uses_database_url(database_url: str, provider: Provider) -> None:
    env = {"DATABASE_URL": database_url, "FULFILLMENT_API_URL": provider.url, "LOG_LEVEL": "info"}
    async with (
        spawn_service(env, unset=("ADMIN_API_KEY",)) as server,
        httpx.AsyncClient(base_url=server.url, timeout=30) as http,
    ):
        assert (await http.get("/ready")).status_code == 200
        assert not any("embedded PostgreSQL" in line for line in server.lines)
        assert not any("more database connections" in line for line in server.lines)


async def test_serve_warns_when_its_pools_could_exhaust_the_database(
    database_url: str, provider: Provider
) -> None:
    allowed = await connection_limit(database_url)
    workers = allowed // 200 + 1  # with 200 connections each (the most DB_POOL_SIZE allows)
    env = {
        "DATABASE_URL": database_url,
        "FULFILLMENT_API_URL": provider.url,
        "WORKERS": str(workers),
        "DB_POOL_SIZE": "200",
        "LOG_FORMAT": "json",
    }
    async with spawn_service(env) as server:
        # Checked before the server starts serving, so the line is in by the time it has started.
        warnings = [json.loads(line) for line in server.lines if "more database connections" in line]
    assert len(warnings) == 1, server.lines
    warning = warnings[0]
    assert (warning["level"], warning["wanted"], warning["allowed"]) == ("warning", 200 * workers, allowed)


async def test_workers_without_redis_share_one_rate_limit(database_url: str, provider: Provider) -> None:
    """SPEC §1: counts that must be shared live in PostgreSQL or Redis. With two workers and no
    Redis, a client opening a new connection per request (spread over both workers) still gets
    exactly RATE_LIMIT answers before its 429s, and as many login attempts as the console allows."""
    env = {
        "DATABASE_URL": database_url,
        "FULFILLMENT_API_URL": provider.url,
        "WORKERS": "2",
        "RATE_LIMIT": "5/minute",
        "CONSOLE_LOGIN_RATE": "3/minute",
        "TRUSTED_PROXIES": "127.0.0.1/32",
    }

    async def fresh_connection(method: str, path: str, ip: str, **extra: Any) -> int:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            response = await http.request(method, path, headers={"X-Forwarded-For": ip}, **extra)
        return response.status_code

    async with spawn_service(env, unset=("REDIS_URL",)) as server:
        # Without a client-id each read is a 400, counted like any other answer.
        reads = [await fresh_connection("GET", "/wallet/balance", "192.0.2.1") for _ in range(12)]
        # The console's login limit, counted alike (5 attempts: within the API's limit too).
        logins = [
            await fresh_connection("POST", "/console/login", "192.0.2.2", data={"key": "no"})
            for _ in range(5)
        ]
    assert reads == [400] * 5 + [429] * 7
    assert logins == [403] * 3 + [429] * 2


def wallet(command: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """`wallet <command>` as an operator runs it, in `cwd` (which holds no .env)."""
    return subprocess.run(
        [sys.executable, "-m", "wallet.cli", command],
        env={**os.environ, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@contextlib.contextmanager
def scratch_database(postgres_url: str) -> Iterator[str]:
    """A new, empty database for the block (its URL), dropped afterwards."""
    name = f"wallet_cli_{uuid.uuid4().hex[:12]}"
    asyncio.run(sql(plain_url(postgres_url), f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(plain_url(postgres_url)).set(database=name).render_as_string(hide_password=False)
    finally:
        asyncio.run(sql(plain_url(postgres_url), f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def sql(url: str, statement: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        rows: list[asyncpg.Record] = await conn.fetch(statement)
    finally:
        await conn.close()
    return rows


def test_migrate_creates_the_schema(postgres_url: str, tmp_path: Path) -> None:
    with scratch_database(postgres_url) as url:
        for _ in range(2):  # the second run finds nothing to do
            result = wallet("migrate", {"DATABASE_URL": url}, tmp_path)
            assert result.returncode == 0, result.stderr
        rows = asyncio.run(sql(url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"))
    tables = {r["tablename"] for r in rows}
    assert {"clients", "wallets", "ledger_entries", "orders", "idempotency_keys", "api_keys"} <= tables


@pytest.mark.parametrize("command", ["serve", "migrate", "verify"])
def test_a_database_it_cannot_use_is_one_line_naming_the_variable(
    postgres_url: str, tmp_path: Path, command: str
) -> None:
    missing = f"wallet_cli_missing_{uuid.uuid4().hex[:12]}"
    url = make_url(plain_url(postgres_url)).set(database=missing).render_as_string(hide_password=False)
    result = wallet(command, {"DATABASE_URL": url, "PORT": "0", "DATA_DIR": str(tmp_path / "data")}, tmp_path)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last == f'wallet: cannot use the database (DATABASE_URL): database "{missing}" does not exist'
    assert "Traceback" not in result.stderr


def test_a_database_migrated_by_a_newer_release_is_one_line(postgres_url: str, tmp_path: Path) -> None:
    with scratch_database(postgres_url) as url:
        asyncio.run(migrate_url(url))
        asyncio.run(sql(url, "UPDATE alembic_version SET version_num = '9999'"))
        result = wallet("migrate", {"DATABASE_URL": url}, tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "wallet: cannot migrate the database (DATABASE_URL): Can't locate revision identified by '9999'"
    )


@contextlib.asynccontextmanager
async def standalone_simulator(*flags: str) -> AsyncIterator[str]:
    """`wallet simulator --port 0 FLAGS` as its own process; yields the URL it announces."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "wallet.cli", "simulator", "--port", "0", *flags, stderr=subprocess.PIPE
    )
    try:
        assert process.stderr is not None
        while b"simulator at " not in (line := await asyncio.wait_for(process.stderr.readline(), 30)):
            assert line, "the simulator exited without announcing its URL"
        yield line.decode().rsplit(" ", 1)[1].strip()
    finally:
        process.terminate()
        await process.wait()


async def test_standalone_simulator_injects_the_faults_it_is_given() -> None:
    order_id = "ORD-1703251234567-a1b2c3d4"
    order = {"orderId": order_id, "clientId": "C1", "amount": 1}
    async with standalone_simulator() as url, httpx.AsyncClient() as http:
        first = await http.post(url, json=order, headers={"Idempotency-Key": order_id})
        again = await http.post(url, json=order, headers={"Idempotency-Key": order_id})
        assert first.status_code == again.status_code == 201
        assert first.json()["id"] == again.json()["id"]
    async with standalone_simulator("--error-status", "503") as url, httpx.AsyncClient() as http:
        assert (await http.post(url, json=order)).status_code == 503
    async with standalone_simulator("--hang") as url, httpx.AsyncClient(timeout=0.5) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.post(url, json=order)


async def test_standalone_simulator_answers_late_and_looks_orders_up() -> None:
    """A developer can watch the unknown-outcome path by hand: the order is fulfilled at once,
    the answer comes after the caller gave up, and the status endpoint tells the truth."""
    order_id = "ORD-1703251234567-0badc0de"
    order = {"orderId": order_id, "clientId": "C1", "amount": 1}
    async with standalone_simulator("--answer-late", "5") as url, httpx.AsyncClient(timeout=0.5) as http:
        assert (await http.get(f"{url}/{order_id}")).status_code == 404
        with pytest.raises(httpx.ReadTimeout):
            await http.post(url, json=order, headers={"Idempotency-Key": order_id})
        found = await http.get(f"{url}/{order_id}")
        assert found.status_code == 200
        assert found.json()["orderId"] == order_id
