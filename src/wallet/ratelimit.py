"""Per-IP rate limiting, counted in Redis when REDIS_URL is set, else in PostgreSQL when several
processes serve (an UNLOGGED table, migration 0015), so that every worker and host shares one
count; in process memory only for a single process.

The count is a sliding-window counter: the hits of the current fixed window plus the previous
window's, weighted by how much of it the sliding window still covers, that weighted share
rounded up (rounded down, a request just past a window's end would find one earlier request
forgotten and get one more than the limit). Every request counts, refused ones too, and a 429's
Retry-After is when the next request would be allowed if none is sent before
(`SlidingWindow._wait_ms`). The requests of one event-loop pass are counted together
(`batching.Batcher`): one Redis round trip (a pipeline of INCRBY/PEXPIRE/GET per IP) serves them
all, each request still getting its own place in its IP's count, so a burst is cut at exactly
the limit. Measured before (a `limits` moving window, two round trips per request): the limiter
was about 30 % of a worker's CPU under the bench's balance reads.

The client IP is the socket peer, or the nearest untrusted address of `X-Forwarded-For` when
the peer is a trusted proxy: a client cannot pick its own bucket by sending the header."""

from __future__ import annotations

import ipaddress
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import coredis
import structlog
from limits import RateLimitItem
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from wallet import observability
from wallet.batching import Batcher
from wallet.errors import RateLimited
from wallet.settings import IpNetwork
from wallet.wire import dumps

log = structlog.get_logger(__name__)
# Probes and scrapes (and the built-in simulator, when mounted) are not client traffic: never
# counted nor refused, but told the caller's count like every other answer.
EXEMPT_PATHS = frozenset({"/health", "/ready", "/metrics"})


