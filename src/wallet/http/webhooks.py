"""HTTP routes for events and webhooks: the event feed, endpoints (a client's own at
/webhook-endpoints, any client's and global ones at /admin/webhook-endpoints), their delivery
log and replay, and the per-client low-balance threshold that balance.low events follow.

No `from __future__ import annotations` here: the endpoint routes are built in a function for
both callers, and FastAPI must see their local annotations evaluated."""

import re
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query
from pydantic import Field, RootModel
from sqlalchemy import text
from starlette.responses import Response

from wallet import events
from wallet.errors import BadRequest, NotFound
from wallet.events import EVENT_ID_PATTERN, EventType
from wallet.http.deps import (
    Admin,
    ClientId,
    ClientIdField,
    Parsed,
    PathClientId,
    RequestBody,
    Svc,
    Text,
    body_doc,
    json_body,
)
from wallet.http.pages import Cursor, Limit, decode_cursor, page_response
from wallet.http.schemas import (
    AttemptPage,
    DeletedEnvelope,
    EventPage,
    ReplayEnvelope,
    ThresholdEnvelope,
    WebhookEndpointEnvelope,
    WebhookEndpointList,
    error_responses,
)
from wallet.money import Amount, from_cents
from wallet.webhooks import ENDPOINT_ID_PATTERN
from wallet.wire import json_response, ok

_ENDPOINT_ID = re.compile(ENDPOINT_ID_PATTERN)
PathEndpointId = Annotated[str, Path(max_length=64, examples=["we_0123456789abcdef01234567"])]
After = Annotated[
    str | None,
    Query(
        max_length=40,
        description="Only events created after this time (ISO 8601)",
        json_schema_extra={"format": "date-time"},
    ),
]
TypeFilter = Annotated[EventType | None, Query(alias="type")]


class EndpointRequest(RequestBody):
    url: Annotated[str, Field(min_length=1, max_length=2048, pattern=r"^https?://[^\x00-\x20]+$")]
    eventTypes: Annotated[list[EventType], Field(min_length=1, max_length=20)] | None = None
    description: Text | None = None


class AdminEndpointRequest(EndpointRequest):
    clientId: ClientIdField | None = Field(None, description="Omit for a global endpoint (every client)")


class EndpointPatch(RequestBody):
    enabled: bool


class ReplayEvent(RequestBody):
    """Deliver this one event again."""

    eventId: Annotated[str, Field(pattern=EVENT_ID_PATTERN)]


class ReplaySince(RequestBody):
    """Deliver again every event whose delivery failed since this time."""

    since: Annotated[
        str, Field(max_length=40, description="ISO 8601 time", json_schema_extra={"format": "date-time"})
    ]


class ReplayRequest(RootModel[ReplayEvent | ReplaySince]):
    pass


class ThresholdRequest(RequestBody):
    amount: Amount | None = Field(description="null removes the threshold")


def _endpoint_id(endpoint_id: str) -> str:
    if not _ENDPOINT_ID.fullmatch(endpoint_id):
        raise NotFound("Webhook endpoint not found", code="WEBHOOK_ENDPOINT_NOT_FOUND")
    return endpoint_id


def _time(raw: str | None, name: str) -> datetime | None:
    """RFC 3339 as the document says (`t`/`z` in either case; a leap second read as :59); a
    time without an offset is UTC."""
    if raw is None:
        return None
    try:
        moment = datetime.fromisoformat(raw.upper().replace(":60", ":59"))
    except ValueError:  # e.g. year 0000: RFC 3339 allows it, Python cannot hold it
        raise BadRequest(f"{name}: must be an ISO 8601 time", code="INVALID_TIME") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(UTC)
    except OverflowError:  # within a day of year 1 or 9999: the nearest representable instant
        return datetime.min.replace(tzinfo=UTC) if moment.year == 1 else datetime.max.replace(tzinfo=UTC)


router = APIRouter()
_ENDPOINT_ERRORS = error_responses(400, 401, 403, 404, 429)
_BODY_ERRORS = error_responses(400, 401, 403, 404, 413, 429)


