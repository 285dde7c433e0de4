"""Builders for tests: the service and the provider as real HTTP servers on loopback, and a
small client that speaks the API the way a user would."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import json
import os
import signal
import socket
import ssl
import struct
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from wallet.chain import GENESIS_HASH, LedgerKey, canonical_content, chain_hash
from wallet.database import Statement, plain_url
from wallet.http.app import create_app
from wallet.http.protocol import JsonErrorsHttpToolsProtocol
from wallet.listen import read_delivery
from wallet.simulator import Faults, Simulator

ADMIN_KEY = "test-admin-key-0123456789abcdef0123"
LEDGER_KEY = "test-ledger-key-0123456789abcdef012"


@contextlib.asynccontextmanager
async def serve(app: ASGIApp, port: int = 0) -> AsyncIterator[str]:
    """Serve `app` with uvicorn on a loopback port bound up front: connections made before
    startup finishes wait in the listen backlog, so no readiness polling is needed."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(1024)
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        lifespan="on",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=1,
        loop="asyncio",
        http=JsonErrorsHttpToolsProtocol,  # as `wallet serve` runs it
        proxy_headers=False,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


@dataclass
class Provider:
    url: str
    simulator: Simulator

    @property
    def faults(self) -> Faults:
        return self.simulator.faults

    def set(self, **faults: Any) -> None:
        self.simulator.faults = Faults(**faults)


@contextlib.asynccontextmanager
async def start_provider(**faults: Any) -> AsyncIterator[Provider]:
    simulator = Simulator(faults=Faults(**faults))
    async with serve(simulator.asgi("/fulfillments")) as base:
        yield Provider(f"{base}/fulfillments", simulator)


async def scheduled_callbacks_ran() -> None:
    """Returns once the event loop has run every callback scheduled before this call: the
    flushes `logs.PassWriter` and `http/protocol.PassTransport` schedule when a pass's first
    write arrives. A condition (callbacks run in the order they were scheduled), not a wait for
    time."""
    loop = asyncio.get_running_loop()
    ran: asyncio.Future[None] = loop.create_future()
    loop.call_soon(ran.set_result, None)
    await ran


RESET, HANG = "reset", "hang"  # a raw server's actions in place of an answer


@dataclass
class RawServer:
    """A provider that sends exact bytes: it reads each request whole (head, then a
    Content-Length body) and sends the next of `replies` (the last one repeats). RESET aborts
    the connection once the request is read; HANG never answers. With `close`, the connection
    is closed after each answer."""

    replies: list[bytes | str]
    close: bool = False
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lengths = [
                    line for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")
                ]
                length = int(lengths[0].split(b":")[1]) if lengths else 0
                self.requests.append(head + await reader.readexactly(length))
                reply = self.replies[min(len(self.requests), len(self.replies)) - 1]
                if reply == RESET:
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    break
                if reply == HANG:
                    await asyncio.Event().wait()
                assert isinstance(reply, bytes)
                writer.write(reply)
                await writer.drain()
                if self.close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()


@contextlib.asynccontextmanager
async def raw_server(
    *replies: bytes | str, close: bool = False, tls: ssl.SSLContext | None = None
) -> AsyncIterator[tuple[str, RawServer]]:
    """A RawServer on loopback, and its URL (`localhost`, the name a test certificate names)."""
    state = RawServer(list(replies), close=close)
    server = await asyncio.start_server(state.handle, "127.0.0.1", 0, ssl=tls)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"{'https' if tls else 'http'}://localhost:{port}/fulfillments", state
        server.close()


@dataclass
class MuteRedis:
    """A Redis that accepts connections, reads what it is sent and never answers (hung, or a
    network that drops its replies)."""

    url: str
    asked: asyncio.Event


@contextlib.asynccontextmanager
async def mute_redis() -> AsyncIterator[MuteRedis]:
    asked = asyncio.Event()

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(4096):
            asked.set()
        writer.close()

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    async with server:
        yield MuteRedis(f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}/0", asked)
        server.close()