def client_ip(scope: Scope, trusted: tuple[IpNetwork, ...]) -> str:
    peer = str((scope.get("client") or ("unknown", 0))[0])
    if not trusted or not _is_trusted(peer, trusted):
        return peer
    forwarded = [value.decode("latin-1") for name, value in scope["headers"] if name == b"x-forwarded-for"]
    hops = [_address(hop.strip()) for value in forwarded for hop in value.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _is_trusted(hop, trusted):
            return hop
    return peer


def _address(hop: str) -> str:
    """A hop as its bare address: some proxies write `1.2.3.4:5678` or `[::1]:5678`, and one
    client must not count under a new key per source port (nor a trusted proxy pass for a client)."""
    try:
        return str(ipaddress.ip_address(hop))
    except ValueError:
        pass
    host = hop[1 : hop.find("]")] if hop.startswith("[") and "]" in hop else hop.rsplit(":", 1)[0]
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return hop


def _is_trusted(address: str, trusted: tuple[IpNetwork, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    remaining: int
    reset: int  # seconds until the current window ends; refused: until one more is allowed


class MemoryCounts:
    """Each process its own counts (no REDIS_URL): fixed windows by index, the two latest kept."""

    def __init__(self) -> None:
        self._windows: dict[int, Counter[str]] = {}

    async def add(self, hits: Counter[str], index: int, window_ms: int) -> dict[str, tuple[int, int]]:
        current = self._windows.setdefault(index, Counter())
        for stale in [i for i in self._windows if i < index - 1]:
            del self._windows[stale]
        current.update(hits)
        previous = self._windows.get(index - 1, Counter())
        return {ip: (previous[ip], current[ip]) for ip in hits}

    def close(self) -> None:
        """Nothing to release: the counts live in this process."""


# One statement per batch: drop windows no count reads any more, add the batch's hits to this
# window (in IP order, so two workers' batches lock rows in one order and cannot deadlock), and
# read the previous window beside them.
_ADD_COUNTS = text("""
WITH purged AS (
    DELETE FROM rate_limit_counts WHERE window_ms = :window_ms AND window_index < :index - 1
), added AS (
    INSERT INTO rate_limit_counts AS c (window_ms, window_index, ip, hits)
    SELECT :window_ms, :index, a.ip, a.n
    FROM unnest(CAST(:ips AS text[]), CAST(:hits AS integer[])) AS a(ip, n)
    ORDER BY a.ip
    ON CONFLICT (window_ms, window_index, ip) DO UPDATE SET hits = c.hits + EXCLUDED.hits
    RETURNING c.ip, c.hits
)
SELECT a.ip, a.hits AS current, coalesce(p.hits, 0) AS previous
FROM added a LEFT JOIN rate_limit_counts p
    ON p.window_ms = :window_ms AND p.window_index = :index - 1 AND p.ip = a.ip
""")


class PostgresCounts:
    """Counts shared by the processes of every host through PostgreSQL (several workers and no
    REDIS_URL): one statement per batch, on the service's own pool, given at start (`attach`)."""

    def __init__(self) -> None:
        self.engine: AsyncEngine | None = None

    def attach(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def add(self, hits: Counter[str], index: int, window_ms: int) -> dict[str, tuple[int, int]]:
        if self.engine is None:
            raise RuntimeError("rate-limit counts used before the database pool was attached")
        ips = sorted(hits)
        params = {"window_ms": window_ms, "index": index, "ips": ips, "hits": [hits[ip] for ip in ips]}
        async with self.engine.begin() as conn:
            rows = (await conn.execute(_ADD_COUNTS, params)).all()
        return {row.ip: (row.previous, row.current) for row in rows}

    def close(self) -> None:
        """Nothing to release: the pool is the service's."""


CLIENT_NAME = "wallet-rate-limit"  # how the counts' connections appear in Redis's CLIENT LIST


REDIS_TIMEOUT_SECONDS = 2  # connecting, and each answer; coredis tries a batch twice, then fails open


class RedisCounts:
    """Counts shared by every process through Redis: one pipelined round trip per batch."""

    def __init__(self, url: str) -> None:
        # coredis: the Redis client the `limits` library already brings. (redis-py was measured
        # in its place and cost balance reads 13 % of their throughput: docs/benchmarks.md.)
        self.client: coredis.Redis[bytes] = coredis.Redis.from_url(
            url,
            stream_timeout=REDIS_TIMEOUT_SECONDS,
            connect_timeout=REDIS_TIMEOUT_SECONDS,
            client_name=CLIENT_NAME,
        )

    async def add(self, hits: Counter[str], index: int, window_ms: int) -> dict[str, tuple[int, int]]:
        async with await self.client.pipeline(transaction=False) as pipe:
            for ip, n in hits.items():
                current = f"wallet-rl:{ip}:{index}"
                pipe.incrby(current, n)
                pipe.pexpire(current, 2 * window_ms)
                pipe.get(f"wallet-rl:{ip}:{index - 1}")
            replies = await pipe.execute()
        return {ip: (int(replies[3 * i + 2] or 0), int(replies[3 * i])) for i, ip in enumerate(hits)}

    def close(self) -> None:
        """Drop the pooled connections (at shutdown: nothing is left for the loop to close)."""
        self.client.connection_pool.disconnect()


class SlidingWindow:
    """`hit(ip)`: this request's verdict, counted with the other requests of its pass."""

    def __init__(
        self,
        item: RateLimitItem,
        counts: MemoryCounts | RedisCounts | PostgresCounts,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.limit = item.amount
        self.window_ms = item.get_expiry() * 1000
        self.counts = counts
        # While the shared counts cannot be had (Redis or PostgreSQL down), this process counts
        # alone: each worker then allows the limit on its own, and every answer still carries
        # the headers, rather than no limit at all.
        self.alone = None if isinstance(counts, MemoryCounts) else MemoryCounts()
        self.clock = clock
        self.batcher: Batcher[tuple[str, bool], Verdict] = Batcher("rate_limit", self._count, limit=1024)

    async def hit(self, ip: str) -> Verdict:
        return await self.batcher.submit((ip, True))

    async def peek(self, ip: str) -> Verdict:
        """The IP's count as it stands, this request not counted (probes and scrapes): so that
        their answers carry the headers too, as every answer does (SPEC §6)."""
        return await self.batcher.submit((ip, False))

    def attach(self, engine: AsyncEngine) -> None:
        """Give counts kept in PostgreSQL the service's pool, once it exists (at start)."""
        if isinstance(self.counts, PostgresCounts):
            self.counts.attach(engine)

    def close(self) -> None:
        self.counts.close()

    async def _count(self, calls: Sequence[tuple[str, bool]]) -> list[Verdict]:
        now_ms = int(self.clock() * 1000)
        index, into = divmod(now_ms, self.window_ms)
        hits = Counter({ip: 0 for ip, _ in calls})  # a peek's IP is read, adding nothing
        hits.update(ip for ip, counted in calls if counted)
        try:
            counts = await self.counts.add(hits, index, self.window_ms)
        except Exception as exc:
            if self.alone is None:
                raise
            log.error("shared rate-limit counts unavailable; counting in this process", error=repr(exc))
            counts = await self.alone.add(hits, index, self.window_ms)
        weight = 1 - into / self.window_ms  # the share of the previous window still covered
        reset = math.ceil((self.window_ms - into) / 1000)
        seen: Counter[str] = Counter()
        verdicts = []
        for ip, counted in calls:  # each request's place in its IP's count, in arrival order
            seen[ip] += counted
            previous, current = counts[ip]
            used = math.ceil(previous * weight) + current - hits[ip] + seen[ip]
            if not counted or used <= self.limit:
                verdicts.append(Verdict(True, max(0, self.limit - used), reset))
            else:
                wait_ms = self._wait_ms(previous, current, into)
                verdicts.append(Verdict(False, 0, max(1, math.ceil(wait_ms / 1000))))
        return verdicts

    def _wait_ms(self, previous: int, current: int, into: int) -> int:
        """How long until one more request of an IP with these counts is allowed, if it sends
        none before (refused ones count): later in this window, once the previous window's
        weighted share has shrunk enough, or else in the next one, once this window's has. Not
        the window's end: right after it, this window's hits still weigh almost in full."""
        limit, window = self.limit, self.window_ms
        if current < limit and previous:  # ceil(previous * (1 - t / window)) <= limit - current - 1
            return max(0, math.ceil(window * (1 - (limit - current - 1) / previous)) - into)
        return window - into + max(0, math.ceil(window * (1 - (limit - 1) / current)))


def rate_headers(limit: int, verdict: Verdict) -> list[tuple[bytes, bytes]]:
    """What every answer says of its caller's count (SPEC §6)."""
    return [
        (b"ratelimit-limit", str(limit).encode()),
        (b"ratelimit-remaining", str(verdict.remaining).encode()),
        (b"ratelimit-reset", str(verdict.reset).encode()),
    ]


def make_counter(item: RateLimitItem | None, redis_url: str | None, workers: int) -> SlidingWindow | None:
    """Counts in Redis when there is one; else in PostgreSQL when several processes serve, so
    they share one count (the lifespan attaches the pool); in this process's memory only when it
    is the only one."""
    if item is None:
        return None
    if redis_url:
        return SlidingWindow(item, RedisCounts(redis_url))
    return SlidingWindow(item, PostgresCounts() if workers > 1 else MemoryCounts())


class RateLimit:
    """ASGI middleware: counts every request, answers 429 past the limit, always sets headers."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        counter: SlidingWindow | None,
        trusted_proxies: tuple[IpNetwork, ...],
        uncounted_prefix: str | None = None,
    ) -> None:
        self.app = app
        self.counter = counter
        self.trusted = trusted_proxies
        # The development simulator's mount: the service calling its own provider must not use up
        # the loopback client's quota. Only when it is mounted: elsewhere the path is a 404 like any.
        self.uncounted_prefix = uncounted_prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        counter = self.counter
        if scope["type"] != "http" or counter is None:
            await self.app(scope, receive, send)
            return
        exempt = path in EXEMPT_PATHS or (
            self.uncounted_prefix is not None and path.startswith(self.uncounted_prefix)
        )
        try:
            ip = client_ip(scope, self.trusted)
            verdict = await (counter.peek(ip) if exempt else counter.hit(ip))
        except Exception as exc:  # even counting alone failed (a bug): fail open, loudly
            log.error("rate limiter unavailable; request allowed", error=str(exc))
            await self.app(scope, receive, send)
            return
        reset = verdict.reset
        headers = rate_headers(counter.limit, verdict)
        if not verdict.allowed:
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
                        (b"retry-after", str(reset).encode()),
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
