"""The ASGI application: the factory that stacks middleware, error handlers and the routes."""

from __future__ import annotations

import functools
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Mount, Route

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
from wallet.http.routing import Endpoint, starlette_routes
from wallet.logs import configure_logging
from wallet.observability import RequestContext
from wallet.ratelimit import RateLimit, client_ip, make_counter
from wallet.settings import ClientAuth, Settings
from wallet.simulator import Simulator
from wallet.wire import JSONBytes, dumps

# Every API operation, in the order the OpenAPI document lists them.
ENDPOINTS: list[Endpoint] = (
    [
        endpoint
        for module in (movements, orders, wallets, clients, audit, statements, api_keys, review)
        for endpoint in module.routes.endpoints
    ]
    + webhooks.client_routes.endpoints
    + webhooks.admin_routes.endpoints
    + operations.routes.endpoints
)

# Swagger UI from a CDN, pinned to one release and checked by the browser (Subresource Integrity:
# the hashes of that release's files as published on npm), so the CDN cannot change what runs on
# a page served by the service. A new release means new hashes (`npm pack swagger-ui-dist@X`).
_SWAGGER_UI = "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5.35.0"
_DOCS_PAGE = f"""<!doctype html>
<html><head><title>Wallet service API</title><meta charset="utf-8">
<link rel="stylesheet" href="{_SWAGGER_UI}/swagger-ui.css" crossorigin="anonymous"
 integrity="sha384-WlYgdmXYOOBWL5apwjDEZwN+U3HmXSSu5R6V5aGxEcf7z+KuRNwBhoxKVN1i3D5I"></head>
<body><div id="swagger-ui"></div>
<script src="{_SWAGGER_UI}/swagger-ui-bundle.js" crossorigin="anonymous"
 integrity="sha384-gjRm0bEPMeTmMh5jT2cHccIwCUZSTd8YC+j0d0sXw0MdGEfScduGpSyF3ZSSLkX9"></script>
<script>SwaggerUIBundle({{url: "/openapi.json", dom_id: "#swagger-ui"}})</script>
</body></html>"""


SIMULATOR_MOUNT = "/_simulator"


def create_app(settings: Settings) -> Starlette:
    configure_logging(settings.log_level, settings.log_renderer)

    async def openapi_json(_: Request) -> Response:
        return JSONBytes(_document(settings.client_auth_mode))

    async def docs(_: Request) -> Response:
        return HTMLResponse(_DOCS_PAGE)

    routes: list[BaseRoute] = [
        *starlette_routes(ENDPOINTS),
        *console.routes(),
        Route("/openapi.json", openapi_json, include_in_schema=False),
        Route("/docs", docs, include_in_schema=False),
    ]
    if settings.simulator:
        routes.append(Mount(SIMULATOR_MOUNT, Simulator().asgi("/fulfillments")))
    # The API's limit and the console's login limit, counted alike; the lifespan gives them the
    # pool (counts in PostgreSQL) and closes them.
    counter = make_counter(settings.rate_limit_item, settings.redis_url, settings.worker_count)
    login_counter = make_counter(settings.console_login_item, settings.redis_url, settings.worker_count)
    app = Starlette(
        routes=routes,
        # Outermost first: the request id and access log see every answer, and the rate limit's
        # headers go on every answer, the 500 included.
        middleware=[
            Middleware(
                RequestContext,
                client_address=lambda scope: client_ip(scope, settings.trusted_proxies),
                routes=routes,
            ),
            Middleware(
                RateLimit,
                counter=counter,
                trusted_proxies=settings.trusted_proxies,
                uncounted_prefix=f"{SIMULATOR_MOUNT}/" if settings.simulator else None,
            ),
            Middleware(CatchAll, production=settings.production),
            Middleware(BodyLimit, max_bytes=settings.max_body_bytes),
        ],
        exception_handlers=errors.handlers(settings.production),
        lifespan=lifespan,
    )
    # A path with a trailing slash is an unknown route: 404 in the envelope, not Starlette's bare
    # 307 to a URL built from the client's Host header.
    app.router.redirect_slashes = False
    app.state.settings = settings
    app.state.rate_counter = counter
    app.state.login_counter = login_counter
    return app


def app_from_env() -> Starlette:
    """Factory for uvicorn workers: every setting comes from the environment `wallet serve` set."""
    return create_app(Settings())


def openapi_document(settings: Settings) -> dict[str, Any]:
    return openapi.document(ENDPOINTS, settings.client_auth_mode)


@functools.cache
def _document(mode: ClientAuth) -> bytes:
    """Written when first asked for, once per process and mode: building it took about 60 ms,
    which every worker's start (and every test's app) paid whether or not anyone read it."""
    return dumps(openapi.document(ENDPOINTS, mode))
