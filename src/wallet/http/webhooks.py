"""HTTP routes for events and webhooks: the event feed, endpoints (a client's own at
/webhook-endpoints, any client's and global ones at /admin/webhook-endpoints), their delivery
log and replay, and the per-client low-balance threshold that balance.low events follow."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import Field, RootModel
from sqlalchemy import text
from starlette.responses import Response

from wallet import events
from wallet.errors import ClientNotFound, NotFound
from wallet.events import EVENT_ID_PATTERN, EventType
from wallet.http.deps import ClientIdField, ClientPath, Params, RequestBody, Text
from wallet.http.pages import Page, decode_cursor, page_response, require_wallet
from wallet.http.routing import Auth, Call, Routes
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
from wallet.wire import TIME_DOC, json_response, ok, parse_time

_ENDPOINT_ID = re.compile(ENDPOINT_ID_PATTERN)


class EventFilter(Page):
    type: EventType | None = None
    after: str | None = Field(
        None,
        max_length=40,
        description=f"Only events created after this time. {TIME_DOC}",
        json_schema_extra={"format": "date-time"},
    )


class AnyEventFilter(EventFilter):
    client_id: ClientIdField | None = Field(None, alias="clientId")


class EndpointPath(Params):
    endpoint_id: str = Field(max_length=64, examples=["we_0123456789abcdef01234567"])


class EndpointPage(EndpointPath, Page):
    pass


class EndpointFilter(Page):
    client_id: ClientIdField | None = Field(None, alias="clientId")


# What the document can say of a webhook URL: http(s), a host (a name, or an IPv6 address in
# brackets), no credentials, an optional numeric port, then anything printable. Whether the host
# may be called (public, resolving) only the service can tell: INVALID_WEBHOOK_URL.
WEBHOOK_URL = (
    r"^https?://(?:[^\x00-\x20/?#@\[\]:]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?"
    r"(?:[/?#][^\x00-\x20]*)?$"
)


class EndpointRequest(RequestBody):
    url: Annotated[str, Field(min_length=1, max_length=2048, pattern=WEBHOOK_URL)]
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
        str, Field(max_length=40, description=TIME_DOC, json_schema_extra={"format": "date-time"})
    ]


class ReplayRequest(RootModel[ReplayEvent | ReplaySince]):
    pass


class ThresholdRequest(RequestBody):
    amount: Amount | None = Field(description="null removes the threshold")


def _endpoint_id(endpoint_id: str) -> str:
    if not _ENDPOINT_ID.fullmatch(endpoint_id):
        raise NotFound("Webhook endpoint not found", code="WEBHOOK_ENDPOINT_NOT_FOUND")
    return endpoint_id


_ENDPOINT_ERRORS = error_responses(400, 401, 403, 404, 429)
_BODY_ERRORS = error_responses(400, 401, 403, 404, 413, 429)
client_routes = Routes(tags=["client"], auth=Auth.CLIENT)
admin_routes = Routes(tags=["admin"], auth=Auth.ADMIN)


def _owner(call: Call) -> str | None:
    """Whose endpoints a call may see and change: a client its own; the admin (None) any."""
    return call.client_id or None


async def _events(call: Call, client_id: str | None, params: EventFilter, *, own: bool = False) -> Response:
    """A page of events, newest first: the client's list (`own`: 404 for a client with no
    wallet, as its other lists) and the admin's alike."""
    before_key, since = decode_cursor(params.cursor), parse_time(params.after, "after")
    async with call.svc.wallets.single.connect() as conn:
        items, next_key = await events.page(
            conn,
            limit=params.limit,
            before_key=before_key,
            client_id=client_id,
            type_=params.type,
            after=since,
        )
        if own and not items and client_id is not None:
            await require_wallet(conn, client_id)
    return page_response(items, next_key)


@client_routes.get("/events", responses={200: {"model": EventPage}, **_ENDPOINT_ERRORS})
async def own_events(call: Call, params: EventFilter) -> Response:
    """The caller's events, newest first."""
    return await _events(call, call.client_id, params, own=True)


@admin_routes.get("/admin/events", responses={200: {"model": EventPage}, **_ENDPOINT_ERRORS})
async def all_events(call: Call, params: AnyEventFilter) -> Response:
    return await _events(call, params.client_id, params)


async def _create(call: Call, client_id: str | None, req: EndpointRequest) -> Response:
    data = await call.svc.webhooks.create(
        client_id, req.url, list(req.eventTypes or []) or None, req.description
    )
    return json_response(201, ok(data, "Webhook endpoint created"))


_CREATED = {201: {"model": WebhookEndpointEnvelope}, **_BODY_ERRORS}


@client_routes.post("/webhook-endpoints", responses=_CREATED)
async def create_endpoint(call: Call, body: EndpointRequest) -> Response:
    """The `whsec_…` secret is in this answer only."""
    return await _create(call, call.client_id, body)


