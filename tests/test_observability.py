"""What an operator sees: probes, Prometheus metrics that move with the traffic, and JSON log
lines that carry the request id the caller (and the provider) saw."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import event

from tests.builders import ADMIN_KEY, Api, Provider, dead_url, production_env, spawn_service, start_service
from wallet.database import create_engine, plain_url
from wallet.observability import track_pool, untrack_pool

Labels = tuple[tuple[str, str], ...]


async def scrape(api: Api) -> dict[tuple[str, Labels], float]:
    """Every sample of /metrics, keyed by sample name and sorted labels."""
    response = await api.http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: dict[tuple[str, Labels], float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def delta(
    before: dict[tuple[str, Labels], float], after: dict[tuple[str, Labels], float], name: str, **labels: str
) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


async def test_health_and_ready(database_url: str, provider: Provider) -> None:
    async with start_service(database_url, provider.url) as api:
        health = await api.http.get("/health")
        assert health.status_code == 200
        assert health.json() == {"success": True, "data": {"status": "ok"}}
        ready = await api.http.get("/ready")
        assert ready.status_code == 200
        assert ready.json() == {"success": True, "data": {"status": "ready", "primary": "ok"}}


async def test_ready_is_503_when_the_database_is_gone(
    postgres_url: str, database_url: str, provider: Provider
) -> None:
    async with start_service(database_url, provider.url) as api:
        assert (await api.http.get("/ready")).status_code == 200
        name = database_url.rsplit("/", 1)[1].split("?")[0]
        admin = await asyncpg.connect(plain_url(postgres_url))
        try:
            await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        finally:
            await admin.close()
        not_ready = await api.http.get("/ready")
        assert not_ready.status_code == 503
        assert not_ready.json()["code"] == "NOT_READY"
        assert (await api.http.get("/health")).status_code == 200
        # Every way a route reaches the database answers alike: a balance (batched, on asyncpg
        # itself), a history page (SQLAlchemy), an order (batched placement), which can also say
        # that no money moved, since no connection was had.
        client = {"client-id": "ACME"}
        answers = [
            await api.http.get("/wallet/balance", headers=client),
            await api.http.get("/wallet/transactions", headers=client),
            await api.http.post("/orders", headers=client, json={"amount": 1}),
        ]
        assert [(answer.status_code, answer.json()) for answer in answers] == [
            (503, {"success": False, "error": error, "code": "SERVICE_UNAVAILABLE"})
            for error in ["Service temporarily unavailable"] * 2
            + ["Service temporarily unavailable; no money moved"]
        ]


async def test_ready_is_503_when_nothing_listens_at_the_database_address(provider: Provider) -> None:
    port = dead_url().split(":")[2].split("/")[0]
    async with start_service(f"postgresql://postgres@127.0.0.1:{port}/wallet", provider.url) as api:
        response = await api.http.get("/ready")
        assert response.status_code == 503
        assert response.json() == {"success": False, "error": "Database unreachable", "code": "NOT_READY"}


async def test_metrics_move_when_orders_complete_fail_or_stay_unknown(
    database_url: str, provider: Provider
) -> None:
    async with start_service(
        database_url, provider.url, fulfillment_max_attempts=3, recovery_interval_seconds=3600
    ) as api:
        await api.credit("ACME", 100)
        before = await scrape(api)
        assert (await api.order("ACME", 10)).status_code == 201
        provider.set(error_status=500)
        assert (await api.order("ACME", 10)).status_code == 202
        provider.set(error_status=400)
        assert (await api.order("ACME", 10)).status_code == 502
        after = await scrape(api)

    assert delta(before, after, "wallet_orders_total", status="COMPLETED") == 1
    assert delta(before, after, "wallet_orders_total", status="FAILED") == 1
    for kind in ("fulfilled", "unknown", "refused"):
        assert delta(before, after, "wallet_order_outcomes_total", kind=kind, path="request") == 1
    # 1 fulfilled, 3 unknown (a 500 is asked again), 1 refused (a 400 is final)
    assert delta(before, after, "wallet_fulfillment_attempts_total", kind="fulfilled") == 1
    assert delta(before, after, "wallet_fulfillment_attempts_total", kind="unknown") == 3
    assert delta(before, after, "wallet_fulfillment_attempts_total", kind="refused") == 1
    assert delta(before, after, "wallet_fulfillment_retries_total") == 2
    route = {"method": "POST", "route": "/orders"}
    for status in ("201", "202", "502"):
        assert delta(before, after, "wallet_http_requests_total", status=status, **route) == 1
    assert delta(before, after, "wallet_http_request_duration_seconds_count", **route) == 3
    assert delta(before, after, "wallet_http_request_duration_seconds_bucket", le="+Inf", **route) == 3
    assert delta(before, after, "wallet_http_request_duration_seconds_sum", **route) > 0


async def test_metrics_count_rate_limit_refusals_and_unknown_routes(
    database_url: str, provider: Provider
) -> None:
    async with start_service(database_url, provider.url, rate_limit="3/minute", redis_url=None) as api:
        before = await scrape(api)
        statuses = [(await api.http.get("/no/such/route")).status_code for _ in range(5)]
        refused = await api.http.get("/orders/ORD-1703251234567-a1b2c3d4", headers={"client-id": "C1"})
        after = await scrape(api)
    assert statuses == [404, 404, 404, 429, 429]
    assert refused.status_code == 429
    assert delta(before, after, "wallet_rate_limited_total") == 3
    unmatched = {"method": "GET", "route": "unmatched"}
    assert delta(before, after, "wallet_http_requests_total", status="404", **unmatched) == 3
    assert delta(before, after, "wallet_http_requests_total", status="429", **unmatched) == 2
    # Refused before routing, yet counted under its route's template (never the path).
    order_route = {"method": "GET", "route": "/orders/{order_id}"}
    assert delta(before, after, "wallet_http_requests_total", status="429", **order_route) == 1


async def test_pool_gauge_counts_connections_in_use(database_url: str, provider: Provider) -> None:
    """A balance read held up by a table lock keeps one pooled connection checked out."""
    gauge = ("wallet_db_pool_connections_in_use", ())
    # The background jobs run once at start, then not again during the test (the intervals
    # below), but one may still hold a connection at first: a round in which the gauge moved
    # for another reason (its value after the read differs from before) is measured again.
    quiet = {"recovery_interval_seconds": 3600, "webhook_interval_seconds": 3600}
    async with start_service(database_url, provider.url, **quiet) as api:
        await api.credit("ACME", 5)
        assert (await scrape(api))[("wallet_db_pool_connections_max", ())] >= 20
        blocker = await asyncpg.connect(plain_url(database_url))
        try:
            rounds: list[tuple[float, float, float]] = []
            while not rounds or (rounds[-1][0] != rounds[-1][2] and len(rounds) < 5):
                idle = (await scrape(api))[gauge]
                lock = blocker.transaction()
                await lock.start()
                await blocker.execute("LOCK TABLE wallets IN ACCESS EXCLUSIVE MODE")
                read = asyncio.create_task(api.http.get("/wallet/balance", headers={"client-id": "ACME"}))
                waiting = 0
                while waiting == 0:
                    # pg_locks, not the session's query: a read that must first prepare its
                    # statement waits at Parse, while pg_stat_activity still shows its last query.
                    waiting = await blocker.fetchval(
                        """SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)
                           WHERE NOT l.granted AND l.relation = 'wallets'::regclass
                             AND a.application_name = 'wallet'"""
                    )
                busy = (await scrape(api))[gauge]
                await lock.rollback()
                assert (await read).status_code == 200
                rounds.append((idle, busy, (await scrape(api))[gauge]))
        finally:
            await blocker.close()
    idle, busy, after = rounds[-1]
    assert after == idle, rounds
    assert busy == idle + 1, rounds


async def test_request_id_is_returned_and_passed_to_the_provider(
    database_url: str, provider: Provider
) -> None:
    async with start_service(database_url, provider.url) as api:
        await api.credit("ACME", 100)
        given = f"req-{uuid.uuid4().hex}"
        order = await api.order("ACME", 1, headers={"X-Request-ID": given})
        assert order.status_code == 201
        assert order.headers["x-request-id"] == given
        assert provider.simulator.calls[-1].request_id == given

        generated = await api.order("ACME", 1)
        assert generated.status_code == 201
        request_id = generated.headers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}", request_id)
        assert provider.simulator.calls[-1].request_id == request_id

        unusable = await api.http.get("/health", headers={"X-Request-ID": "bad id with spaces"})
        assert re.fullmatch(r"[0-9a-f]{32}", unusable.headers["x-request-id"])


def json_lines(lines: list[str]) -> list[dict[str, Any]]:
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except ValueError:
            continue
    return parsed


async def test_production_logs_are_json_lines_with_the_request_id(
    database_url: str, provider: Provider
) -> None:
    env = {**production_env(database_url, provider, workers=1), "RATE_LIMIT": "1000/minute"}
    async with spawn_service(env) as server:
        await server.wait_for("Uvicorn running on")

        async with httpx.AsyncClient(base_url=server.url) as http:
            credit = await http.post(
                "/admin/wallet/credit",
                json={"client_id": "ACME", "amount": 10},
                headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            )
            assert credit.status_code == 200
            given = f"req-{uuid.uuid4().hex}"
            order = await http.post(
                "/orders", json={"amount": 1}, headers={"client-id": "ACME", "X-Request-ID": given}
            )
            assert order.status_code == 201
            assert order.headers["x-request-id"] == given
            await server.wait_for(given)

            # A bug (here: a column of an unexpected type) is a masked 500 that still carries
            # the request id, in the response and in the error's log line.
            conn = await asyncpg.connect(plain_url(database_url))
            try:
                await conn.execute("ALTER TABLE wallets ALTER COLUMN updated_at TYPE text")
            finally:
                await conn.close()
            failing = f"req-{uuid.uuid4().hex}"
            broken = await http.get("/wallet/balance", headers={"client-id": "ACME", "X-Request-ID": failing})
            assert broken.status_code == 500
            assert broken.json() == {
                "success": False,
                "error": "Internal server error",
                "code": "INTERNAL_ERROR",
            }
            assert broken.headers["x-request-id"] == failing
            assert broken.headers["ratelimit-limit"] == "1000"  # a 500 is a response like any other
            await server.wait_for('"event":"request"', count=3)

    errors = [entry for entry in json_lines(server.lines) if entry.get("request_id") == failing]
    assert [entry["event"] for entry in errors] == ["unhandled error", "request"]
    assert errors[0]["level"] == "error"
    assert "AttributeError" in errors[0]["exception"]
    assert errors[1]["status"] == 500
    assert provider.simulator.calls[-1].request_id == given
    logged = [entry for entry in json_lines(server.lines) if entry.get("request_id") == given]
    access = [entry for entry in logged if entry["event"] == "request"]
    assert len(access) == 1
    assert access[0]["method"] == "POST"
    assert access[0]["path"] == "/orders"
    assert access[0]["status"] == 201
    assert access[0]["level"] == "info"
    assert access[0]["pid"] == server.process.pid
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT[\d:.]+Z", access[0]["timestamp"])
    # In production every line is JSON, uvicorn's own included.
    assert all(line.startswith("{") for line in server.lines if line.strip()), server.lines


async def test_a_client_that_leaves_mid_body_is_a_499_not_an_error(
    database_url: str, provider: Provider
) -> None:
    """A client gone before its body arrived is not a server error: no 500 in the metrics (and
    so no error line to page anyone), a 499 as proxies count it, and no money moved."""
    async with start_service(database_url, provider.url) as api:
        await api.credit("ACME", 100)
        before = await scrape(api)
        url = httpx.URL(str(api.http.base_url))
        _, writer = await asyncio.open_connection(url.host, url.port)
        writer.write(
            b"POST /orders HTTP/1.1\r\nHost: test\r\nclient-id: ACME\r\n"
            b'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"amount": '
        )
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        route = {"method": "POST", "route": "/orders"}

        def counted(samples: dict[tuple[str, Labels], float]) -> dict[str, float]:
            """POST /orders requests by status."""
            return {
                dict(labels)["status"]: value
                for (name, labels), value in samples.items()
                if name == "wallet_http_requests_total" and dict(labels).items() >= route.items()
            }

        after = await scrape(api)
        while sum(counted(after).values()) == sum(counted(before).values()):
            after = await scrape(api)  # until the server has finished with the request
        assert delta(before, after, "wallet_http_requests_total", status="499", **route) == 1
        assert delta(before, after, "wallet_http_requests_total", status="500", **route) == 0
        assert await api.balance("ACME") == 100
    assert provider.simulator.calls == []


_FORKED_COUNTS = """
import os
from prometheus_client import CollectorRegistry, multiprocess
from wallet.observability import HTTP_REQUESTS, new_request_id

