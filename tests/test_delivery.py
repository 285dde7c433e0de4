"""The delivery job (delivery.py): a process killed mid-delivery loses nothing and at most
repeats a delivery under the same webhook-id; its work shows in the metrics."""

from __future__ import annotations

import asyncio
from collections import Counter

import asyncpg
import httpx

from tests.builders import (
    ADMIN_KEY,
    Provider,
    Receiver,
    scans_of,
    spawn_service,
    start_receiver,
    start_service,
)
from wallet import delivery
from wallet.database import Statement, plain_url


async def test_sigkill_mid_delivery_repeats_at_most_with_the_same_webhook_id(
    database_url: str, provider: Provider
) -> None:
    receiver = Receiver(gate=asyncio.Event())
    env = {
        "DATABASE_URL": database_url,
        "ADMIN_API_KEY": ADMIN_KEY,
        "FULFILLMENT_API_URL": provider.url,
        "RATE_LIMIT": "off",
        "WEBHOOK_ALLOW_PRIVATE": "true",
        "WEBHOOK_TIMEOUT_SECONDS": "1",
        "WEBHOOK_INTERVAL_SECONDS": "0.05",
        "WEBHOOK_RETRY_SCHEDULE": "0.05,0.05,0.05",
    }
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with start_receiver(receiver):
        async with spawn_service(env) as server, httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            await http.post("/admin/wallet/credit", json={"client_id": "C1", "amount": 100}, headers=admin)
            created = await http.post(
                "/webhook-endpoints", json={"url": receiver.url}, headers={"client-id": "C1"}
            )
            assert created.status_code == 201
            for _ in range(5):
                await http.post("/admin/wallet/debit", json={"client_id": "C1", "amount": 1}, headers=admin)

            await receiver.wait_for(lambda: len(receiver.got) >= 1, what="a delivery in flight")
            server.process.kill()  # while the receiver holds the first delivery
            await server.process.wait()
        receiver.gate.set()  # type: ignore[union-attr]
        async with start_service(
            database_url,
            provider.url,
            webhook_allow_private=True,
            webhook_interval_seconds=0.05,
            webhook_timeout_seconds=1.0,
        ) as api:
            debits = await api.http.get(
                "/events", params={"type": "wallet.debited"}, headers={"client-id": "C1"}
            )
            expected = {e["id"] for e in debits.json()["data"]}
            assert len(expected) == 5

            await receiver.wait_for(
                lambda: expected <= {d.headers["webhook-id"] for d in receiver.got[1:]},
                what="every event delivered after the restart",
            )
            seen = Counter(d.headers["webhook-id"] for d in receiver.got)
            assert set(seen) == expected
            assert seen[receiver.got[0].headers["webhook-id"]] == 2  # the one in flight, once more
            assert sum(seen.values()) == 6
            metrics = (await api.http.get("/metrics")).text
            assert 'wallet_webhook_deliveries_total{outcome="delivered"}' in metrics
            assert "wallet_webhook_queue_depth" in metrics
            assert "wallet_webhook_oldest_undelivered_age_seconds" in metrics


async def test_settling_a_delivery_reads_only_its_row_whatever_the_pending_backlog(
    direct_database_url: str,
) -> None:
    """An endpoint down for hours piles up PENDING deliveries before autovacuum re-analyzes the
    table. Recording an attempt's outcome must still find the delivery by its key, not walk
    every PENDING delivery (docs/benchmarks.md, "A planner trap in the settle statements")."""
    conn = await asyncpg.connect(plain_url(direct_database_url))
    try:
        await conn.execute("ALTER TABLE webhook_deliveries SET (autovacuum_enabled = false)")
        await conn.execute("SET session_replication_role = replica")  # no events or endpoints needed
        bulk = """
        INSERT INTO webhook_deliveries (client_id, endpoint_id, event_no, status, attempts, next_attempt_at)
        SELECT 'c' || (g % 100), 'we_x', g, $1, 1, CASE WHEN $1 = 'PENDING' THEN now() END
        FROM generate_series(1, $2) AS g"""
        await conn.execute(bulk, "DELIVERED", 100_000)
        await conn.execute("ANALYZE webhook_deliveries")
        await conn.execute(bulk, "PENDING", 10_000)
        row = await conn.fetchrow(
            "SELECT client_id, id FROM webhook_deliveries WHERE status = 'PENDING' LIMIT 1"
        )
        params = {
            "client_id": row["client_id"],
            "delivery_id": row["id"],
            "attempt": 1,
            "status": "DELIVERED",
            "delay": 1.0,
            "status_code": 200,
            "error": None,
        }
        scans = await scans_of(conn, Statement.of(delivery._SETTLE), params, "webhook_deliveries")
        assert scans
        assert max(rows for _, rows in scans) <= 1, scans
    finally:
        await conn.close()
