"""The JSON wire format: success envelopes, timestamps, and the one encoder responses use."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from starlette.responses import Response


@dataclass(frozen=True, slots=True)
class Reply:
    """An answer an Idempotency-Key kept as bytes, before migration 0013, replayed as it was
    (records since keep the domain value; this can go once no record from before 0013 is left:
    they expire after IDEMPOTENCY_TTL_HOURS)."""

    status: int
    body: bytes


def iso(moment: datetime) -> str:
    """ISO 8601 in UTC with milliseconds and a `Z`, as the original service wrote them."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def dumps(body: Any) -> bytes:
    return orjson.dumps(body)


def ok(data: Any, message: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"success": True}
    if message is not None:
        body["message"] = message
    body["data"] = data
    return body


class JSONBytes(Response):
    """A response whose body is already-encoded JSON (stored idempotent replies, envelopes)."""

    media_type = "application/json"


def json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    return JSONBytes(dumps(body), status_code=status, headers=headers)