@admin_routes.post("/admin/webhook-endpoints", responses=_CREATED)
async def create_any_endpoint(call: Call, body: AdminEndpointRequest) -> Response:
    """The `whsec_…` secret is in this answer only. Without `clientId`, a global endpoint."""
    return await _create(call, body.clientId, body)


async def list_endpoints(call: Call, params: EndpointFilter) -> Response:
    """Newest first. Clients see their own; the admin every one, or one client's with `clientId`."""
    owner = _owner(call) or params.client_id
    return page_response(*await call.svc.webhooks.page(owner, params.limit, decode_cursor(params.cursor)))


async def get_endpoint(call: Call, params: EndpointPath) -> Response:
    return json_response(200, ok(await call.svc.webhooks.get(_endpoint_id(params.endpoint_id), _owner(call))))


async def delete_endpoint(call: Call, params: EndpointPath) -> Response:
    """Removes the endpoint with its pending deliveries and its delivery log."""
    await call.svc.webhooks.delete(_endpoint_id(params.endpoint_id), _owner(call))
    return json_response(200, ok({"id": params.endpoint_id, "deleted": True}, "Webhook endpoint deleted"))


async def patch_endpoint(call: Call, params: EndpointPath, body: EndpointPatch) -> Response:
    """Enable or disable; enabling again forgets past failures."""
    data = await call.svc.webhooks.set_enabled(_endpoint_id(params.endpoint_id), _owner(call), body.enabled)
    return json_response(200, ok(data, "Webhook endpoint updated"))


async def rotate_secret(call: Call, params: EndpointPath) -> Response:
    """A new secret (in this answer only); the old one keeps signing beside it for 24 hours."""
    data = await call.svc.webhooks.rotate(_endpoint_id(params.endpoint_id), _owner(call))
    return json_response(200, ok(data, "Webhook secret rotated"))


async def delivery_log(call: Call, params: EndpointPage) -> Response:
    """Every delivery attempt, newest first."""
    endpoint_id, key = _endpoint_id(params.endpoint_id), decode_cursor(params.cursor)
    return page_response(*await call.svc.webhooks.attempts(endpoint_id, _owner(call), params.limit, key))


async def replay(call: Call, params: EndpointPath, body: ReplayRequest) -> Response:
    """Deliver one event again (`eventId`), or every event whose delivery failed since a time."""
    req = body.root
    event_id = req.eventId if isinstance(req, ReplayEvent) else None
    since = parse_time(req.since, "since") if isinstance(req, ReplaySince) else None
    count = await call.svc.webhooks.replay(
        _endpoint_id(params.endpoint_id), _owner(call), event_id=event_id, since=since
    )
    return json_response(200, ok({"replayed": count}, "Deliveries scheduled"))


# The same operations for a client (on its own endpoints) and for the admin (on any).
for _routes, _prefix in ((client_routes, "/webhook-endpoints"), (admin_routes, "/admin/webhook-endpoints")):
    _one = _prefix + "/{endpoint_id}"
    _routes.get(_prefix, responses={200: {"model": WebhookEndpointList}, **_ENDPOINT_ERRORS})(list_endpoints)
    _routes.get(_one, responses={200: {"model": WebhookEndpointEnvelope}, **_ENDPOINT_ERRORS})(get_endpoint)
    _routes.delete(_one, responses={200: {"model": DeletedEnvelope}, **_ENDPOINT_ERRORS})(delete_endpoint)
    _routes.patch(_one, responses={200: {"model": WebhookEndpointEnvelope}, **_BODY_ERRORS})(patch_endpoint)
    _routes.post(
        _one + "/rotate-secret", responses={200: {"model": WebhookEndpointEnvelope}, **_ENDPOINT_ERRORS}
    )(rotate_secret)
    _routes.get(_one + "/deliveries", responses={200: {"model": AttemptPage}, **_ENDPOINT_ERRORS})(
        delivery_log
    )
    _routes.post(
        _one + "/replay",
        responses={200: {"model": ReplayEnvelope}, **error_responses(400, 401, 403, 404, 409, 413, 429)},
    )(replay)


_SET_THRESHOLD = text("""
UPDATE clients SET low_balance_threshold = :amount, updated_at = now()
WHERE client_id = :client_id RETURNING low_balance_threshold
""")


@admin_routes.put(
    "/admin/clients/{client_id}/low-balance-threshold",
    responses={200: {"model": ThresholdEnvelope}, **_BODY_ERRORS},
)
async def set_low_balance_threshold(call: Call, params: ClientPath, body: ThresholdRequest) -> Response:
    """balance.low is sent when a debit or an order takes the balance from at least this amount to
    below it; null removes it."""
    client_id = params.client_id
    async with call.svc.wallets.single.connect() as conn:
        found = (await conn.execute(_SET_THRESHOLD, {"client_id": client_id, "amount": body.amount})).first()
    if found is None:
        raise ClientNotFound(f"Client {client_id} not found")
    amount = found.low_balance_threshold
    data = {"clientId": client_id, "lowBalanceThreshold": None if amount is None else from_cents(amount)}
    return json_response(200, ok(data, "Low-balance threshold set"))
