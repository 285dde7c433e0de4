"""HTTP routes: parse and authenticate, call the operation, send its reply. No business rules."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, Generic, TypeVar

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import Response

from wallet import idempotency, statements
from wallet.auth import CLIENT_ID_PATTERN, ClientAuthenticator, check_admin
from wallet.database import Connector
from wallet.errors import BadRequest, NotFound
from wallet.http.schemas import (
    BalanceAtEnvelope,
    BalanceEnvelope,
    MovementEnvelope,
    OrderEnvelope,
    error_responses,
)
from wallet.money import Amount, from_cents, parse_json
from wallet.orders import ORDER_ID_PATTERN, Orders, order_json
from wallet.settings import Settings
from wallet.wallets import Wallets
from wallet.webhooks import Webhooks
from wallet.wire import JSONBytes, Reply, iso, json_response, ok

ORDER_ID = re.compile(ORDER_ID_PATTERN)


@dataclass
class Services:
    """Everything a request needs, built once at start (see `app.lifespan`)."""

    settings: Settings
    admin_key_digest: bytes
    wallets: Wallets
    orders: Orders
    clients: ClientAuthenticator
    webhooks: Webhooks
    # Reads that may lag the writes (history pages, statements, admin reads): the replica when
    # there is one (README: which reads go where). `reads` for single statements, `snapshots` for
    # reads that must agree with each other (a statement).
    reads: Connector
    snapshots: Connector


async def services(request: Request) -> Services:
    """Async on purpose: FastAPI runs a plain `def` dependency in a thread pool."""
    svc: Services = request.app.state.services
    return svc


Svc = Annotated[Services, Depends(services)]


class RequestBody(BaseModel):
    """What every JSON request body is: an unknown field is refused, and no value is coerced
    (a string is not a number). Parsed by `json_body`."""

    model_config = ConfigDict(extra="forbid", strict=True)


ClientIdField = Annotated[str, Field(pattern=CLIENT_ID_PATTERN, examples=["CLIENT123"])]
Text = Annotated[str, Field(max_length=500, pattern=r"^[^\x00]*$")]


class CreditRequest(RequestBody):
    client_id: ClientIdField
    amount: Amount
    name: Annotated[str, Field(max_length=200, pattern=r"^[^\x00]*$")] | None = None
    email: Annotated[str, Field(max_length=320, pattern=r"^[^\x00]*$")] | None = None
    description: Text | None = None


class DebitRequest(RequestBody):
    client_id: ClientIdField
    amount: Amount
    description: Text | None = None


class OrderRequest(RequestBody):
    amount: Amount


M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class Parsed(Generic[M]):
    """A validated request body. Only the model: what a request means (its idempotency
    fingerprint included) is read from it, never from the JSON as it was spelled."""

    model: M


def json_body(model: type[M]) -> Callable[[Request], Awaitable[Parsed[M]]]:
    """Parse the body ourselves: exact decimals, no duplicate keys, 400 on anything wrong."""

    async def parse(request: Request) -> Parsed[M]:
        raw = parse_json(await request.body())
        if not isinstance(raw, dict):
            raise BadRequest("Request body must be a JSON object")
        try:
            return Parsed(model.model_validate(raw))
        except ValidationError as exc:
            details = [
                {"field": ".".join(str(p) for p in err["loc"]) or "body", "message": err["msg"]}
                for err in exc.errors(include_url=False, include_input=False)
            ]
            first = details[0]
            raise BadRequest(f"{first['field']}: {first['message']}", details=details) from None

    return parse


def body_doc(model: type[BaseModel]) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": model.model_json_schema()}},
        }
    }


IdemHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        description="Makes a retried request safe: same key and body, same answer, money moved once.",
        max_length=255,
    ),
]


def reply(result: Reply) -> Response:
    headers = dict(result.headers)
    if result.replayed:
        headers[idempotency.REPLAYED_HEADER] = "true"
    return JSONBytes(result.body, status_code=result.status, headers=headers)


# Declared as security schemes so the OpenAPI document says which key each route wants; a
# missing header, another scheme or an empty token all arrive here as None (-> 401).
ADMIN_BEARER = HTTPBearer(auto_error=False, scheme_name="AdminKey", description="`ADMIN_API_KEY`")
CLIENT_BEARER = HTTPBearer(
    auto_error=False,
    scheme_name="ClientKey",
    description="A key from `POST /admin/clients/{client_id}/api-keys`, sent with the `client-id` it "
    "belongs to. Required when CLIENT_AUTH=api_key (the production default).",
)
Bearer = HTTPAuthorizationCredentials | None


def _token(credentials: Bearer) -> str | None:
    return credentials.credentials.strip() if credentials is not None else None


async def require_admin(svc: Svc, credentials: Annotated[Bearer, Security(ADMIN_BEARER)]) -> None:
    check_admin(_token(credentials), svc.admin_key_digest)


async def require_client(
    svc: Svc,
    credentials: Annotated[Bearer, Security(CLIENT_BEARER)],
    client_id: Annotated[
        str | None,
        Header(alias="client-id", description="The calling client's id", examples=["CLIENT123"]),
    ] = None,
) -> str:
    return await svc.clients.authenticate(client_id, _token(credentials))


Admin = Depends(require_admin)
ClientId = Annotated[str, Depends(require_client)]

router = APIRouter()


@router.post(
    "/admin/wallet/credit",
    tags=["admin"],
    dependencies=[Admin],
    openapi_extra=body_doc(CreditRequest),
    responses={
        200: {"model": MovementEnvelope},
        **error_responses(400, 401, 403, 409, 413, 422, 429),
    },
)
async def credit_wallet(
    svc: Svc,
    body: Annotated[Parsed[CreditRequest], Depends(json_body(CreditRequest))],
    idempotency_key: IdemHeader = None,
) -> Response:
    req = body.model
    result = await svc.wallets.credit(
        req.client_id,
        req.amount,
        idem=idempotency.key_for(idempotency.ADMIN_SCOPE, idempotency_key, "credit", req),
        description=req.description,
        name=req.name,
        email=req.email,
    )
    return reply(result)


@router.post(
    "/admin/wallet/debit",
    tags=["admin"],
    dependencies=[Admin],
    openapi_extra=body_doc(DebitRequest),
    responses={
        200: {"model": MovementEnvelope},
        **error_responses(400, 401, 403, 404, 409, 413, 422, 429),
    },
)
async def debit_wallet(
    svc: Svc,
    body: Annotated[Parsed[DebitRequest], Depends(json_body(DebitRequest))],
    idempotency_key: IdemHeader = None,
) -> Response:
    req = body.model
    result = await svc.wallets.debit(
        req.client_id,
        req.amount,
        idem=idempotency.key_for(idempotency.ADMIN_SCOPE, idempotency_key, "debit", req),
        description=req.description,
    )
    return reply(result)


@router.post(
    "/orders",
    tags=["client"],
    status_code=201,
    openapi_extra=body_doc(OrderRequest),
    responses={
        201: {"model": OrderEnvelope, "description": "Fulfilled: the order is COMPLETED"},
        202: {
            "model": OrderEnvelope,
            "description": "Accepted, outcome not known yet: the order is PENDING and its money held until "
            "the provider's answer is known (GET the `Location` to learn it; a replay with the same "
            "Idempotency-Key answers with the order's current state)",
            "headers": {"Location": {"description": "`/orders/{orderId}`", "schema": {"type": "string"}}},
        },
        **error_responses(400, 401, 403, 404, 409, 413, 422, 429, 502, 503),
    },
)
async def create_order(
    request: Request,
    svc: Svc,
    client_id: ClientId,
    body: Annotated[Parsed[OrderRequest], Depends(json_body(OrderRequest))],
    idempotency_key: IdemHeader = None,
) -> Response:
    from wallet.observability import REQUEST_ID

    result = await svc.orders.place(
        client_id,
        body.model.amount,
        idempotency.key_for(idempotency.client_scope(client_id), idempotency_key, "order", body.model),
        REQUEST_ID.get(),
    )
    return reply(result)


@router.get(
    "/orders/{order_id}",
    tags=["client"],
    responses={200: {"model": OrderEnvelope}, **error_responses(400, 401, 403, 404, 429)},
)
async def get_order(
    svc: Svc,
    client_id: ClientId,
    order_id: Annotated[str, Path(examples=["ORD-1703251234567-a1b2c3d4"])],
) -> Response:
    if not ORDER_ID.fullmatch(order_id):
        raise NotFound("Order not found", code="ORDER_NOT_FOUND")
    order = await svc.orders.get(client_id, order_id)
    return json_response(200, ok(order_json(order, updated=True)))


@router.get(
    "/wallet/balance",
    tags=["client"],
    responses={
        200: {
            "model": BalanceEnvelope | BalanceAtEnvelope,
            "description": "The balance now, or with `at` the balance at that moment",
        },
        **error_responses(400, 401, 403, 404, 429),
    },
)
async def get_balance(
    svc: Svc,
    client_id: ClientId,
    at: Annotated[
        statements.TimeText | None,
        Query(
            max_length=64,
            description="ISO 8601 time with a zone: the balance after every entry written before it "
            "(0 before the first; a future time gives the balance now)",
        ),
    ] = None,
) -> Response:
    moment = statements.parse_time(at, "at")
    if moment is not None:
        cents = await statements.balance_at(svc.reads, svc.wallets.single, client_id, moment)
        data_at = {"clientId": client_id, "balance": from_cents(cents), "at": iso(moment)}
        return json_response(200, ok(data_at))
    balance = await svc.wallets.balance(client_id)
    data = {
        "clientId": balance.client_id,
        "balance": from_cents(balance.balance),
        "held": from_cents(balance.held),
        "lastUpdated": iso(balance.updated_at),
    }
    return json_response(200, ok(data))
