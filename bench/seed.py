"""Wallets for the bench: credited through the running service's admin endpoint (so every
balance comes from a real CREDIT entry), and client API keys issued by the service's own code
when the service authenticates clients by key (the production default)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

import httpx

from wallet.auth import ClientAuthenticator
from wallet.database import create_engine
from wallet.settings import ClientAuth

CREDIT = 1_000_000_000  # per wallet, in currency units: far more than any run spends
CONCURRENCY = 32

T = TypeVar("T")


async def _bounded(items: Iterable[str], work: Callable[[str], Awaitable[T]]) -> list[T]:
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(item: str) -> T:
        async with gate:
            return await work(item)

    return await asyncio.gather(*(one(item) for item in items))


async def credit(base_url: str, admin_key: str, client_ids: list[str]) -> None:
    headers = {"Authorization": f"Bearer {admin_key}"}
    limits = httpx.Limits(max_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits, timeout=30) as http:

        async def one(client_id: str) -> None:
            body = {"client_id": client_id, "amount": CREDIT}
            response = await http.post("/admin/wallet/credit", json=body)
            if response.status_code != 200:
                raise RuntimeError(f"credit {client_id}: {response.status_code} {response.text}")

        await _bounded(client_ids, one)


async def api_keys(database_url: str, client_ids: list[str]) -> dict[str, str]:
    """client id -> a fresh API key for it."""
    engine = create_engine(database_url, pool_size=8)
    try:
        clients = ClientAuthenticator(engine, ClientAuth.API_KEY)

        async def one(client_id: str) -> tuple[str, str]:
            return client_id, (await clients.issue(client_id)).api_key

        return dict(await _bounded(client_ids, one))
    finally:
        await engine.dispose()