def http_answer(status: str, body: bytes, *headers: str) -> bytes:
    """The bytes of an HTTP/1.1 answer; a Content-Length unless `headers` frame the body."""
    head = [f"HTTP/1.1 {status}", "Content-Type: application/json", *headers]
    if not any(h.lower().startswith(("content-length", "transfer-encoding")) for h in headers):
        head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def dead_url() -> str:
    """A loopback URL where nothing listens: connections are refused at once."""
    return f"http://127.0.0.1:{free_port()}/fulfillments"


def dead_redis_url() -> str:
    """A Redis that is down: nothing listens there, so connections are refused at once."""
    return f"redis://127.0.0.1:{free_port()}/0"


@contextlib.asynccontextmanager
async def rows_held(direct_database_url: str, table: str, where: str) -> AsyncIterator[None]:
    """Another session holds these rows locked until the block ends, as an operator's open
    transaction would."""
    conn = await asyncpg.connect(plain_url(direct_database_url))
    try:
        async with conn.transaction():
            await conn.execute(f"SELECT 1 FROM {table} WHERE {where} FOR UPDATE")  # noqa: S608
            yield
    finally:
        await conn.close()


async def lock_deadline_behind_pooler(direct_database_url: str, seconds: float) -> None:
    """Behind a transaction pooler the service cannot set its lock deadline on its connections
    (PgBouncer refuses the startup parameter): the database's own setting stands in, as the
    README tells operators. Directly there is nothing to do: the service sets it."""
    if os.environ.get("DB_POOLER") != "transaction":
        return
    conn = await asyncpg.connect(plain_url(direct_database_url))
    try:
        name = await conn.fetchval("SELECT current_database()")
        await conn.execute(f"ALTER DATABASE \"{name}\" SET lock_timeout = '{round(seconds * 1000)}ms'")
    finally:
        await conn.close()


def ledger_key() -> LedgerKey:
    """The key the tests' services sign the ledger with."""
    return LedgerKey("k1", LEDGER_KEY.encode())


_CONTENT_FIELDS = tuple(inspect.signature(canonical_content).parameters)


def chain_hashes(
    entries: Iterable[Mapping[str, Any]],
    *,
    previous: bytes = GENESIS_HASH,
    secret: bytes | None = LEDGER_KEY.encode(),
) -> list[bytes]:
    """Each ledger entry's hash, chained from `previous` by chain.py's rules (`secret` None: a
    legacy unkeyed chain): what verify recomputes, and what anyone rewriting or forging a history
    in the database has to write."""
    hashes = []
    for entry in entries:
        content = canonical_content(**{name: entry[name] for name in _CONTENT_FIELDS})
        previous = chain_hash(previous, content, secret)
        hashes.append(previous)
    return hashes


def settings_env(database_url: str, provider_url: str, **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "app_env": "development",
        "database_url": database_url,
        "admin_api_key": ADMIN_KEY,
        "ledger_key": LEDGER_KEY,
        "fulfillment_api_url": provider_url,
        "fulfillment_timeout_seconds": 2.0,
        "fulfillment_max_attempts": 3,
        "fulfillment_backoff_seconds": 0.01,
        "rate_limit": "off",
        "console_login_rate": "off",  # tests that count logins turn it on, with an address of their own
        "log_level": "warning",
        # The resolver runs often, so tests see an unknown outcome resolved without waiting.
        "recovery_interval_seconds": 0.05,
    }
    values.update(overrides)
    return values


