"""Per-IP rate limiting with a moving window (the `limits` library), in process memory or in
Redis when REDIS_URL is set so that every worker and host shares one count.

The client IP is the socket peer, or the nearest untrusted address of `X-Forwarded-For` when
the peer is a trusted proxy: a client cannot pick its own bucket by sending the header."""

from __future__ import annotations

import ipaddress
import math
import time

import structlog
from limits import RateLimitItem
from limits.aio.storage import MemoryStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.storage import storage_from_string
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from wallet import observability
from wallet.errors import RateLimited
from wallet.settings import IpNetwork
from wallet.wire import dumps

log = structlog.get_logger(__name__)
# Probes and scrapes, and the built-in simulator under /_simulator, are not client traffic.
EXEMPT_PATHS = frozenset({"/health", "/ready", "/metrics"})


def client_ip(scope: Scope, trusted: tuple[IpNetwork, ...]) -> str:
    peer = str((scope.get("client") or ("unknown", 0))[0])
    if not trusted or not _is_trusted(peer, trusted):
        return peer
    forwarded = [value.decode("latin-1") for name, value in scope["headers"] if name == b"x-forwarded-for"]
    hops = [hop.strip() for value in forwarded for hop in value.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _is_trusted(hop, trusted):
            return str(hop)
    return peer


def _is_trusted(address: str, trusted: tuple[IpNetwork, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)


def make_storage(redis_url: str | None) -> Storage:
    if redis_url is None:
        return MemoryStorage()
    scheme, sep, rest = redis_url.partition("://")
    storage = storage_from_string(f"async+{scheme}{sep}{rest}", key_prefix="wallet-rl")
    assert isinstance(storage, Storage)
    return storage


class RateLimit:
    """ASGI middleware: counts every request, answers 429 past the limit, always sets headers."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        item: RateLimitItem | None,
        storage: Storage,
        trusted_proxies: tuple[IpNetwork, ...],
    ) -> None:
        self.app = app
        self.item = item
        self.limiter = MovingWindowRateLimiter(storage)
        self.trusted = trusted_proxies

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or self.item is None or path in EXEMPT_PATHS or path.startswith("/_"):
            await self.app(scope, receive, send)
            return
        ip = client_ip(scope, self.trusted)
        try:
            allowed = await self.limiter.hit(self.item, ip)
            reset_at, remaining = await self.limiter.get_window_stats(self.item, ip)
        except Exception as exc:  # the limiter's store is down: fail open, loudly
            log.error("rate limiter unavailable; request allowed", error=str(exc))
            await self.app(scope, receive, send)
            return
        reset = max(0, math.ceil(reset_at - time.time()))
        headers = [
            (b"ratelimit-limit", str(self.item.amount).encode()),
            (b"ratelimit-remaining", str(max(0, remaining)).encode()),
            (b"ratelimit-reset", str(reset).encode()),
        ]
        if not allowed:
            observability.RATE_LIMITED.inc()
            error = RateLimited("Too many requests, please try again later")
            body = dumps(error.body())
            await send(
                {
                    "type": "http.response.start",
                    "status": 429,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                        (b"retry-after", str(max(1, reset)).encode()),
                        *headers,
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *headers]
            await send(message)

        await self.app(scope, receive, send_with_headers)
