"""What the service builds at start and tears down at stop: engines, the core services every
request uses (`deps.Services`), and the background jobs (resolver, purges, webhook delivery,
the API-key cache listener)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable

import structlog
from starlette.applications import Starlette

from wallet import delivery, events, idempotency, webhook_send
from wallet.auth import ClientAuthenticator
from wallet.console.sessions import Sessions
from wallet.database import Connector, ReadRouter, create_engine, single, snapshot
from wallet.fulfillment import Provider, new_http_client
from wallet.http.deps import Services
from wallet.keycache import KeyCache, Listener
from wallet.logs import write_through
from wallet.observability import track_pool, untrack_pool
from wallet.orders import Orders
from wallet.settings import Settings
from wallet.wallets import Wallets
from wallet.webhooks import SecretBox, Webhooks

log = structlog.get_logger(__name__)


async def _every(seconds: float, job: Callable[[], Awaitable[int]], name: str) -> None:
    """Run `job` now and then every `seconds`; a failure is logged, never fatal."""
    while True:
        try:
            await job()
        except Exception:
            log.exception("background job failed", job=name)
        await asyncio.sleep(seconds)


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    assert settings.database_url is not None
    engine = create_engine(
        settings.database_url,
        pool_size=settings.db_pool_size,
        pooler=settings.db_pooler,
        lock_timeout=settings.db_lock_timeout_seconds,
    )
    track_pool(engine, settings.db_pool_size)
    replica = None
    reads: Connector = single(engine)
    snapshots: Connector = snapshot(engine)
    if settings.database_read_url:
        # A replica that cannot be reached fails fast (2 s to connect), then reads use the primary.
        replica = create_engine(
            settings.database_read_url,
            pool_size=settings.db_pool_size,
            pooler=settings.db_pooler,
            connect_args={"timeout": 2},
        )
        reads = ReadRouter(single(replica), reads)
        snapshots = ReadRouter(snapshot(replica), snapshots)
    http = new_http_client(settings)
    orders = Orders(engine, Provider(settings, http), settings)
    box = SecretBox(settings.chain_key)
    webhook_http = webhook_send.new_http_client(settings)
    deliverer = delivery.Deliverer(engine, settings, box, webhook_http)
    app.state.engine = engine
    limits = [c for c in (app.state.rate_counter, app.state.login_counter) if c is not None]
    for counter in limits:
        counter.attach(engine)
    admin_key_digest = hashlib.sha256(settings.admin_key.encode()).digest()
    app.state.console_sessions = Sessions(
        engine,
        admin_key_digest=admin_key_digest,
        ttl_hours=settings.console_session_hours,
        login_limit=app.state.login_counter,
    )
    app.state.replica = replica
    listen_url = settings.key_cache_listen_url
    key_cache = KeyCache(settings.api_key_cache_size) if listen_url else None
    app.state.services = Services(
        settings=settings,
        admin_key_digest=admin_key_digest,
        wallets=Wallets(engine, key=settings.chain_key, idempotency_ttl_hours=settings.idempotency_ttl_hours),
        orders=orders,
        clients=ClientAuthenticator(engine, settings.client_auth_mode, key_cache),
        webhooks=Webhooks(engine, box, allow_private=settings.webhooks_private_ok),
        reads=reads,
        snapshots=snapshots,
    )
    retention = settings.event_retention_days
    jobs = [
        asyncio.create_task(_every(settings.recovery_interval_seconds, orders.resolve_due, "resolver")),
        asyncio.create_task(_every(3600, lambda: idempotency.purge_expired(engine), "purge")),
        asyncio.create_task(_every(settings.webhook_interval_seconds, deliverer.run, "webhooks")),
        asyncio.create_task(_every(3600, lambda: events.purge_expired(engine, retention), "event purge")),
    ]
    if key_cache is not None and listen_url:
        jobs.append(asyncio.create_task(Listener(key_cache, listen_url).run()))
    # What is built by now (modules, schemas, the OpenAPI document, pools) lives as long as the
    # worker. Left in the collector's view, every full collection walked it all: a pause of
    # about 80 ms that was the 99th percentile of balance reads (docs/benchmarks.md).
    gc.freeze()
    # Collect the young generation after 10,000 net new objects, not 700: at 700 the objects of
    # requests still in flight (and coredis's, which live 2 s) were promoted by the thousand,
    # and the old generations filled up fast enough for a full collection every second or so,
    # 15-110 ms each under the bench's reads. Garbage cycles are still found, and most while
    # young; reference counting frees everything else (docs/benchmarks.md).
    gc.set_threshold(10_000, 10, 10)
    try:
        yield
    finally:
        gc.unfreeze()
        for job in jobs:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)
        await deliverer.close()
        await http.close()
        await webhook_http.close()
        await engine.dispose()
        for counter in limits:
            counter.close()
        if replica is not None:
            await replica.dispose()
        untrack_pool(settings.db_pool_size)
        write_through()
