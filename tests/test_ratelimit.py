"""Rate limits per client IP (SPEC §6): headers on every response, 429 past the limit, shared
through Redis when REDIS_URL is set, else through PostgreSQL when several workers serve. Each
test uses its own client IPs (via a trusted proxy's X-Forwarded-For), so runs never share a
bucket in Redis."""

from __future__ import annotations

import asyncio
import ipaddress
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import coredis
import httpx
import pytest
from limits import parse
from prometheus_client import REGISTRY
from starlette.types import Scope

from tests.builders import Provider, dead_redis_url, mute_redis, start_service
from wallet.database import create_engine
from wallet.ratelimit import (
    CLIENT_NAME,
    REDIS_TIMEOUT_SECONDS,
    MemoryCounts,
    PostgresCounts,
    RedisCounts,
    SlidingWindow,
    client_ip,
)


def fresh_ip() -> str:
    """A client IP no other test uses (documentation range 2001:db8::/32)."""
    return f"2001:db8::{uuid.uuid4().hex[:4]}:{uuid.uuid4().hex[:4]}"


def behind_proxy(ip: str) -> dict[str, str]:
    return {"X-Forwarded-For": ip}


@pytest.fixture(params=["redis or memory", "postgres"])
async def counts(
    request: pytest.FixtureRequest, redis_url: str | None, database_url: str
) -> AsyncIterator[MemoryCounts | RedisCounts | PostgresCounts]:
    """Each store the counts may live in: Redis where there is one (else this process's memory),
    and PostgreSQL (several workers, no Redis) on the test's own database."""
    if request.param == "redis or memory":
        yield RedisCounts(redis_url) if redis_url else MemoryCounts()
        return
    engine = create_engine(database_url, pool_size=2)
    shared = PostgresCounts()
    shared.attach(engine)
    try:
        yield shared
    finally:
        await engine.dispose()


def limiter(redis_url: str | None, limit: str, **extra: Any) -> dict[str, Any]:
    return {"rate_limit": limit, "redis_url": redis_url, "trusted_proxies": "127.0.0.1/32", **extra}


async def test_limit_headers_then_429(database_url: str, provider: Provider, redis_url: str | None) -> None:
    ip = fresh_ip()
    async with start_service(database_url, provider.url, **limiter(redis_url, "5/minute")) as api:
        remaining = []
        headers = {"client-id": "nobody", **behind_proxy(ip)}
        for _ in range(5):
            response = await api.http.get("/wallet/balance", headers=headers)
            assert response.status_code == 404
            assert response.headers["RateLimit-Limit"] == "5"
            assert 0 < int(response.headers["RateLimit-Reset"]) <= 60
            remaining.append(int(response.headers["RateLimit-Remaining"]))
        assert remaining == [4, 3, 2, 1, 0]
        refused = await api.http.get("/wallet/balance", headers=headers)
        assert refused.status_code == 429
        # Any path counts, one under the simulator's prefix too when no simulator is mounted.
        assert (await api.http.get("/_simulator/fulfillments", headers=headers)).status_code == 429
        assert (await api.http.get("/_x", headers=headers)).status_code == 429
        assert refused.json() == {
            "success": False,
            "error": "Too many requests, please try again later",
            "code": "RATE_LIMITED",
        }
        # Until one more is allowed: past this window's end, while its 6 hits still weigh > 4.
        assert 1 <= int(refused.headers["Retry-After"]) <= 60 + 20
        assert refused.headers["RateLimit-Reset"] == refused.headers["Retry-After"]
        assert refused.headers["RateLimit-Remaining"] == "0"
        # Another client is not affected, and probes are never limited.
        other = await api.http.get("/wallet/balance", headers={"client-id": "x", **behind_proxy(fresh_ip())})
        assert other.status_code == 404
        probe = await api.http.get("/health", headers=behind_proxy(ip))
        assert probe.status_code == 200
        # Probes and scrapes are never counted nor refused, yet carry the caller's count.
        assert (probe.headers["RateLimit-Limit"], probe.headers["RateLimit-Remaining"]) == ("5", "0")
        scraper = behind_proxy(fresh_ip())
        for path in ("/health", "/ready", "/metrics", "/metrics"):
            scraped = await api.http.get(path, headers=scraper)
            assert scraped.status_code == 200
            assert scraped.headers["RateLimit-Remaining"] == "5"
            assert 0 < int(scraped.headers["RateLimit-Reset"]) <= 60


def rate_limit_batches() -> tuple[float, float]:
    """How many counting batches this process ran, and how many requests they counted."""
    labels = {"kind": "rate_limit"}
    count = REGISTRY.get_sample_value("wallet_batch_size_count", labels) or 0.0
    return count, REGISTRY.get_sample_value("wallet_batch_size_sum", labels) or 0.0