async def _events(
    svc: Svc,
    client_id: str | None,
    type_: EventType | None,
    after: str | None,
    limit: int,
    cursor: str | None,
) -> Response:
    """A page of events, newest first: the client's list and the admin's alike."""
    before_key, since = decode_cursor(cursor), _time(after, "after")
    async with svc.wallets.single.connect() as conn:
        items, next_key = await events.page(
            conn, limit=limit, before_key=before_key, client_id=client_id, type_=type_, after=since
        )
    return page_response(items, next_key)


@router.get("/events", tags=["client"], responses={200: {"model": EventPage}, **_ENDPOINT_ERRORS})
async def own_events(
    svc: Svc,
    client_id: ClientId,
    type: TypeFilter = None,
    after: After = None,
    limit: Limit = 20,
    cursor: Cursor = None,
) -> Response:
    """The caller's events, newest first."""
    return await _events(svc, client_id, type, after, limit, cursor)


@router.get(
    "/admin/events",
    tags=["admin"],
    dependencies=[Admin],
    responses={200: {"model": EventPage}, **_ENDPOINT_ERRORS},
)
async def all_events(
    svc: Svc,
    client_id: Annotated[ClientIdField | None, Query(alias="clientId")] = None,
    type: TypeFilter = None,
    after: After = None,
    limit: Limit = 20,
    cursor: Cursor = None,
) -> Response:
    return await _events(svc, client_id, type, after, limit, cursor)


def _endpoint_routes(prefix: str, tag: str, *, admin: bool) -> APIRouter:
    """The same operations for a client (owner: the caller) and for the admin (owner: None)."""
    sub = APIRouter(tags=[tag], dependencies=[Admin] if admin else [])

    Owner = Annotated[str | None, Depends(_caller(admin))]
    create_model = AdminEndpointRequest if admin else EndpointRequest

    @sub.post(
        prefix,
        status_code=201,
        openapi_extra=body_doc(create_model),
        responses={201: {"model": WebhookEndpointEnvelope}, **_BODY_ERRORS},
    )
    async def create_endpoint(
        svc: Svc, who: Owner, body: Annotated[Parsed[EndpointRequest], Depends(json_body(create_model))]
    ) -> Response:
        """The `whsec_…` secret is in this answer only."""
        req = body.model
        client = req.clientId if isinstance(req, AdminEndpointRequest) else who
        data = await svc.webhooks.create(client, req.url, list(req.eventTypes or []) or None, req.description)
        return json_response(201, ok(data, "Webhook endpoint created"))

    @sub.get(prefix, responses={200: {"model": WebhookEndpointList}, **_ENDPOINT_ERRORS})
    async def list_endpoints(
        svc: Svc,
        who: Owner,
        client_id: Annotated[ClientIdField | None, Query(alias="clientId")] = None,
        limit: Limit = 20,
        cursor: Cursor = None,
    ) -> Response:
        """Newest first. Clients see their own; the admin every one, or one client's with `clientId`."""
        owner = who if who is not None else client_id
        return page_response(*await svc.webhooks.page(owner, limit, decode_cursor(cursor)))

    @sub.get(
        prefix + "/{endpoint_id}", responses={200: {"model": WebhookEndpointEnvelope}, **_ENDPOINT_ERRORS}
    )
    async def get_endpoint(svc: Svc, who: Owner, endpoint_id: PathEndpointId) -> Response:
        return json_response(200, ok(await svc.webhooks.get(_endpoint_id(endpoint_id), who)))

    @sub.delete(prefix + "/{endpoint_id}", responses={200: {"model": DeletedEnvelope}, **_ENDPOINT_ERRORS})
    async def delete_endpoint(svc: Svc, who: Owner, endpoint_id: PathEndpointId) -> Response:
        """Removes the endpoint with its pending deliveries and its delivery log."""
        await svc.webhooks.delete(_endpoint_id(endpoint_id), who)
        return json_response(200, ok({"id": endpoint_id, "deleted": True}, "Webhook endpoint deleted"))

    @sub.patch(
        prefix + "/{endpoint_id}",
        openapi_extra=body_doc(EndpointPatch),
        responses={200: {"model": WebhookEndpointEnvelope}, **_BODY_ERRORS},
    )
    async def patch_endpoint(
        svc: Svc,
        who: Owner,
        endpoint_id: PathEndpointId,
        body: Annotated[Parsed[EndpointPatch], Depends(json_body(EndpointPatch))],
    ) -> Response:
        """Enable or disable; enabling again forgets past failures."""
        data = await svc.webhooks.set_enabled(_endpoint_id(endpoint_id), who, body.model.enabled)
        return json_response(200, ok(data, "Webhook endpoint updated"))

    @sub.post(
        prefix + "/{endpoint_id}/rotate-secret",
        responses={200: {"model": WebhookEndpointEnvelope}, **_ENDPOINT_ERRORS},
    )
    async def rotate_secret(svc: Svc, who: Owner, endpoint_id: PathEndpointId) -> Response:
        """A new secret (in this answer only); the old one keeps signing beside it for 24 hours."""
        data = await svc.webhooks.rotate(_endpoint_id(endpoint_id), who)
        return json_response(200, ok(data, "Webhook secret rotated"))

    @sub.get(
        prefix + "/{endpoint_id}/deliveries", responses={200: {"model": AttemptPage}, **_ENDPOINT_ERRORS}
    )
    async def delivery_log(
        svc: Svc, who: Owner, endpoint_id: PathEndpointId, limit: Limit = 20, cursor: Cursor = None
    ) -> Response:
        """Every delivery attempt, newest first."""
        return page_response(
            *await svc.webhooks.attempts(_endpoint_id(endpoint_id), who, limit, decode_cursor(cursor))
        )

    @sub.post(
        prefix + "/{endpoint_id}/replay",
        openapi_extra=body_doc(ReplayRequest),
        responses={200: {"model": ReplayEnvelope}, **error_responses(400, 401, 403, 404, 409, 413, 429)},
    )
    async def replay(
        svc: Svc,
        who: Owner,
        endpoint_id: PathEndpointId,
        body: Annotated[Parsed[ReplayRequest], Depends(json_body(ReplayRequest))],
    ) -> Response:
        """Deliver one event again (`eventId`), or every event whose delivery failed since a time."""
        req = body.model.root
        event_id = req.eventId if isinstance(req, ReplayEvent) else None
        since = _time(req.since, "since") if isinstance(req, ReplaySince) else None
        count = await svc.webhooks.replay(_endpoint_id(endpoint_id), who, event_id=event_id, since=since)
        return json_response(200, ok({"replayed": count}, "Deliveries scheduled"))

    return sub