@dataclass
class Api:
    """The service as a user sees it: HTTP calls with the right headers, nothing else."""

    http: httpx.AsyncClient
    admin_headers: dict[str, str] = field(default_factory=lambda: {"Authorization": f"Bearer {ADMIN_KEY}"})

    async def credit(self, client_id: str, amount: Any, **extra: Any) -> httpx.Response:
        body = {"client_id": client_id, "amount": amount, **extra}
        return await self.http.post("/admin/wallet/credit", json=_jsonable(body), headers=self.admin_headers)

    async def debit(self, client_id: str, amount: Any, **extra: Any) -> httpx.Response:
        body = {"client_id": client_id, "amount": amount, **extra}
        return await self.http.post("/admin/wallet/debit", json=_jsonable(body), headers=self.admin_headers)

    async def order(
        self, client_id: str, amount: Any, headers: dict[str, str] | None = None
    ) -> httpx.Response:
        return await self.http.post(
            "/orders",
            json=_jsonable({"amount": amount}),
            headers={"client-id": client_id, **(headers or {})},
        )

    async def get_order(self, client_id: str, order_id: str) -> httpx.Response:
        return await self.http.get(f"/orders/{order_id}", headers={"client-id": client_id})

    async def order_status(self, client_id: str, order_id: str) -> str:
        response = await self.get_order(client_id, order_id)
        assert response.status_code == 200, response.text
        status: str = response.json()["data"]["status"]
        return status

    async def settled(self, commits: Commits, client_id: str, *order_ids: str) -> None:
        """Until none of these orders is PENDING any more (checked as the service commits)."""

        async def none_pending() -> bool:
            return all([await self.order_status(client_id, o) != "PENDING" for o in order_ids])

        await commits.until(none_pending, what="orders settled")

    async def wallet(self, client_id: str) -> dict[str, Any]:
        response = await self.http.get("/wallet/balance", headers={"client-id": client_id})
        assert response.status_code == 200, response.text
        data: dict[str, Any] = response.json()["data"]
        return data

    async def balance(self, client_id: str) -> Decimal:
        response = await self.http.get("/wallet/balance", headers={"client-id": client_id})
        assert response.status_code == 200, response.text
        return Decimal(str(response.json()["data"]["balance"]))


@dataclass
class RawAnswer:
    """An HTTP answer as it came over the socket (header names lower-case)."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def raw_exchange(api: Api, *parts: bytes) -> RawAnswer:
    """Write `parts` as they are, one by one on a fresh connection, each flushed before the next
    (what HTTP clients refuse to send: a NUL in a header, a head in pieces), then read the answer
    until the server closes."""
    url = httpx.URL(str(api.http.base_url))
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        for part in parts:
            writer.write(part)
            await writer.drain()
        answer = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return RawAnswer(int(lines[0].split()[1]), headers, body)


def spell_amount(cents: int, zeros: int, exponent: int) -> str:
    """A JSON literal worth exactly `cents`/100: the cents followed by `zeros` zeros, the decimal
    point placed so that the literal's exponent is `exponent` (1000, 3, -1 -> "100.0000e-1")."""
    mantissa = str(cents) + "0" * zeros
    fraction = exponent + 2 + zeros  # value = mantissa * 10^-(2 + zeros) = m * 10^-fraction * 10^exponent
    if fraction <= 0:
        digits = mantissa + "0" * -fraction
    else:
        padded = mantissa.rjust(fraction + 1, "0")
        digits = padded[:-fraction] + "." + padded[-fraction:]
    return f"{digits}e{exponent}" if exponent else digits


def _jsonable(body: dict[str, Any]) -> dict[str, Any]:
    """Decimals go out as JSON numbers with their exact digits."""
    return {k: (float(v) if isinstance(v, Decimal) else v) for k, v in body.items()}


