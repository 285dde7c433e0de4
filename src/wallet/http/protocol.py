"""The HTTP protocol uvicorn serves the app with.

A request the HTTP parser itself refuses (a NUL, CR or LF inside a header value, a malformed
request line, a bad chunk size) never reaches the app, and uvicorn answers it with a plain-text
400. Clients of this API are promised the JSON error envelope on every response, so the parser's
refusals are rendered in it too.

uvicorn's httptools protocol also reads a request head of any size: a single header of megabytes
is buffered and served. Here the head is bounded while it is read, before anything is buffered
past the bounds: a request target over MAX_LINE_BYTES is a 414, a header line over
MAX_LINE_BYTES, more than MAX_HEADERS headers or a head over MAX_HEAD_BYTES is a 431. The bytes
of a head are counted across TCP reads, so a head trickled in small writes is bounded the same.

A refusal is answered and then the connection is closed gracefully: our side is shut for
writing, and what the client still sends is read and dropped until it closes (at most
LINGER_SECONDS), so a client still sending its oversized head gets the answer instead of a reset.

uvicorn writes a response's head and its body separately, each a system call and a TCP segment
of its own. Every write here is held until the event-loop pass ends and then written as one
(`PassTransport`): a response leaves in one call, and the client wakes once to read it.
"""

from __future__ import annotations

import asyncio
import http
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from wallet.errors import BadRequest, HeaderFieldsTooLarge, UriTooLong, WalletError
from wallet.observability import new_request_id
from wallet.ratelimit import client_ip, rate_headers
from wallet.wire import dumps

MAX_LINE_BYTES = 8 * 1024  # the request target; one header line (name, ": ", value)
MAX_HEAD_BYTES = 32 * 1024  # request line and every header line
MAX_HEADERS = 100
LINGER_SECONDS = 5.0

_MALFORMED = BadRequest("Malformed HTTP request", code="MALFORMED_HTTP")


class PassTransport(asyncio.Transport):
    """The connection's transport, with the writes of one event-loop pass joined into one.

    Held bytes are written before the transport closes or half-closes, so nothing written is
    lost to a close in the same pass; they are dropped only if the connection is already gone.
    """

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._transport = transport
        self._loop = loop
        self._held: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._held:
            self._loop.call_soon(self.flush)
        self._held.append(bytes(data))

    def flush(self) -> None:
        if self._held:
            held, self._held = self._held, []
            if not self._transport.is_closing():
                self._transport.write(held[0] if len(held) == 1 else b"".join(held))

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def abort(self) -> None:
        self._held = []
        self._transport.abort()

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._held))

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()


class _HeadRefused(Exception):
    """Raised from a parser callback to stop parsing; `send_400_response` answers `error`."""


class JsonErrorsHttpToolsProtocol(HttpToolsProtocol):
    _in_head = True  # reading a request head (or waiting for the next request's first byte)
    _head_bytes = 0  # bytes fed to the parser since the current head began
    _head_lines = 0  # header lines of the current head, and their bytes
    _header_bytes = 0
    _refusal: WalletError | None = None
    _refused = False  # answered with an error: everything else the client sends is dropped

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(PassTransport(transport, self.loop))

    def data_received(self, data: bytes) -> None:
        """Feed the parser, never more than the rest of MAX_HEAD_BYTES while a head is open: the
        parser buffers a header until it is complete, so this is what bounds that buffer."""
        while data and not self._refused:
            if self._in_head:
                room = MAX_HEAD_BYTES - self._head_bytes
                if room <= 0:
                    self._refuse(HeaderFieldsTooLarge(f"Request head exceeds {MAX_HEAD_BYTES} bytes"))
                    return
                piece, data = data[:room], data[room:]
                self._head_bytes += len(piece)
            else:
                piece, data = data, b""
            super().data_received(piece)
            if self.transport.is_closing():
                return

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_lines = self._header_bytes = 0

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > MAX_LINE_BYTES:
            self._stop(UriTooLong(f"Request target exceeds {MAX_LINE_BYTES} bytes"))

    def on_header(self, name: bytes, value: bytes) -> None:
        """Checks what the byte count cannot see: a head that began in the same TCP read as the
        end of the previous request's body (pipelining) was parsed without slicing."""
        line = len(name) + 2 + len(value)
        self._head_lines += 1
        self._header_bytes += line + 2
        if line > MAX_LINE_BYTES:
            self._stop(HeaderFieldsTooLarge(f"A request header line exceeds {MAX_LINE_BYTES} bytes"))
        if self._head_lines > MAX_HEADERS:
            self._stop(HeaderFieldsTooLarge(f"More than {MAX_HEADERS} request headers"))
        if self._header_bytes > MAX_HEAD_BYTES:
            self._stop(HeaderFieldsTooLarge(f"Request head exceeds {MAX_HEAD_BYTES} bytes"))
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True
        self._head_bytes = 0

    def _stop(self, error: WalletError) -> None:
        self._refusal = error
        raise _HeadRefused

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to anything the parser raised, our own refusals included."""
        self._refuse(self._refusal or _MALFORMED)

    def _refuse(self, error: WalletError) -> None:
        """Answer `error` and end the connection. With a rate limit, the answer carries the
        caller's RateLimit headers as every answer does (SPEC §6), once the count is read: a
        refusal the app never saw is not counted, as a probe is not (`SlidingWindow.peek`)."""
        self._refused = True  # from now on what the client sends is dropped
        state = getattr(self.app, "state", None)
        counter = getattr(state, "rate_counter", None)
        if counter is None:
            self._answer(error, [])
            return
        scope = {"client": self.client, "headers": self.headers or []}
        ip = client_ip(scope, state.settings.trusted_proxies)  # type: ignore[union-attr]
        self.loop.create_task(self._answer_counted(error, counter, ip))

    async def _answer_counted(self, error: WalletError, counter: Any, ip: str) -> None:
        try:
            verdict = await counter.peek(ip)
        except Exception:  # the counts' store is down: answer without them, as the app does
            headers = []
        else:
            headers = rate_headers(counter.limit, verdict)
        if not self.transport.is_closing():
            self._answer(error, headers)

    def _answer(self, error: WalletError, extra: list[tuple[bytes, bytes]]) -> None:
        body = dumps(error.body())
        phrase = http.HTTPStatus(error.status).phrase
        head = [f"HTTP/1.1 {error.status} {phrase}\r\n".encode()]
        head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
        head += [name + b": " + value + b"\r\n" for name, value in extra]
        head += [
            # every answer carries a request id (the document says so), refusals too
            b"x-request-id: " + new_request_id().encode() + b"\r\n",
            b"content-type: application/json\r\n",
            b"content-length: " + str(len(body)).encode() + b"\r\n",
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        in_flight = self.cycle is not None and not self.cycle.response_complete
        if in_flight or not self.transport.can_write_eof():  # a pipelined request's answer is lost
            self.transport.close()
            return
        self.transport.write_eof()
        self.flow.resume_reading()  # keep draining even if a pipelined request had paused reading
        # The keep-alive timer closes the connection if the client does not; connection_lost
        # cancels it when the client does.
        self._unset_keepalive_if_required()
        self.timeout_keep_alive_task = self.loop.call_later(LINGER_SECONDS, self.timeout_keep_alive_handler)
