"""The service's own ASGI middleware: the request body bound and the last-resort 500.

(Rate limiting is `wallet.ratelimit.RateLimit`, the request id and access log
`wallet.observability.RequestContext`; `app.create_app` stacks all four.)"""

from __future__ import annotations

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from wallet.errors import PayloadTooLarge
from wallet.http.errors import internal_error_response
from wallet.wire import json_response


class BodyLimit:
    """413 before reading more than MAX_BODY_BYTES, whether or not Content-Length is honest."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            too_large = PayloadTooLarge(f"Request body exceeds {self.max_bytes} bytes")
            await json_response(413, too_large.body())(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise PayloadTooLarge(f"Request body exceeds {self.max_bytes} bytes")
            return message

        await self.app(scope, counted, send)


class CatchAll:
    """An unhandled error becomes the 500 envelope here, inside RequestContext, so its response
    and its log line carry the request id: Starlette's last-resort handler runs outside every
    middleware, after the request's context is gone."""

    def __init__(self, app: ASGIApp, production: bool) -> None:
        self.app = app
        self.production = production

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except ClientDisconnect:
            raise  # nobody is left to answer; RequestContext counts it as a 499
        except Exception as exc:
            if started:
                raise
            await internal_error_response(exc, self.production)(scope, receive, send)