@contextlib.asynccontextmanager
async def start_service(database_url: str, provider_url: str, **overrides: Any) -> AsyncIterator[Api]:
    from wallet.settings import Settings

    settings = Settings(**settings_env(database_url, provider_url, **overrides))
    async with (
        serve(create_app(settings)) as base,
        httpx.AsyncClient(base_url=base, timeout=30) as http,
    ):
        yield Api(http)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class ServerProcess:
    """`wallet serve` as its own process: what operators run, and what SIGKILL can kill."""

    process: asyncio.subprocess.Process
    url: str
    lines: list[str] = field(default_factory=list)
    _seen: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def _pump(self) -> None:
        assert self.process.stderr is not None
        async for raw in self.process.stderr:
            self.lines.append(raw.decode(errors="replace").rstrip())
            async with self._seen:
                self._seen.notify_all()
        async with self._seen:
            self._seen.notify_all()

    async def wait_for(self, text: str, count: int = 1) -> None:
        """Until `count` log lines containing `text` were written; fails if the process exits."""

        def enough() -> bool:
            return sum(text in line for line in self.lines) >= count or self.process.returncode is not None

        async with self._seen:
            await self._seen.wait_for(enough)
        assert sum(text in line for line in self.lines) >= count, "\n".join(self.lines[-30:])

    def count(self, text: str) -> int:
        return sum(text in line for line in self.lines)

    async def ended(self) -> None:
        """Until the process has exited and every line it wrote has been read."""
        await self.process.wait()
        assert self.process.stderr is not None
        stderr = self.process.stderr
        async with self._seen:
            await self._seen.wait_for(stderr.at_eof)


def production_env(database_url: str, provider: Provider, *, workers: int) -> dict[str, str]:
    """What `wallet serve` needs to run as in production, with JSON logs at info and no rate
    limit (tests that check logs count every line)."""
    return {
        "APP_ENV": "production",
        "DATABASE_URL": database_url,
        "ADMIN_API_KEY": ADMIN_KEY,
        "FULFILLMENT_API_URL": provider.url,
        "CLIENT_AUTH": "header",
        "WORKERS": str(workers),
        "LOG_LEVEL": "info",
        "RATE_LIMIT": "off",
    }


@contextlib.asynccontextmanager
async def spawn_service(
    env: dict[str, str],
    *,
    unset: tuple[str, ...] = (),
    command: Sequence[str] = ("-m", "wallet.cli", "serve"),
) -> AsyncIterator[ServerProcess]:
    """Start `wallet serve` (`command`: the interpreter's arguments) with `env` (plus PORT, minus
    `unset`) and wait until it accepts requests."""
    port = free_port()
    inherited = {k: v for k, v in os.environ.items() if k not in unset}
    full_env = {"LEDGER_KEY": LEDGER_KEY, **inherited, **env, "PORT": str(port), "HOST": "127.0.0.1"}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *command,
        env=full_env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,  # its own process group: workers included, whatever killed the parent
    )
    server = ServerProcess(process, f"http://127.0.0.1:{port}")
    pump = asyncio.create_task(server._pump())
    try:
        await asyncio.wait_for(server.wait_for("Application startup complete"), 60)
        yield server
    finally:
        if process.returncode is None:
            process.terminate()  # graceful: the supervisor stops its workers and cleans up
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), 30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # anything left, e.g. workers of a killed parent
        await process.wait()
        await pump


COMMIT_CHANNEL = "wallet_test_commit"
# Installed by `watch_commits` in the test's own database only: a statement trigger on every
# table of the service that NOTIFYs when a statement wrote to it (even when it changed no row, so
# a statement that lost a race is heard too). PostgreSQL delivers a NOTIFY when its transaction
# commits, so whatever a notification announces is visible to every read that follows it.
_NOTIFY_ON_WRITE = f"""
CREATE OR REPLACE FUNCTION wallet_test_notify_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{COMMIT_CHANNEL}', TG_TABLE_NAME);
    RETURN NULL;
END
$$;
DO $$
DECLARE
    name text;
BEGIN
    FOR name IN SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'alembic_version'
    LOOP
        EXECUTE format('CREATE OR REPLACE TRIGGER wallet_test_notify_commit'
                       ' AFTER INSERT OR UPDATE OR DELETE ON %I'
                       ' FOR EACH STATEMENT EXECUTE FUNCTION wallet_test_notify_commit()', name);
    END LOOP;
END
$$;
"""  # noqa: S608 (a constant channel name)


