"""`wallet webhooks listen`: a webhook receiver for developers. It verifies each delivery with the
endpoint's secret (the `standardwebhooks` library, as any receiver should), prints the event as
one JSON line, and answers 204; a bad or stale signature gets 400 and a line on stderr."""

from __future__ import annotations

import sys
from typing import Any

import orjson
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from starlette.types import Receive, Scope, Send


class Listener:
    def __init__(self, secret: str) -> None:
        self.webhook = Webhook(secret)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
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
