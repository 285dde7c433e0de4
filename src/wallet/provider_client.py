"""The keep-alive HTTP/1.1 client that carries every call to the fulfillment provider.

Why not aiohttp: an order makes one provider call, and aiohttp's general machinery (URL and
header objects, payload writers, tracing hooks, a response object) was a fifth of a worker's
CPU samples under spread orders (py-spy; docs/benchmarks.md, "A thin provider client"). This
client does the little a provider call needs: one request written as one buffer, the answer
parsed by httptools (the parser uvicorn uses), the connection kept for the next call.

What a failure proves is decided by the caller (`fulfillment.classify_error`); this module only
tells the one thing it alone knows: `NotSent` means no connection was made, so not a byte of the
request left this process. Every other failure (a reset, a connection closed before the whole
answer, a malformed answer, a timeout after connecting) means the request may have arrived.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import ssl
import time
import zlib
from dataclasses import dataclass
from typing import cast
from urllib.parse import unquote, urlsplit

import httptools

# An idle connection older than this is closed rather than reused: below the 5 s many servers
# keep an idle connection (uvicorn's and Node's default), so a reused one is rarely closed by the
# provider just as a request goes out (which would make that call's outcome unknown).
IDLE_SECONDS = 4.0
IDLE_PER_ORIGIN = 64  # idle connections kept per origin; more are closed when they come back
MAX_ANSWER_BYTES = 1 << 20  # a provider's answer is an id and a few fields; more is not an answer


class NotSent(Exception):
    """No connection could be made (refused, name or TLS failure, connect timeout)."""


@dataclass(frozen=True, slots=True)
class Origin:
    scheme: str
    host: str
    port: int

    @property
    def tls(self) -> bool:
        return self.scheme == "https"


@functools.lru_cache(maxsize=64)
def split(url: str) -> tuple[Origin, str, str | None]:
    """(origin, request target, Authorization) of an absolute http(s) URL; ValueError for
    anything else. Credentials in the URL (`https://user:secret@host/…`, the only way the
    settings can carry the provider's) are sent as Basic authentication, as aiohttp did.
    Cached: it runs on every call, and the provider's URLs are few and fixed."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("not an absolute http(s) URL")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    authorization = None
    if parts.username is not None:
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        authorization = "Basic " + base64.b64encode(pair.encode()).decode()
    return Origin(parts.scheme, parts.hostname, port), target, authorization


class _Connection(asyncio.Protocol):
    """One connection: one request at a time, its answer parsed as it arrives."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._answer: asyncio.Future[tuple[int, bytes]] | None = None
        self._body: list[bytes] = []
        self._encoding = b""
        self._framed = False
        self._complete = False
        self._status = self._size = 0
        self._keep_alive = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ConnectionError(f"malformed answer: {exc}"))
            self.close()

    def eof_received(self) -> bool:
        self.closed = True
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._answer is None or self._answer.done():
            return
        if self._until_close and exc is None:  # ended cleanly: that was the body
            self.on_message_complete()
        else:
            self._fail(ConnectionError(f"connection lost before the whole answer ({exc or 'closed'})"))

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._body, self._encoding, self._framed, self._complete = [], b"", False, False
        self._status = self._size = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-encoding":
            self._encoding = value.strip().lower()
        elif name in (b"content-length", b"transfer-encoding"):
            self._framed = True

    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()
        self._keep_alive = self._parser.should_keep_alive()  # only meaningful before the body

    def on_body(self, body: bytes) -> None:
        self._body.append(body)
        self._size += len(body)
        if self._size > MAX_ANSWER_BYTES:
            self._fail(ConnectionError(f"answer over {MAX_ANSWER_BYTES} bytes"))
            self.close()

    def on_message_complete(self) -> None:
        if self._status < 200:  # informational (100 Continue, 103): the answer is still to come
            return
        self._complete = True
        if self._answer is not None and not self._answer.done():
            try:
                self._answer.set_result((self._status, _decoded(b"".join(self._body), self._encoding)))
            except (zlib.error, ValueError) as exc:
                self._fail(ConnectionError(f"answer body not {self._encoding.decode()}: {exc}"))

    # ours
    def _fail(self, exc: Exception) -> None:
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(exc)

    async def exchange(self, request: bytes) -> tuple[int, bytes]:
        assert self.transport is not None
        self._answer = asyncio.get_running_loop().create_future()
        self._status = 0
        self.transport.write(request)
        try:
            return await self._answer
        finally:
            self._answer = None

    @property
    def _until_close(self) -> bool:
        """An answer with neither Content-Length nor chunked: its body ends with the connection."""
        return not self._framed and self._status >= 200

    @property
    def reusable(self) -> bool:
        return self._complete and not self.closed and not self._until_close and self._keep_alive

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


def _decoded(body: bytes, encoding: bytes) -> bytes:
    if encoding not in (b"gzip", b"x-gzip", b"deflate"):
        return body
    inflate = zlib.decompressobj(wbits=47)  # 47: gzip or zlib, told by the header
    plain = inflate.decompress(body, MAX_ANSWER_BYTES)
    if inflate.unconsumed_tail:
        raise ValueError(f"over {MAX_ANSWER_BYTES} bytes once decompressed")
    if not inflate.eof:
        raise ValueError("the compressed body ends early")
    return plain


class ProviderClient:
    """Keep-alive connections per origin, at most `limit` at once; `request` is one call."""

    def __init__(self, *, timeout: float, limit: int = 256) -> None:
        self._timeout = timeout
        self._gate = asyncio.Semaphore(limit)
        self._idle: dict[Origin, list[_Connection]] = {}
        self._tls: ssl.SSLContext | None = None

    async def request(
        self, method: str, url: str, body: bytes | None, headers: dict[str, str]
    ) -> tuple[int, bytes]:
        """(status, body) of one call, within the timeout. Raises NotSent when no connection
        could be made; ConnectionError, TimeoutError or OSError when the request may have
        arrived."""
        try:
            origin, target, authorization = split(url)
            if authorization:
                headers = {**headers, "Authorization": authorization}
            request = _request_bytes(method, origin, target, body, headers)
        except ValueError as exc:
            raise NotSent(str(exc)) from exc
        conn: _Connection | None = None
        try:
            async with asyncio.timeout(self._timeout), self._gate:
                conn = self._take(origin) or await self._open(origin)
                answer = await conn.exchange(request)
        except TimeoutError:
            if conn is None:
                raise NotSent(f"no connection within {self._timeout}s") from None
            conn.close()
            raise
        except BaseException:
            if conn is not None:
                conn.close()
            raise
        self._give_back(origin, conn)
        return answer

    def _take(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < IDLE_SECONDS:
                return conn
            conn.close()
        return None

    async def _open(self, origin: Origin) -> _Connection:
        loop = asyncio.get_running_loop()
        tls = None
        if origin.tls:
            tls = self._tls = self._tls or ssl.create_default_context()
        try:
            _, conn = await loop.create_connection(
                _Connection, origin.host, origin.port, ssl=tls, server_hostname=origin.host if tls else None
            )
        except OSError as exc:  # refused, unreachable, name not found, TLS handshake refused
            raise NotSent(f"{type(exc).__name__}: {exc}") from exc
        return conn

    def _give_back(self, origin: Origin, conn: _Connection) -> None:
        idle = self._idle.setdefault(origin, [])
        if conn.reusable and len(idle) < IDLE_PER_ORIGIN:
            conn.idle_since = time.monotonic()
            idle.append(conn)
        else:
            conn.close()

    async def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()

    async def __aenter__(self) -> ProviderClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def _request_bytes(
    method: str, origin: Origin, target: str, body: bytes | None, headers: dict[str, str]
) -> bytes:
    default_port = 443 if origin.tls else 80
    host = origin.host if origin.port == default_port else f"{origin.host}:{origin.port}"
    if ":" in origin.host:  # an IPv6 literal
        host = f"[{origin.host}]" if origin.port == default_port else f"[{origin.host}]:{origin.port}"
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", "Accept: application/json"]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    for name, value in headers.items():
        if "\r" in value or "\n" in value:
            raise ValueError(f"header {name} holds a line break")
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")
