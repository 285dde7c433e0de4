"""The delivery job (delivery.py): a process killed mid-delivery loses nothing and at most
repeats a delivery under the same webhook-id; its work shows in the metrics."""

from __future__ import annotations

import asyncio
from collections import Counter

import httpx

from tests.builders import ADMIN_KEY, Provider, Receiver, spawn_service, start_receiver, start_service


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
