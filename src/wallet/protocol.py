"""The HTTP protocol uvicorn serves the app with.

A request the HTTP parser itself refuses (a NUL, CR or LF inside a header value, a malformed
request line, a bad chunk size) never reaches the app, and uvicorn answers it with a plain-text
400. Clients of this API are promised the JSON error envelope on every response, so the parser's
refusals are rendered in it too.
"""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from wallet.errors import BadRequest
from wallet.wire import dumps

_BODY = dumps(BadRequest("Malformed HTTP request", code="MALFORMED_HTTP").body())


class JsonErrorsHttpToolsProtocol(HttpToolsProtocol):
    def send_400_response(self, msg: str) -> None:
        head = [b"HTTP/1.1 400 Bad Request\r\n"]
        head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: " + str(len(_BODY)).encode() + b"\r\n",
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + _BODY)
        self.transport.close()
