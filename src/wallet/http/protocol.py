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
"""

from __future__ import annotations

import http

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from wallet.errors import BadRequest, HeaderFieldsTooLarge, UriTooLong, WalletError
from wallet.observability import new_request_id
from wallet.wire import dumps

MAX_LINE_BYTES = 8 * 1024  # the request target; one header line (name, ": ", value)
MAX_HEAD_BYTES = 32 * 1024  # request line and every header line
MAX_HEADERS = 100
LINGER_SECONDS = 5.0

_MALFORMED = BadRequest("Malformed HTTP request", code="MALFORMED_HTTP")


class _HeadRefused(Exception):
    """Raised from a parser callback to stop parsing; `send_400_response` answers `error`."""


class JsonErrorsHttpToolsProtocol(HttpToolsProtocol):
    _in_head = True  # reading a request head (or waiting for the next request's first byte)
    _head_bytes = 0  # bytes fed to the parser since the current head began
    _head_lines = 0  # header lines of the current head, and their bytes
    _header_bytes = 0
    _refusal: WalletError | None = None
    _refused = False  # answered with an error: everything else the client sends is dropped

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
        body = dumps(error.body())
        phrase = http.HTTPStatus(error.status).phrase
        head = [f"HTTP/1.1 {error.status} {phrase}\r\n".encode()]
        head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
        head += [
            # every answer carries a request id (the document says so), refusals too
            b"x-request-id: " + new_request_id().encode() + b"\r\n",
            b"content-type: application/json\r\n",
            b"content-length: " + str(len(body)).encode() + b"\r\n",
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        self._refused = True
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
