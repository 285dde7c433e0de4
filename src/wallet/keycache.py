"""A per-process cache of verified client API keys (digest -> owning client id), so that a
request with a known key skips the lookup query, while a revoked key is still refused everywhere
within a second.

Every change to api_keys NOTIFYs `wallet_api_keys` from its own transaction (migration 0011):
revocations by the API or the console, and an operator's SQL alike. Each process keeps one
session LISTENing on that channel and clears its cache on every notification. The cache is
trusted only while that session is proven live: a heartbeat (`SELECT 1`) every HEARTBEAT_EVERY
seconds, and PostgreSQL sends a session the notifications already committed before it answers,
so a heartbeat started after a revocation committed returns only after that revocation was
heard. Entries are served for FRESH_FOR seconds after the start of the last heartbeat that came
back, so even a silently hung session lets a revoked key through for less than that. A lost
session clears the cache; keys are then checked in the database until it is back (reconnected
with back-off), and the cache is cleared again once it listens, since changes made in between
were not heard. Only valid keys are cached: a new key works at once and an unknown key is
queried every time."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable

import asyncpg
import structlog

from wallet.database import plain_url
from wallet.observability import API_KEY_CACHE, API_KEY_CACHE_LISTENING

CHANNEL = "wallet_api_keys"  # NOTIFYed by the trigger of migration 0011
APPLICATION_NAME = "wallet key cache"  # the listening session, as pg_stat_activity shows it
HEARTBEAT_EVERY = 0.25
FRESH_FOR = 0.75  # < 1 s: the longest a revoked key may still be served from a cache
HEARTBEAT_TIMEOUT = 2.0  # a heartbeat not answered by then: the session is dropped, then redone
CONNECT_TIMEOUT = 5.0
BACKOFF_FIRST, BACKOFF_MAX = 0.1, 2.0

log = structlog.get_logger(__name__)

Lookup = Callable[[bytes], Awaitable[str | None]]


class KeyCache:
    """The cache itself. One event loop owns it: no lock, and nothing here awaits except the
    lookup `owner` is given. `_generation` changes with every clear, so that a lookup that was
    in flight across a clear (whose answer may predate the change that caused it) is not kept."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._owners: dict[bytes, str] = {}
        self._generation = 0
        self._listening = False
        self._fresh_until = 0.0

    def live(self) -> bool:
        return self._listening and time.monotonic() < self._fresh_until

    async def owner(self, key_digest: bytes, lookup: Lookup) -> str | None:
        """The client the key belongs to: from the cache when it is live and knows the key,
        otherwise from `lookup` (the database), remembering a valid key when nothing was cleared
        meanwhile."""
        if not self.live():
            API_KEY_CACHE.labels("bypass").inc()
            return await lookup(key_digest)
        cached = self._owners.get(key_digest)
        if cached is not None:
            API_KEY_CACHE.labels("hit").inc()
            return cached
        API_KEY_CACHE.labels("miss").inc()
        generation = self._generation
        found = await lookup(key_digest)
        if found is not None and self._listening and generation == self._generation:
            if len(self._owners) >= self.size:  # full: the oldest entry goes (insertion order)
                del self._owners[next(iter(self._owners))]
            self._owners[key_digest] = found
        return found

    def clear(self) -> None:
        self._owners.clear()
        self._generation += 1

    def subscribed(self) -> None:
        """The listening session is (again) subscribed; live from its first heartbeat on."""
        self.clear()
        self._listening = True
        self._fresh_until = 0.0
        API_KEY_CACHE_LISTENING.set(1)

    def heard_back(self, sent_at: float) -> None:
        """A heartbeat sent at `sent_at` (time.monotonic) was answered."""
        if self._listening:
            self._fresh_until = max(self._fresh_until, sent_at + FRESH_FOR)

    def lost(self) -> None:
        self.clear()
        self._listening = False
        self._fresh_until = 0.0
        API_KEY_CACHE_LISTENING.set(0)


class Listener:
    """The listening session that keeps `cache` trustworthy, redone whenever it is lost, until
    the task running `run` is cancelled (the app's lifespan does so at shutdown)."""

    def __init__(self, cache: KeyCache, url: str) -> None:
        self.cache = cache
        self.url = plain_url(url)
        self._failures = 0

    async def run(self) -> None:
        while True:
            try:
                await self._session()
            except Exception as exc:
                log.warning(
                    "api key cache listener lost: keys are checked in the database until it is back",
                    error=str(exc) or type(exc).__name__,
                )
            self._failures += 1
            delay = min(BACKOFF_FIRST * 2 ** (self._failures - 1), BACKOFF_MAX)
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))

    async def _session(self) -> None:
        conn = await asyncpg.connect(
            self.url, timeout=CONNECT_TIMEOUT, server_settings={"application_name": APPLICATION_NAME}
        )
        closed = asyncio.Event()

        def on_close(_: object) -> None:
            self.cache.lost()  # at once, not at the next heartbeat
            closed.set()

        conn.add_termination_listener(on_close)
        try:
            await conn.add_listener(CHANNEL, self._notified)
            self.cache.subscribed()
            self._failures = 0
            log.info("api key cache listening", channel=CHANNEL)
            while not conn.is_closed():
                sent_at = time.monotonic()
                async with asyncio.timeout(HEARTBEAT_TIMEOUT):
                    await conn.execute("SELECT 1")
                self.cache.heard_back(sent_at)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(HEARTBEAT_EVERY):
                        await closed.wait()
            raise ConnectionError("the listening session was closed")
        finally:
            self.cache.lost()
            with contextlib.suppress(Exception):
                await conn.close(timeout=2)

    def _notified(self, *_: object) -> None:
        """Something in api_keys changed (a sync callback: asyncpg calls it in order, before the
        answer to any later heartbeat is seen)."""
        self.cache.clear()