class Commits:
    """The commits of the service's writes to one database, heard through LISTEN: a condition the
    service reaches on its own (the resolver settling an order, a delivery attempt logged) is
    checked again each time something was committed, never on a timer."""

    def __init__(self) -> None:
        self._committed = asyncio.Event()

    def _notified(self, *_: object) -> None:
        self._committed.set()

    async def until(
        self, check: Callable[[], Awaitable[bool]], *, within: float = 30.0, what: str = "condition"
    ) -> None:
        """Until `check` holds: now, and again after each commit; fail after `within` seconds.
        The event is cleared before each check, so a commit made during the check is not lost."""
        try:
            async with asyncio.timeout(within):
                while True:
                    self._committed.clear()
                    if await check():
                        return
                    await self._committed.wait()
        except TimeoutError:
            raise AssertionError(f"timed out after {within}s waiting for {what}") from None


@contextlib.asynccontextmanager
async def watch_commits(database_url: str) -> AsyncIterator[Commits]:
    """Commits to the database at `database_url`, which must reach PostgreSQL itself: LISTEN needs
    a session of its own, which a pooler in transaction mode does not keep. The triggers stay in
    that database: use it on a test's own database only."""
    conn = await asyncpg.connect(plain_url(database_url))
    try:
        await conn.execute(_NOTIFY_ON_WRITE)
        commits = Commits()
        await conn.add_listener(COMMIT_CHANNEL, commits._notified)
        yield commits
    finally:
        await conn.close()


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes
    at: float = field(default_factory=time.monotonic)

    @property
    def event(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.body)
        return data


@dataclass
class Receiver:
    """A webhook receiver on loopback: records every request, read as `wallet webhooks listen`
    reads it, without judging it; answers the statuses queued in `answers` first (with
    `headers`), then 200."""

    url: str = ""
    got: list[Delivery] = field(default_factory=list)
    answers: list[int] = field(default_factory=list)
    answer_headers: dict[str, str] = field(default_factory=dict)
    gate: asyncio.Event | None = None  # hold every answer until it is set
    _arrived: asyncio.Condition = field(default_factory=asyncio.Condition, repr=False)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        self.got.append(Delivery(*await read_delivery(scope, receive)))
        async with self._arrived:
            self._arrived.notify_all()
        if self.gate is not None:
            await self.gate.wait()
        status = self.answers.pop(0) if self.answers else 200
        extra = [(k.encode(), v.encode()) for k, v in self.answer_headers.items()] if status != 200 else []
        await send({"type": "http.response.start", "status": status, "headers": extra})
        await send({"type": "http.response.body", "body": b"ok" * 1000})

    async def wait_for(
        self, check: Callable[[], bool], *, within: float = 30.0, what: str = "deliveries"
    ) -> None:
        """Until `check` holds, checked as each request arrives; fail after `within` seconds."""
        try:
            async with asyncio.timeout(within), self._arrived:
                await self._arrived.wait_for(check)
        except TimeoutError:
            raise AssertionError(f"timed out after {within}s waiting for {what}") from None

    async def arrived(self, count: int) -> None:
        """Until `count` requests have arrived (answered or not)."""
        await self.wait_for(lambda: len(self.got) >= count, what=f"{count} deliveries")

    def events(self) -> list[dict[str, Any]]:
        return [d.event for d in self.got]

    def types(self) -> list[str]:
        return [d.event["type"] for d in self.got]


@contextlib.asynccontextmanager
async def start_receiver(receiver: Receiver | None = None, port: int = 0) -> AsyncIterator[Receiver]:
    receiver = receiver or Receiver()
    async with serve(receiver, port) as base:
        receiver.url = f"{base}/hook"
        yield receiver


def _forged_cursor(raw: str) -> str:
    return base64.urlsafe_b64encode(raw.encode()).decode()


# Paging input every keyset-paged list must refuse with a 400.
BAD_PAGING: list[dict[str, str]] = [
    {"limit": "0"},
    {"limit": "101"},
    {"limit": "x"},
    {"limit": "-1"},
    {"limit": "1e999"},
    {"limit": "1e2"},
    {"limit": "1.5"},
    {"limit": "9" * 5000},
    {"limit": "\x00"},
    {"cursor": "not-a-cursor"},
    {"cursor": _forged_cursor("c1:-5")},
    {"cursor": _forged_cursor("c1:99999999999999999999")},
    {"cursor": _forged_cursor("drop table")},
    {"cursor": "%00"},
    {"cursor": "x" * 65},
]


