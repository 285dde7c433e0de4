"""The ASGI application: wiring, lifespan, middleware and the one error envelope."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import sqlalchemy.exc
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess
from sqlalchemy import text
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from wallet import (
    api,
    apikeys,
    delivery,
    events,
    history,
    idempotency,
    review,
    webhook_api,
    webhook_send,
)
from wallet.auth import ClientAuthenticator
from wallet.console import routes as console
from wallet.console.sessions import Sessions
from wallet.database import Connector, ReadRouter, create_engine, is_unavailable, single, snapshot
from wallet.errors import PayloadTooLarge, ServiceUnavailable, WalletError
from wallet.fulfillment import Provider, new_http_client
from wallet.http import openapi
from wallet.http.schemas import StatusEnvelope, error_responses
from wallet.keycache import KeyCache, Listener
from wallet.observability import RequestContext, configure_logging, track_pool, untrack_pool
from wallet.orders import Orders
from wallet.ratelimit import RateLimit, make_counter, make_storage
from wallet.settings import Settings
from wallet.simulator import Simulator
from wallet.wallets import Wallets
from wallet.webhooks import SecretBox, Webhooks
from wallet.wire import json_response, ok

log = structlog.get_logger(__name__)


class BodyLimit:
    """413 before reading more than MAX_BODY_BYTES, whether or not Content-Length is honest."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            too_large = PayloadTooLarge(f"Request body exceeds {self.max_bytes} bytes")
            await json_response(413, too_large.body())(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise PayloadTooLarge(f"Request body exceeds {self.max_bytes} bytes")
            return message

        await self.app(scope, counted, send)


def internal_error_response(exc: Exception, production: bool) -> Response:
    log.error("unhandled error", exc_info=exc)
    message = "Internal server error" if production else f"{type(exc).__name__}: {exc}"
    return json_response(500, {"success": False, "error": message, "code": "INTERNAL_ERROR"})


class CatchAll:
    """An unhandled error becomes the 500 envelope here, inside RequestContext, so its response
    and its log line carry the request id: Starlette's last-resort handler runs outside every
    middleware, after the request's context is gone."""

    def __init__(self, app: ASGIApp, production: bool) -> None:
        self.app = app
        self.production = production

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except ClientDisconnect:
            raise  # nobody is left to answer; RequestContext counts it as a 499
        except Exception as exc:
            if started:
                raise
            await internal_error_response(exc, self.production)(scope, receive, send)


async def _every(seconds: float, job: Callable[[], Awaitable[int]], name: str) -> None:
    """Run `job` now and then every `seconds`; a failure is logged, never fatal."""
    while True:
        try:
            await job()
        except Exception:
            log.exception("background job failed", job=name)
        await asyncio.sleep(seconds)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    assert settings.database_url is not None
    engine = create_engine(settings.database_url, pool_size=settings.db_pool_size, pooler=settings.db_pooler)
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
    admin_key_digest = hashlib.sha256(settings.admin_key.encode()).digest()
    app.state.console_sessions = Sessions(
        engine,
        admin_key_digest=admin_key_digest,
        ttl_hours=settings.console_session_hours,
        login_item=settings.console_login_item,
        storage=app.state.limiter_storage,
    )
    app.state.replica = replica
    listen_url = settings.key_cache_listen_url
    key_cache = KeyCache(settings.api_key_cache_size) if listen_url else None
    app.state.services = api.Services(
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
    try:
        yield
    finally:
        for job in jobs:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)
        await http.close()
        await webhook_http.close()
        await engine.dispose()
        if replica is not None:
            await replica.dispose()
        untrack_pool(settings.db_pool_size)


def _allowed_methods(request: Request) -> str:
    """Starlette's 405 names only the first route whose path matched, but GET and POST /orders are
    two routes; the OpenAPI document (public, and what clients read) knows every method of a path."""
    table: list[tuple[re.Pattern[str], str]] | None = getattr(request.app.state, "allowed_methods", None)
    if table is None:
        table = [
            (
                re.compile("^" + re.sub(r"\\{[^/]+?\\}", "[^/]+", re.escape(path)) + "$"),
                ", ".join(sorted(m.upper() for m in ops)),
            )
            for path, ops in request.app.openapi()["paths"].items()
        ]
        request.app.state.allowed_methods = table
    return next((methods for pattern, methods in table if pattern.match(request.url.path)), "")


def _error_handlers(app: FastAPI, production: bool) -> None:
    @app.exception_handler(WalletError)
    async def wallet_error(_: Request, exc: WalletError) -> Response:
        return json_response(exc.status, exc.body(), exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = _allowed_methods(request) or headers.get("Allow", "")
        codes = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}
        messages = {404: "Route not found", 405: "Method not allowed"}
        body = {
            "success": False,
            "error": messages.get(exc.status_code, str(exc.detail)),
            "code": codes.get(exc.status_code, "HTTP_ERROR"),
        }
        return json_response(exc.status_code, body, headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> Response:
        details = [
            {"field": ".".join(str(p) for p in err["loc"]), "message": err["msg"]} for err in exc.errors()
        ]
        first = details[0] if details else {"field": "request", "message": "invalid"}
        body = {
            "success": False,
            "error": f"{first['field']}: {first['message']}",
            "code": "VALIDATION_ERROR",
            "details": details,
        }
        return json_response(400, body)

    @app.exception_handler(sqlalchemy.exc.TimeoutError)
    @app.exception_handler(sqlalchemy.exc.OperationalError)
    @app.exception_handler(sqlalchemy.exc.InterfaceError)
    @app.exception_handler(OSError)
    async def unavailable(_: Request, exc: Exception) -> Response:
        log.error("database unavailable", error=str(exc))
        return json_response(503, ServiceUnavailable("Service temporarily unavailable").body())

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> Response:
        return internal_error_response(exc, production)

    @app.exception_handler(sqlalchemy.exc.DBAPIError)
    async def database_error(request: Request, exc: Exception) -> Response:
        """A database that is gone, refusing us or shutting down is unavailability, not a bug."""
        if is_unavailable(exc):
            return await unavailable(request, exc)
        return await internal_error(request, exc)


# Seconds since the last replayed transaction; 0 when the replica has replayed all it received
# (an idle primary sends nothing new, which is not lag); NULL on a server that is no replica.
_REPLICA_LAG = text("""
SELECT CASE WHEN NOT pg_is_in_recovery() THEN NULL
            WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0
            ELSE extract(epoch FROM now() - pg_last_xact_replay_timestamp()) END
""")


def _operations(app: FastAPI) -> None:
    @app.get("/health", tags=["operations"], responses={200: {"model": StatusEnvelope}})
    async def health() -> Response:
        """The process is alive and answering (liveness)."""
        return json_response(200, ok({"status": "ok"}))

    @app.get(
        "/ready", tags=["operations"], responses={200: {"model": StatusEnvelope}, **error_responses(503)}
    )
    async def ready(request: Request) -> Response:
        """The primary answers (readiness): 503 when it does not. A replica is reported (`ok` with
        its replay lag in seconds, or `unreachable`) but never makes the service unready: reads
        then go to the primary, and every instance shares the replica, so taking instances out of
        the load balancer for it would turn a degraded read path into an outage."""
        try:
            async with asyncio.timeout(2), single(request.app.state.engine).connect() as conn:
                await conn.execute(text("SELECT 1"))
        except Exception as exc:
            raise ServiceUnavailable("Database unreachable", code="NOT_READY") from exc
        data: dict[str, Any] = {"status": "ready", "primary": "ok"}
        replica = request.app.state.replica
        if replica is not None:
            try:
                async with asyncio.timeout(2), single(replica).connect() as conn:
                    lag = await conn.scalar(_REPLICA_LAG)
                data["replica"] = {"status": "ok", "lagSeconds": None if lag is None else float(lag)}
            except Exception as exc:
                log.warning("read replica unreachable", error=str(exc))
                data["replica"] = {"status": "unreachable", "lagSeconds": None}
        return json_response(200, ok(data))

    @app.get(
        "/metrics",
        tags=["operations"],
        response_class=Response,
        responses={200: {"description": "Prometheus text format", "content": {CONTENT_TYPE_LATEST: {}}}},
    )
    async def metrics() -> Response:
        """Prometheus metrics of all workers of this server."""
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


def create_app(settings: Settings) -> FastAPI:
    configure_logging(settings.log_level, settings.log_renderer)
    app = FastAPI(
        title="Wallet service",
        version="0.1.0",
        description="Prepaid wallets for business clients, orders paid from them, and an append-only ledger.",
        lifespan=lifespan,
        default_response_class=Response,
    )
    app.state.settings = settings
    app.include_router(api.router)
    app.include_router(history.router)
    app.include_router(apikeys.router)
    app.include_router(review.router)
    console.install(app)
    app.include_router(webhook_api.router)
    _operations(app)
    openapi.install(app, settings.client_auth_mode)
    _error_handlers(app, settings.production)
    if settings.simulator:
        app.mount("/_simulator", Simulator().asgi("/fulfillments"))
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    # The console's login limit; the API's own counts are the RateLimit's (both in Redis when set).
    app.state.limiter_storage = make_storage(settings.redis_url)
    app.add_middleware(
        RateLimit,
        counter=make_counter(settings.rate_limit_item, settings.redis_url),
        trusted_proxies=settings.trusted_proxies,
    )
    app.add_middleware(CatchAll, production=settings.production)
    app.add_middleware(RequestContext)
    return app


def app_from_env() -> FastAPI:
    """Factory for uvicorn workers: every setting comes from the environment `wallet serve` set."""
    return create_app(Settings())


def openapi_document(settings: Settings) -> dict[str, Any]:
    return create_app(settings).openapi()
