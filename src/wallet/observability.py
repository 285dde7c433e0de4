"""Metrics, request ids and the access line: what an operator reads to know what the service did
(how log lines are stamped and written: `wallet.logs`)."""

from __future__ import annotations

import os
import random
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import structlog
from prometheus_client import Counter, Gauge, Histogram, values
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.requests import ClientDisconnect
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from wallet.logs import REQUEST_ID, process_id

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that went away before the answer
_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")

# With several workers (PROMETHEUS_MULTIPROC_DIR set), every increment asks os.getpid() whether
# the process forked since, to move to a file of its own: a system call per counter and two per
# histogram sample (docs/benchmarks.md, "Metrics and request ids without system calls").
# `logs.process_id` remembers the pid and refreshes it in a forked child, which is when it
# changes. Set before any metric below is made: each value takes the class when it is made.
if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
    values.ValueClass = values.MultiProcessValue(process_identifier=process_id)  # type: ignore[no-untyped-call]

HTTP_REQUESTS = Counter(
    "wallet_http_requests_total", "HTTP requests by route and status", ["method", "route", "status"]
)
HTTP_LATENCY = Histogram(
    "wallet_http_request_duration_seconds",
    "HTTP request latency by route",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
ORDERS_FINISHED = Counter("wallet_orders_total", "Orders by final status", ["status"])
ORDER_OUTCOMES = Counter(
    "wallet_order_outcomes_total",
    "What the provider's answers proved for an order: fulfilled, refused or unknown, by who asked"
    " (the request that placed it, or the resolver)",
    ["kind", "path"],
)
RESOLVER_ATTEMPTS = Counter(
    "wallet_resolver_attempts_total",
    "Orders the resolver asked the provider about, by what it learned",
    ["kind"],
)
ORDERS_FLAGGED = Counter(
    "wallet_orders_flagged_total", "Orders flagged for review (outcome unknown too long)"
)
BATCH_SIZE = Histogram(
    "wallet_batch_size",
    "Calls served by one group-commit statement (batching.py)",
    ["kind"],
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
BATCH_FALLBACKS = Counter(
    "wallet_batch_fallbacks_total", "Order batches that failed and were retried one by one", ["kind"]
)
ORDERS_RESOLVED = Counter("wallet_orders_resolved_total", "Orders an operator resolved", ["outcome"])
OLDEST_PENDING_SECONDS = Gauge(
    "wallet_orders_pending_oldest_age_seconds",
    "Age of the oldest PENDING order (0 when there is none)",
    multiprocess_mode="livemax",
)
REVIEW_QUEUE = Gauge(
    "wallet_orders_review_queue", "PENDING orders flagged for review", multiprocess_mode="livemax"
)
FULFILLMENT_ATTEMPTS = Counter(
    "wallet_fulfillment_attempts_total", "POSTs to the provider, by what the answer proved", ["kind"]
)
FULFILLMENT_LOOKUPS = Counter(
    "wallet_fulfillment_lookups_total", "Status lookups at the provider, by what the answer proved", ["kind"]
)
FULFILLMENT_RETRIES = Counter("wallet_fulfillment_retries_total", "Provider calls that were retries")
RATE_LIMITED = Counter("wallet_rate_limited_total", "Requests refused by the rate limit")
WEBHOOK_DELIVERIES = Counter(
    "wallet_webhook_deliveries_total",
    "Webhook delivery attempts by outcome: delivered, retry, failed (retries exhausted), gone (410),"
    " refused (unsafe target)",
    ["outcome"],
)
WEBHOOK_QUEUE_DEPTH = Gauge(
    "wallet_webhook_queue_depth",
    "Events waiting for fan-out plus deliveries not yet delivered",
    multiprocess_mode="livemax",
)
WEBHOOK_OLDEST_SECONDS = Gauge(
    "wallet_webhook_oldest_undelivered_age_seconds",
    "Age of the oldest event not yet fanned out or delivered (0 when there is none)",
    multiprocess_mode="livemax",
)
DB_POOL_IN_USE = Gauge(
    "wallet_db_pool_connections_in_use",
    "Database connections checked out",
    multiprocess_mode="livesum",
)
DB_POOL_SIZE = Gauge(
    "wallet_db_pool_connections_max",
    "Connections the pools may open (in_use reaching it means requests wait for one)",
    multiprocess_mode="livesum",
)
API_KEY_CACHE = Counter(
    "wallet_api_key_cache_total",
    "Client API key checks by how they were answered: hit (this process's cache, no query), miss"
    " (queried; a valid key is then cached), bypass (queried: the cache's listener is not live)",
    ["result"],
)
API_KEY_CACHE_LISTENING = Gauge(
    "wallet_api_key_cache_listening",
    "Processes whose API-key cache is subscribed to key changes (the others query every key)",
    multiprocess_mode="livesum",
)
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def track_pool(engine: AsyncEngine, size: int) -> None:
    """Keep the pool gauges live. Counted on checkout/checkin rather than read at scrape time:
    with several workers each process's value must be current when any one of them is scraped."""
    DB_POOL_SIZE.inc(size)
    pool = engine.sync_engine.pool
    # The records checked out. A new connection that fails while it is set up (the database
    # going away) is checked in without ever having been checked out: counting that checkin
    # drove the gauge below zero for good.
    out: set[int] = set()

    def checkout(_: Any, record: Any, __: Any) -> None:
        out.add(id(record))
        DB_POOL_IN_USE.inc()

    def checkin(_: Any, record: Any) -> None:
        if id(record) in out:
            out.discard(id(record))
            DB_POOL_IN_USE.dec()

    event.listen(pool, "checkout", checkout)
    event.listen(pool, "checkin", checkin)


def untrack_pool(size: int) -> None:
    DB_POOL_SIZE.dec(size)


def new_request_id() -> str:
    """A request's id when the caller gave none (or one we cannot echo): 32 hex digits, as a
    uuid4's. It need only be unique, not secret, so it comes from `random` (seeded from
    os.urandom in each process, and again in a forked child) rather than a system call per
    request as uuid4 makes."""
    return f"{random.getrandbits(128):032x}"


def _route_of(scope: Scope, routes: Sequence[BaseRoute]) -> str:
    """The route's template (never the path: one series per order id would be unbounded). A
    request answered before routing (a 429, a 413) is matched here, so refusals count by route."""
    route = scope.get("route")
    if route is None:
        route = next((r for r in routes if r.matches(scope)[0] is Match.FULL), None)
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


class RequestContext:
    """Request id in and out (`X-Request-ID`), one access log line, request metrics."""

    def __init__(
        self,
        app: ASGIApp,
        client_address: Callable[[Scope], str] | None = None,
        routes: Sequence[BaseRoute] = (),
    ) -> None:
        self.app = app
        self.log = structlog.get_logger("wallet.access")
        self.client_address = client_address  # the caller, by the rate limit's rule (trusted proxies)
        self.routes = routes  # the app's, to name the route of a request refused before routing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if _REQUEST_ID_OK.match(incoming) else new_request_id()
        token = REQUEST_ID.set(request_id)
        status = 500
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode()),
                ]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:
            # The client left before its request body arrived: nothing ran and nothing can be
            # sent. Counted as proxies count it (499), not as a server error.
            status = CLIENT_CLOSED_REQUEST
        finally:
            elapsed = time.perf_counter() - started
            route = _route_of(scope, self.routes)
            method = scope["method"] if scope["method"] in _METHODS else "OTHER"
            HTTP_REQUESTS.labels(method, route, str(status)).inc()
            HTTP_LATENCY.labels(method, route).observe(elapsed)
            self.log.info(
                "request",
                method=method,
                path=scope["path"],
                status=status,
                duration_ms=round(elapsed * 1000, 2),
                client=self.client_address(scope) if self.client_address else None,
            )
            REQUEST_ID.reset(token)
