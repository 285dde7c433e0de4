"""One webhook attempt: an event POSTed to an endpoint, signed per Standard Webhooks, and what
came back. Nothing here touches the database; delivery.py decides what an attempt means.

The call never raises for the receiver's sake: a refused target (SSRF, checked again at each
attempt), a timeout, a connection error or a redirect (never followed) all come back as an
`Attempt` with an error or a non-2xx status, to be logged and retried like any failure.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import aiohttp
from standardwebhooks.webhooks import Webhook

from wallet import ssrf
from wallet.settings import Settings

BODY_LOG_BYTES = 1024  # of the receiver's answer, kept in the delivery log


@dataclass(frozen=True, slots=True)
class Attempt:
    attempted_at: datetime
    status: int | None  # the receiver's HTTP status; None if no answer came
    latency_ms: int
    error: str | None
    body: str | None  # the answer's first BODY_LOG_BYTES
    retry_after: float | None  # seconds a 429/503 asked to wait

    @property
    def ok(self) -> bool:
        return success(self.status)


def success(status: int | None) -> bool:
    """2xx, and only 2xx, is a delivery."""
    return status is not None and 200 <= status < 300


def new_http_client(settings: Settings) -> aiohttp.ClientSession:
    """Delivery calls connect only through `ssrf.PublicResolver` in production."""
    resolver = None if settings.webhooks_private_ok else ssrf.PublicResolver()
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=100, resolver=resolver, use_dns_cache=False),
        timeout=aiohttp.ClientTimeout(total=settings.webhook_timeout_seconds),
        raise_for_status=False,
        auto_decompress=False,
        trust_env=False,
    )


def retry_after(value: str | None) -> float | None:
    """A `Retry-After` header in seconds (delta-seconds or an HTTP date), None if unusable."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        return max((parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds(), 0.0)
    except (TypeError, ValueError):
        return None


def signature(event_id: str, at: datetime, body: str, secrets: list[str]) -> str:
    """Standard Webhooks `webhook-signature`: one `v1,<base64>` per valid secret."""
    return " ".join(Webhook(s).sign(event_id, at, body) for s in secrets)


def refused(reason: str) -> Attempt:
    """An attempt that sent nothing."""
    return Attempt(datetime.now(UTC), None, 0, reason, None, None)


async def send(
    http: aiohttp.ClientSession,
    settings: Settings,
    *,
    url: str,
    event_id: str,
    body: str,
    secrets: list[str],
) -> Attempt:
    """POST `body` (the event's JSON) to `url`, signed with every secret in `secrets`;
    `webhook-id` is the event id, so a receiver de-duplicates retries on it."""
    attempted_at = datetime.now(UTC)
    headers = {
        "content-type": "application/json",
        # Answers are logged as they come (never decompressed: no bombs), so ask for them plain.
        "accept-encoding": "identity",
        "user-agent": "wallet-webhooks/1",
        "webhook-id": event_id,
        "webhook-timestamp": str(int(attempted_at.timestamp())),
        "webhook-signature": signature(event_id, attempted_at, body, secrets),
    }
    started = time.monotonic()
    status, error, answer, wait = None, None, None, None
    try:
        await ssrf.check_url(url, allow_private=settings.webhooks_private_ok)
        async with http.post(url, data=body, headers=headers, allow_redirects=False) as resp:
            status = resp.status
            answer = loggable(await resp.content.read(BODY_LOG_BYTES))
            if status in (429, 503):
                wait = retry_after(resp.headers.get("Retry-After"))
    except ssrf.UnsafeTarget as exc:
        error = f"refused: {exc}"
    except TimeoutError:
        error = f"timed out after {settings.webhook_timeout_seconds:g} s"
    except (aiohttp.ClientError, OSError) as exc:
        error = f"{type(exc).__name__}: {exc}"[:500]
    latency = int((time.monotonic() - started) * 1000)
    if status is not None and not 100 <= status <= 599:  # not HTTP: a failed attempt, logged as one
        error, status = f"answered an invalid HTTP status {status}", None
    if error is None and not success(status):
        error = f"HTTP {status}"
    return Attempt(attempted_at, status, latency, error, answer, wait)


def loggable(raw: bytes) -> str:
    """A receiver's answer as text the delivery log can hold, whatever its bytes (compressed,
    binary, a NUL): an attempt that could not be recorded was sent again for ever."""
    return raw.decode(errors="replace").replace("\x00", "\ufffd")