async def test_a_concurrent_burst_is_cut_at_exactly_the_limit(
    database_url: str, provider: Provider, redis_url: str | None
) -> None:
    """Requests arriving together are counted together (with Redis: one round trip for many), and
    each still gets its own place in the count."""
    ip = fresh_ip()
    async with start_service(database_url, provider.url, **limiter(redis_url, "10/minute")) as api:
        headers = {"client-id": "nobody", **behind_proxy(ip)}
        before = rate_limit_batches()
        burst = (api.http.get("/wallet/balance", headers=headers) for _ in range(30))
        responses = await asyncio.gather(*burst)
        after = rate_limit_batches()
    assert Counter(r.status_code for r in responses) == {404: 10, 429: 20}
    allowed = [int(r.headers["RateLimit-Remaining"]) for r in responses if r.status_code == 404]
    assert sorted(allowed) == list(range(10))
    assert {r.headers["RateLimit-Remaining"] for r in responses if r.status_code == 429} == {"0"}
    batches, counted = after[0] - before[0], after[1] - before[1]
    assert counted == 30
    if redis_url:  # requests arriving during a round trip wait for the next batch, together
        assert batches < 30


async def test_the_count_carries_over_a_window_boundary(
    counts: MemoryCounts | RedisCounts | PostgresCounts,
) -> None:
    """Requests just before and just after a fixed window's end count down as one sequence: the
    previous window's hits still (almost) all fall inside the sliding window."""
    now = [1_800_000.0 - 0.002]  # 2 ms before a 60 s window ends
    window = SlidingWindow(parse("5/minute"), counts, clock=lambda: now[0])
    ip = fresh_ip()
    try:
        remaining = [(await window.hit(ip)).remaining for _ in range(2)]
        now[0] += 0.004  # 2 ms into the next window
        remaining += [(await window.hit(ip)).remaining for _ in range(4)]
        allowed = (await window.hit(ip)).allowed
    finally:
        window.close()
    assert remaining == [4, 3, 2, 1, 0, 0]
    assert not allowed


async def test_a_client_that_waits_retry_after_is_served(
    counts: MemoryCounts | RedisCounts | PostgresCounts,
) -> None:
    """Retry-After is when one more request will be allowed, not the end of the window: right
    after it, the window's hits (refused ones too) still weigh almost in full."""
    now = [1_800_000.0 + 10]  # 10 s into a 60 s window
    window = SlidingWindow(parse("5/minute"), counts, clock=lambda: now[0])
    full, half = fresh_ip(), fresh_ip()
    try:
        verdicts = [await window.hit(full) for _ in range(8)]
        assert [v.allowed for v in verdicts] == [True] * 5 + [False] * 3
        # 8 hits here: in the next window they weigh 8 * (1 - t/60), allowed once that is <= 4.
        assert verdicts[-1].reset == 50 + 30
        for _ in range(5):
            assert (await window.hit(half)).allowed
        now[0] += 51  # 1 s into the next window: `half`'s 5 still weigh ceil(5 * 59/60) = 5
        refused = await window.hit(half)
        assert not refused.allowed
        assert refused.reset == 23  # 5 * (1 - t/60) <= 5 - 1 - 1 once t >= 24 s
        now[0] += refused.reset
        assert (await window.hit(half)).allowed
        now[0] += 80 - 51 - refused.reset
        assert (await window.hit(full)).allowed
    finally:
        window.close()


async def test_refused_requests_move_no_money(
    database_url: str, provider: Provider, redis_url: str | None
) -> None:
    ip = fresh_ip()
    async with start_service(database_url, provider.url, **limiter(redis_url, "3/minute")) as api:
        admin = {**api.admin_headers, **behind_proxy(ip)}
        statuses = []
        for _ in range(5):
            response = await api.http.post(
                "/admin/wallet/credit", json={"client_id": "C1", "amount": 1}, headers=admin
            )
            statuses.append(response.status_code)
        assert statuses == [200, 200, 200, 429, 429]
        balance = await api.http.get("/wallet/balance", headers={"client-id": "C1"})
        assert balance.json()["data"]["balance"] == 3


async def test_forwarded_for_is_ignored_from_untrusted_peers(
    database_url: str, provider: Provider, redis_url: str | None
) -> None:
    async with start_service(
        database_url, provider.url, **limiter(redis_url, "2/minute", trusted_proxies="")
    ) as api:
        # Without trusted proxies, the bucket is the socket peer, whatever the header says.
        statuses = []
        for _ in range(3):
            response = await api.http.get("/wallet/balance", headers=behind_proxy(fresh_ip()))
            statuses.append(response.status_code)
        assert statuses[-1] == 429


