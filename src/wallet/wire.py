"""The JSON wire format: success envelopes, timestamps (shown and read), and the one encoder
responses use."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

import orjson
from pydantic import WithJsonSchema
from starlette.responses import Response

from wallet.errors import BadRequest


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


TIME_DOC = "ISO 8601 time with a zone, e.g. 2026-01-31T00:00:00Z, read to the millisecond"
# Documented as RFC 3339 date-times; read by `parse_time`, which has an error code of its own.
TimeText = Annotated[str, WithJsonSchema({"type": "string", "format": "date-time", "maxLength": 64})]


def parse_time(value: str | None, name: str) -> datetime | None:
    """A time the API is given (a statement's period, a past balance, events after, a replay
    since): ISO 8601 with its zone, since one without would mean different moments to different
    readers; in UTC; None when absent. Read to the millisecond, the precision of every time the
    API shows (`iso`): a time copied from an answer then selects exactly the entries and events
    shown at or after it, never one that displays the same yet sorts before it."""
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value.upper())  # RFC 3339 allows a lowercase t and z
    except ValueError:
        moment = None
    if moment is None or moment.utcoffset() is None:
        raise BadRequest(
            f"{name}: must be an ISO 8601 time with a zone, e.g. 2026-01-31T00:00:00Z", code="INVALID_TIME"
        )
    try:
        moment = moment.astimezone(UTC)
    except OverflowError:  # year 1 east of Greenwich, or 9999 west of it
        raise BadRequest(f"{name}: must be within the years 1 to 9999 in UTC", code="INVALID_TIME") from None
    return moment.replace(microsecond=moment.microsecond - moment.microsecond % 1000)


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
