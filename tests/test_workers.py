"""WORKERS=N: N processes on one port. They share one rate limit (through Redis with REDIS_URL,
else through PostgreSQL), and /metrics in any of them reports all of them."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import json
import os
import re
import signal
import sys
import uuid
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.builders import ADMIN_KEY, LEDGER_KEY, Provider, ServerProcess, production_env, spawn_service

LIMIT = 30
REQUESTS = 40


def metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def access_log(server: ServerProcess) -> dict[str, dict[str, Any]]:
    """The access log lines, by request id."""
    lines = {}
    for line in server.lines:
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("event") == "request":
                lines[entry["request_id"]] = entry
    return lines


async def send_requests(server: ServerProcess, client_ip: str) -> list[tuple[str, httpx.Response]]:
    """One admin credit, then balance reads; each on a new connection, so that they are spread
    over the workers by the kernel, and from one client address (via the trusted proxy header)."""
    sent = []
    async with httpx.AsyncClient(
        base_url=server.url, limits=httpx.Limits(max_keepalive_connections=0)
    ) as http:
        for n in range(REQUESTS):
            request_id = f"rl-{n}-{uuid.uuid4().hex}"
            headers = {"X-Forwarded-For": client_ip, "X-Request-ID": request_id, "Connection": "close"}
            if n == 0:
                headers["Authorization"] = f"Bearer {ADMIN_KEY}"
                response = await http.post(
                    "/admin/wallet/credit", json={"client_id": "ACME", "amount": 5}, headers=headers
                )
            else:
                response = await http.get("/wallet/balance", headers={**headers, "client-id": "ACME"})
            assert response.status_code in (200, 429), response.text
            sent.append((request_id, response))
    return sent


async def test_workers_share_the_rate_limit(database_url: str, redis_url: str | None) -> None:
    # Its own bucket: the Redis may be shared with other runs of this test.
    client_ip = str(ipaddress.IPv6Address(uuid.uuid4().int))
    env = {
        "WORKERS": "2",
        "DATABASE_URL": database_url,
        "ADMIN_API_KEY": ADMIN_KEY,
        "RATE_LIMIT": f"{LIMIT}/minute",
        "TRUSTED_PROXIES": "127.0.0.1",
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "info",
    }
    if redis_url:
        env["REDIS_URL"] = redis_url
    async with spawn_service(env) as server:
        await server.wait_for("Application startup complete", count=2)
        sent = await send_requests(server, client_ip)
        await server.wait_for('"event":"request"', count=REQUESTS)
        async with httpx.AsyncClient(base_url=server.url) as http:
            metrics = (await http.get("/metrics")).text

    served_by = {rid: entry["pid"] for rid, entry in access_log(server).items()}
    assert len(served_by) >= REQUESTS
    per_worker: dict[int, list[httpx.Response]] = collections.defaultdict(list)
    for request_id, response in sent:
        per_worker[served_by[request_id]].append(response)
    assert server.process.pid not in per_worker  # the supervisor serves nothing
    assert len(per_worker) == 2, "every request went to one worker"
    statuses = [response.status_code for _, response in sent]
    refused = statuses.count(429)

    # One count for both workers (in Redis, or without it in PostgreSQL): exactly the limit gets
    # through, in order.
    assert statuses == [200] * LIMIT + [429] * (REQUESTS - LIMIT)
    remaining = [int(response.headers["ratelimit-remaining"]) for _, response in sent[:LIMIT]]
    assert remaining == list(range(LIMIT - 1, -1, -1))
    assert all(
        int(response.headers["retry-after"]) >= 1 for _, response in sent if response.status_code == 429
    )

    # Metrics of both workers, whichever one answered the scrape.
    assert metric(metrics, "wallet_rate_limited_total") == refused
    balance_ok = metric(metrics, "wallet_http_requests_total", route="/wallet/balance", status="200")
    assert balance_ok == statuses.count(200) - 1
    assert metric(metrics, "wallet_http_requests_total", route="/admin/wallet/credit", status="200") == 1


async def _request_on_own_connection(server: ServerProcess, opened: asyncio.Barrier, request_id: str) -> None:
    """Connect, wait until every other connection is open too, then send one request."""
    host, port = server.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    await opened.wait()
    writer.write(
        f"GET /wallet/balance HTTP/1.1\r\nHost: {host}\r\nclient-id: SPREAD\r\n"
        f"X-Request-ID: {request_id}\r\nConnection: close\r\n\r\n".encode()
    )
    answer = await reader.read()
    writer.close()
    await writer.wait_closed()
    assert answer.startswith(b"HTTP/1.1 404"), answer  # no such wallet: answered, and cheaply


async def test_connections_are_spread_over_the_workers(database_url: str) -> None:
    """Connections opened together (as a load balancer's or wrk's are) are spread over the
    workers: with one shared listening socket, one worker often accepted all of them while the
    other idled."""
    connections, rounds = 64, 3
    env = {
        "WORKERS": "2",
        "DATABASE_URL": database_url,
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "info",
        "RATE_LIMIT": "off",
    }
    async with spawn_service(env) as server:
        await server.wait_for("Application startup complete", count=2)
        batches = []
        for n in range(rounds):
            opened = asyncio.Barrier(connections)
            ids = [f"spread-{n}-{uuid.uuid4().hex}" for _ in range(connections)]
            await asyncio.gather(*(_request_on_own_connection(server, opened, rid) for rid in ids))
            batches.append(ids)
        # Every line, however the workers' writes interleave (a line run into another is lost).
        async with asyncio.timeout(30):
            await server.wait_for('"event":"request"', count=connections * rounds)
    served_by = {rid: entry["pid"] for rid, entry in access_log(server).items()}
    for ids in batches:
        per_worker = collections.Counter(served_by[rid] for rid in ids)
        # Hashed over two sockets, a worker gets under a quarter of 64 connections in about one
        # of 40,000 rounds.
        assert len(per_worker) == 2, per_worker
        assert min(per_worker.values()) >= connections // 4, per_worker


async def test_a_second_service_on_a_port_in_use_refuses_to_start(
    database_url: str, provider: Provider
) -> None:
    """The workers bind with SO_REUSEPORT, which a second `wallet serve` of the same user could
    share, silently taking half of the first one's connections: it must stop instead."""
    env = production_env(database_url, provider, workers=2)
    async with spawn_service(env) as server:
        port = server.url.rsplit(":", 1)[1]
        second = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "wallet.cli",
            "serve",
            env={**os.environ, "LEDGER_KEY": LEDGER_KEY, **env, "PORT": port, "HOST": "127.0.0.1"},
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # its own process group, workers included
        )
        try:
            _, stderr = await asyncio.wait_for(second.communicate(), 60)
        finally:  # if it did start (the fault this test is about), it must not outlive the test
            with contextlib.suppress(ProcessLookupError):
                os.killpg(second.pid, signal.SIGKILL)
        assert second.returncode == 3
        assert f"wallet: cannot listen on HOST:PORT 127.0.0.1:{port}" in stderr.decode()
        async with httpx.AsyncClient(base_url=server.url) as http:
            assert (await http.get("/health")).status_code == 200


async def test_a_replaced_worker_leaves_no_samples_behind(database_url: str, provider: Provider) -> None:
    """A worker killed and replaced: gauges every worker keeps live (the pools' sizes) count the
    workers serving, not the dead one as well."""
    env = production_env(database_url, provider, workers=2)
    async with spawn_service(env) as server, httpx.AsyncClient(base_url=server.url) as http:
        await server.wait_for("Application startup complete", count=2)
        pools = metric((await http.get("/metrics")).text, "wallet_db_pool_connections_max")
        assert pools > 0
        pids = [
            int(p) for line in server.lines for p in re.findall(r"Started server process \[(\d+)\]", line)
        ]
        os.kill(pids[0], signal.SIGKILL)
        await server.wait_for(f"Child process [{pids[0]}] died")
        await server.wait_for("Application startup complete", count=3)
        assert metric((await http.get("/metrics")).text, "wallet_db_pool_connections_max") == pools