async def test_instances_share_counts_through_redis(
    database_url: str, provider: Provider, redis_url: str | None
) -> None:
    """Two service instances: with Redis they share one budget; without, each has its own."""
    ip = fresh_ip()
    settings = limiter(redis_url, "4/minute")
    async with (
        start_service(database_url, provider.url, **settings) as first,
        start_service(database_url, provider.url, **settings) as second,
    ):

        async def hit(api: httpx.AsyncClient) -> int:
            response = await api.get("/wallet/balance", headers={"client-id": "n", **behind_proxy(ip)})
            return response.status_code

        statuses = []
        for _ in range(3):
            statuses += [await hit(first.http), await hit(second.http)]
        if redis_url:
            assert statuses == [404, 404, 404, 404, 429, 429]
        else:
            assert statuses == [404] * 6


async def test_a_stopped_service_leaves_no_counting_connection(
    database_url: str, provider: Provider, redis_url: str | None
) -> None:
    """The counts' Redis connections are closed with the service, not left to the process's end."""
    ip = fresh_ip()

    async def named() -> int:
        if redis_url is None:
            return 0
        client = coredis.Redis.from_url(redis_url)
        try:
            return sum(1 for c in await client.client_list() if c.get("name") == CLIENT_NAME)
        finally:
            client.connection_pool.disconnect()

    before = await named()
    async with start_service(database_url, provider.url, **limiter(redis_url, "5/minute")) as api:
        response = await api.http.get("/wallet/balance", headers={"client-id": "n", **behind_proxy(ip)})
        assert response.headers["RateLimit-Remaining"] == "4"
        during = await named()
    assert await named() == before
    assert during == (before + 1 if redis_url else 0)


async def test_redis_down_counts_in_the_process(database_url: str, provider: Provider) -> None:
    """A limiter whose Redis is unreachable neither fails requests nor stops limiting: the
    process counts alone meanwhile, and its answers carry the headers."""
    async with start_service(
        database_url, provider.url, rate_limit="2/minute", redis_url=dead_redis_url()
    ) as api:
        answers = [await api.http.get("/wallet/balance", headers={"client-id": "nobody"}) for _ in range(3)]
    assert [a.status_code for a in answers] == [404, 404, 429]
    assert [a.headers["RateLimit-Remaining"] for a in answers] == ["1", "0", "0"]


async def test_a_redis_that_stops_answering_is_done_without_by_its_deadline(
    database_url: str, provider: Provider
) -> None:
    """A Redis that never answers costs a request the counts' deadline, twice at most (coredis
    tries a batch again on a fresh connection), and then the request is served, counted in the
    process: nothing waits for it for ever."""
    async with (
        mute_redis() as redis,
        start_service(database_url, provider.url, rate_limit="1/minute", redis_url=redis.url) as api,
    ):
        async with asyncio.timeout(2 * REDIS_TIMEOUT_SECONDS + 3):
            response = await api.http.get("/wallet/balance", headers={"client-id": "nobody"})
        assert response.status_code == 404
        assert response.headers["RateLimit-Remaining"] == "0"
        assert redis.asked.is_set()  # the counts were asked for, and never answered


def test_client_ip_is_the_nearest_untrusted_hop() -> None:
    trusted = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("10.0.0.0/8"))

    def scope(peer: str, forwarded: str | None) -> Scope:
        headers = [(b"x-forwarded-for", forwarded.encode())] if forwarded else []
        return {"type": "http", "client": (peer, 1234), "headers": headers}

    # A client may put anything on the left; only hops added by trusted proxies count.
    assert client_ip(scope("127.0.0.1", "6.6.6.6, 203.0.113.7, 10.1.2.3"), trusted) == "203.0.113.7"
    assert client_ip(scope("127.0.0.1", "203.0.113.7"), trusted) == "203.0.113.7"
    assert client_ip(scope("198.51.100.1", "203.0.113.7"), trusted) == "198.51.100.1"
    assert client_ip(scope("127.0.0.1", None), trusted) == "127.0.0.1"
    assert client_ip(scope("127.0.0.1", "not-an-ip, 10.0.0.1"), trusted) == "not-an-ip"
    assert client_ip(scope("127.0.0.1", "203.0.113.7"), ()) == "127.0.0.1"
    # Hops written with a port (some proxies do) are the same client, and a trusted proxy so written
    # is still trusted.
    assert client_ip(scope("127.0.0.1", "203.0.113.7:5678"), trusted) == "203.0.113.7"
    assert client_ip(scope("127.0.0.1", "[2001:db8::1]:443"), trusted) == "2001:db8::1"
    assert client_ip(scope("127.0.0.1", "[2001:db8::1]"), trusted) == "2001:db8::1"
    assert client_ip(scope("127.0.0.1", "2001:db8::1"), trusted) == "2001:db8::1"
    assert client_ip(scope("127.0.0.1", "203.0.113.7, 10.0.0.1:80"), trusted) == "203.0.113.7"