async def all_pages(api: Api, path: str, headers: dict[str, str], limit: int, **params: str) -> list[Any]:
    """Every item of a keyset-paged list, following nextCursor; every page but the last is full."""
    items: list[Any] = []
    cursor: str | None = None
    while True:
        query = {"limit": str(limit), **params, **({"cursor": cursor} if cursor else {})}
        response = await api.http.get(path, params=query, headers=headers)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["success"] is True
        assert len(body["data"]) <= limit
        items += body["data"]
        cursor = body["nextCursor"]
        if cursor is None:
            return items
        assert len(body["data"]) == limit


# Webhook settings for console tests: one retry, so a receiver down for two attempts fails a
# delivery for good and has its endpoint disabled.
WEBHOOKS_ONE_RETRY: dict[str, Any] = {
    "webhook_allow_private": True,
    "webhook_interval_seconds": 0.1,
    "webhook_retry_schedule": (0.1,),
    "webhook_timeout_seconds": 2.0,
}


async def delivered_again(database_url: str, event_id: str) -> bool:
    """Whether a delivery of the event `event_id` is recorded DELIVERED (after a replay)."""
    conn = await asyncpg.connect(plain_url(database_url))
    try:
        delivered = await conn.fetchval(
            "SELECT count(*) FROM webhook_deliveries d JOIN events e"
            " ON e.client_id = d.client_id AND e.id = d.event_no"
            " WHERE e.event_id = $1 AND d.status = 'DELIVERED'",
            event_id,
        )
    finally:
        await conn.close()
    return bool(delivered)


async def failed_endpoint(api: Api, commits: Commits, receiver: Receiver, client_id: str) -> tuple[str, str]:
    """An endpoint of `client_id` at `receiver`, made to answer 500 to the first delivery's every
    attempt (under WEBHOOKS_ONE_RETRY), and a debit, so that the service disables the endpoint:
    (endpoint id, the failed event's id)."""
    receiver.answers[:0] = [500, 500]
    headers = {"client-id": client_id}
    created = await api.http.post("/webhook-endpoints", json={"url": receiver.url}, headers=headers)
    endpoint: str = created.json()["data"]["id"]
    await api.debit(client_id, 1)

    async def disabled() -> bool:
        got = await api.http.get(f"/webhook-endpoints/{endpoint}", headers=headers)
        return got.json()["data"]["enabled"] is False

    await commits.until(disabled, what="the endpoint disabled after failing")
    return endpoint, receiver.got[0].headers["webhook-id"]


async def scans_of(
    conn: asyncpg.Connection, statement: Statement, params: Mapping[str, Any], table: str
) -> list[tuple[str, float]]:
    """Run `statement` under EXPLAIN ANALYZE in a transaction that is rolled back; every scan of
    `table` or of one of its indexes (named after it), with the rows it read over all its loops
    (those its filter then dropped included)."""
    transaction = conn.transaction()
    await transaction.start()
    try:
        explained = await conn.fetchval(
            "EXPLAIN (ANALYZE, FORMAT JSON) " + statement.sql, *(params[name] for name in statement.names)
        )
    finally:
        await transaction.rollback()

    def scans(plan: dict[str, Any]) -> list[tuple[str, float]]:
        found = []
        name = plan.get("Index Name") or plan.get("Relation Name") or ""
        if "Scan" in plan["Node Type"] and (name == table or name.startswith(table + "_")):
            read = plan["Actual Rows"] + plan.get("Rows Removed by Filter", 0)
            found.append((name, float(read * plan["Actual Loops"])))
        for child in plan.get("Plans", []):
            found += scans(child)
        return found

    return scans(json.loads(explained)[0]["Plan"])
