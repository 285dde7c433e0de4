"""`wallet webhooks listen`: a webhook receiver for developers. It verifies each delivery with the
endpoint's secret (the `standardwebhooks` library, as any receiver should), prints the event as
one JSON line, and answers 204; a bad or stale signature gets 400 and a line on stderr."""

from __future__ import annotations

import sys
from typing import Any

import orjson
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from starlette.types import Receive, Scope, Send


async def read_delivery(scope: Scope, receive: Receive) -> tuple[dict[str, str], bytes]:
    """A delivery as it arrived, before anything is judged: its headers (names lower-case, as ASGI
    gives them) and its whole body, read to the end. Signatures are checked over exactly these."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}, body


class Listener:
    def __init__(self, secret: str) -> None:
        self.webhook = Webhook(secret)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        headers, body = await read_delivery(scope, receive)
        try:
            event: Any = self.webhook.verify(body, headers)
            status = 204
        except (WebhookVerificationError, ValueError) as exc:
            print(f"wallet webhooks listen: refused a delivery: {exc}", file=sys.stderr, flush=True)
            status = 400
        else:
            print(orjson.dumps(event).decode(), flush=True)
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})
