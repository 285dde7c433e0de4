"""One webhook attempt (webhook_send.py) against real receivers on loopback: signed so that the
Standard Webhooks library verifies it, and every failure an `Attempt`, never an exception."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import orjson
import pytest
from standardwebhooks.webhooks import Webhook

from tests.builders import Receiver, free_port, raw_server, start_receiver
from wallet.settings import Settings
from wallet.webhook_send import Attempt, new_http_client, retry_after, send
from wallet.webhooks import new_secret

EVENT_ID = "evt_0123456789abcdef0123456789abcdef"
BODY = orjson.dumps({"id": EVENT_ID, "type": "wallet.debited", "data": {"amount": 1}}).decode()


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": "postgresql://unused/x",
        "webhook_allow_private": True,
        "webhook_timeout_seconds": 0.5,
    }
    return Settings(**{**values, **overrides})


@contextlib.asynccontextmanager
async def sender(**overrides: Any) -> AsyncIterator[Any]:
    config = settings(**overrides)
    async with new_http_client(config) as http:

        async def attempt(url: str, secrets: list[str]) -> Attempt:
            return await send(http, config, url=url, event_id=EVENT_ID, body=BODY, secrets=secrets)

        yield attempt


async def test_an_attempt_is_signed_with_every_secret_and_verifies() -> None:
    old, new = new_secret(), new_secret()
    async with start_receiver() as receiver, sender() as attempt:
        result = await attempt(receiver.url, [new, old])
    assert result.ok
    assert (result.status, result.error, result.retry_after) == (200, None, None)
    assert result.body is not None
    assert len(result.body) == 1024  # the receiver's 2,000 bytes, truncated for the log
    got = receiver.got[0]
    assert got.headers["webhook-id"] == EVENT_ID
    assert len(got.headers["webhook-signature"].split(" ")) == 2
    for secret in (new, old):
        assert Webhook(secret).verify(got.body, got.headers)["id"] == EVENT_ID


@pytest.mark.parametrize(("status", "error"), [(302, "HTTP 302"), (410, "HTTP 410"), (500, "HTTP 500")])
async def test_a_non_2xx_answer_is_a_failure_and_redirects_are_not_followed(status: int, error: str) -> None:
    receiver = Receiver(answers=[status], answer_headers={"Location": "/elsewhere"})
    async with start_receiver(receiver), sender() as attempt:
        result = await attempt(receiver.url, [new_secret()])
    assert not result.ok
    assert (result.status, result.error) == (status, error)
    assert len(receiver.got) == 1  # the redirect's target was never asked


async def test_a_429_or_503_passes_on_its_retry_after() -> None:
    receiver = Receiver(answers=[429, 503], answer_headers={"Retry-After": "120"})
    async with start_receiver(receiver), sender() as attempt:
        first = await attempt(receiver.url, [new_secret()])
        second = await attempt(receiver.url, [new_secret()])
    assert (first.status, first.retry_after) == (429, 120.0)
    assert (second.status, second.retry_after) == (503, 120.0)


async def test_unreachable_slow_and_unsafe_targets_are_attempts_with_an_error() -> None:
    async with sender() as attempt:
        refused = await attempt(f"http://127.0.0.1:{free_port()}/hook", [new_secret()])
    assert refused.status is None
    assert refused.error is not None
    assert refused.error.startswith("Client")  # aiohttp's ClientConnectorError, named

    receiver = Receiver(gate=asyncio.Event())  # answers nothing until the gate opens
    async with start_receiver(receiver), sender() as attempt:
        slow = await attempt(receiver.url, [new_secret()])
        receiver.gate.set()  # type: ignore[union-attr]
    assert (slow.status, slow.error) == (None, "timed out after 0.5 s")

    async with start_receiver() as receiver, sender(webhook_allow_private=False) as attempt:
        unsafe = await attempt(receiver.url, [new_secret()])
    assert unsafe.error is not None
    assert unsafe.error.startswith("refused: ")
    assert receiver.got == []


def test_retry_after_reads_seconds_and_http_dates() -> None:
    assert retry_after("30") == 30.0
    assert retry_after(" 7 ") == 7.0
    later = retry_after(format_datetime(datetime.now(UTC) + timedelta(minutes=10), usegmt=True))
    assert later is not None
    assert 590 <= later <= 600
    assert retry_after(format_datetime(datetime(2000, 1, 1, tzinfo=UTC), usegmt=True)) == 0.0
    for unusable in (None, "", "soon", "-5", "1.5"):
        assert retry_after(unusable) is None


@pytest.mark.parametrize(
    ("reply", "status", "ok", "body"),
    [
        (b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nok\x00ok", 200, True, "ok\ufffdok"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\n\x1f\x8b\x08", 200, True, "\x1f\ufffd\x08"),
        (b"HTTP/1.1 799 Odd\r\ncontent-length: 2\r\n\r\nno", None, False, "no"),
    ],
    ids=["NUL", "binary", "status 799"],
)
async def test_any_answer_is_an_attempt_the_log_can_hold(
    reply: bytes, status: int | None, ok: bool, body: str
) -> None:
    """An answer whose body holds a NUL or binary (a gzip body: compression is never asked for),
    or whose status is not HTTP's, was an attempt the database refused to log: the delivery was
    then sent again for ever. Whatever comes back is an attempt with text the log can store."""
    async with raw_server(reply) as (url, receiver), sender() as attempt:
        result = await attempt(url, [new_secret()])
    assert (result.ok, result.status, result.body) == (ok, status, body)
    assert "\x00" not in (result.body or "")
    if status is None:
        assert result.error == "answered an invalid HTTP status 799"
    assert b"accept-encoding: identity" in receiver.requests[0].lower()
