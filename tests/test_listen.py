"""`wallet webhooks listen`: a developer's receiver prints what the service delivers, verified,
and refuses what the endpoint's secret did not sign."""

from __future__ import annotations

import asyncio
import json
import sys

import httpx

from tests.builders import Provider, free_port, start_service


async def test_listen_prints_verified_deliveries_and_refuses_forgeries(
    database_url: str, provider: Provider
) -> None:
    port = free_port()
    async with start_service(
        database_url, provider.url, webhook_allow_private=True, webhook_interval_seconds=0.05
    ) as api:
        await api.credit("C1", 10)
        created = await api.http.post(
            "/webhook-endpoints", json={"url": f"http://127.0.0.1:{port}/"}, headers={"client-id": "C1"}
        )
        secret = created.json()["data"]["secret"]
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "wallet.cli",
            "webhooks",
            "listen",
            "--port",
            str(port),
            "--secret",
            secret,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            assert process.stderr is not None
            assert process.stdout is not None
            announced = await asyncio.wait_for(process.stderr.readline(), 30)
            assert f"127.0.0.1:{port}" in announced.decode()
            async with httpx.AsyncClient() as http:
                forged = await http.post(
                    f"http://127.0.0.1:{port}/",
                    content=b'{"id": "evt_x"}',
                    headers={"webhook-id": "evt_x", "webhook-timestamp": "1", "webhook-signature": "v1,AAAA"},
                )
            assert forged.status_code == 400
            assert "refused" in (await asyncio.wait_for(process.stderr.readline(), 30)).decode()
            await api.debit("C1", 2.5)
            printed = json.loads(await asyncio.wait_for(process.stdout.readline(), 30))
            assert printed["type"] == "wallet.debited"
            assert printed["data"]["newBalance"] == 7.5
        finally:
            process.terminate()
            await process.wait()