served = HTTP_REQUESTS.labels("GET", "/x", "200")
served.inc()
ids = {new_request_id()}
child = os.fork()
if child == 0:
    served.inc()
    served.inc()
    os.write(1, new_request_id().encode() + b" ")
    os._exit(0)
os.waitpid(child, 0)
served.inc()
registry = CollectorRegistry()
multiprocess.MultiProcessCollector(registry)
labels = {"method": "GET", "route": "/x", "status": "200"}
print(registry.get_sample_value("wallet_http_requests_total", labels))
print(new_request_id())
"""


def test_counts_of_a_forked_worker_are_its_own_and_add_up(tmp_path: Path) -> None:
    """With several workers, each process counts in a file of its own: a process forked after
    counting starts its own, so neither overwrites the other's counts. Request ids differ too."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    ran = subprocess.run(
        [sys.executable, "-c", _FORKED_COUNTS],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    child_id, total, parent_id = ran.stdout.split()
    assert float(total) == 4.0  # 2 in the parent, 2 in the child
    assert len(list(tmp_path.glob("counter_*.db"))) == 2
    assert child_id != parent_id
    assert re.fullmatch(r"[0-9a-f]{32}", child_id)


async def test_the_pool_gauge_counts_only_connections_checked_out(database_url: str) -> None:
    """A pooled connection the database dropped is made anew at its next checkout; if that fails
    (the database still away: here the `connect` hook raises), it was never checked out, and the
    gauge must not go below zero."""

    def in_use() -> float:
        return REGISTRY.get_sample_value("wallet_db_pool_connections_in_use") or 0.0

    engine = create_engine(database_url, pool_size=2)
    track_pool(engine, 2)
    failures: list[OSError] = []

    def set_up(dbapi_connection: Any, record: Any) -> None:
        if failures:
            raise failures.pop()

    event.listen(engine.sync_engine, "connect", set_up)
    before = in_use()
    try:
        async with engine.connect() as dropped:
            await dropped.invalidate()  # as after the database went away
        failures.append(OSError("the database went away while the connection was set up"))
        with pytest.raises(OSError, match="went away"):
            async with engine.connect():
                pass
        assert in_use() == before
        async with engine.connect():
            assert in_use() == before + 1
        assert in_use() == before
    finally:
        untrack_pool(2)
        await engine.dispose()