def _caller(admin: bool) -> Any:
    async def admin_scope() -> str | None:
        return None

    async def client_scope(client_id: ClientId) -> str | None:
        return client_id

    return admin_scope if admin else client_scope


router.include_router(_endpoint_routes("/webhook-endpoints", "client", admin=False))
router.include_router(_endpoint_routes("/admin/webhook-endpoints", "admin", admin=True))


_SET_THRESHOLD = text("""
UPDATE clients SET low_balance_threshold = :amount, updated_at = now()
WHERE client_id = :client_id RETURNING low_balance_threshold
""")


@router.put(
    "/admin/clients/{client_id}/low-balance-threshold",
    tags=["admin"],
    dependencies=[Admin],
    openapi_extra=body_doc(ThresholdRequest),
    responses={200: {"model": ThresholdEnvelope}, **_BODY_ERRORS},
)
async def set_low_balance_threshold(
    svc: Svc,
    client_id: PathClientId,
    body: Annotated[Parsed[ThresholdRequest], Depends(json_body(ThresholdRequest))],
) -> Response:
    """balance.low is sent when a debit or an order takes the balance from at least this amount to
    below it; null removes it."""
    async with svc.wallets.single.connect() as conn:
        found = (
            await conn.execute(_SET_THRESHOLD, {"client_id": client_id, "amount": body.model.amount})
        ).first()
    if found is None:
        raise NotFound(f"Client {client_id} not found", code="CLIENT_NOT_FOUND")
    amount = found.low_balance_threshold
    data = {"clientId": client_id, "lowBalanceThreshold": None if amount is None else from_cents(amount)}
    return json_response(200, ok(data, "Low-balance threshold set"))
