"""The ASGI application: the factory that stacks middleware, error handlers and the routers."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from starlette.responses import Response

from wallet.console import routes as console
from wallet.http import (
    api_keys,
    audit,
    clients,
    errors,
    movements,
    openapi,
    operations,
    orders,
    review,
    statements,
    wallets,
    webhooks,
)
from wallet.http.lifespan import lifespan
from wallet.http.middleware import BodyLimit, CatchAll
from wallet.observability import RequestContext, configure_logging
from wallet.ratelimit import RateLimit, make_counter, make_storage
from wallet.settings import Settings
from wallet.simulator import Simulator


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
    # The order routes are included in is the order of the OpenAPI document's paths.
    for routes in (movements, orders, wallets, clients, audit, statements, api_keys, review):
        app.include_router(routes.router)
    console.install(app)
    app.include_router(webhooks.router)
    app.include_router(operations.router)
    openapi.install(app, settings.client_auth_mode)
    errors.install(app, settings.production)
    if settings.simulator:
        app.mount("/_simulator", Simulator().asgi("/fulfillments"))
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    # The console's login limit; the API's own counts are the RateLimit's (both in Redis when set).
    app.state.limiter_storage = make_storage(settings.redis_url)
    # Made here, with the middleware; the lifespan closes it on shutdown.
    app.state.rate_counter = make_counter(settings.rate_limit_item, settings.redis_url)
    app.add_middleware(
        RateLimit,
        counter=app.state.rate_counter,
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
