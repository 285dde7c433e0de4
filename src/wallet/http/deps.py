"""What routes depend on: the services built at start, authentication of the admin and of
clients, path and header parameters, and the parsing of JSON bodies (exact decimals, no
coercion, a 400 envelope on anything wrong)."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, Generic, TypeVar

from fastapi import Depends, Header, Path, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import Response

from wallet import idempotency
from wallet.auth import CLIENT_ID_PATTERN, ClientAuthenticator, check_admin
from wallet.database import Connector
from wallet.errors import BadRequest, NotFound
from wallet.money import parse_json
from wallet.orders import ORDER_ID_PATTERN, Orders
from wallet.settings import Settings
from wallet.wallets import Wallets
from wallet.webhooks import Webhooks
from wallet.wire import JSONBytes, Reply

ORDER_ID = re.compile(ORDER_ID_PATTERN)
PathClientId = Annotated[str, Path(pattern=CLIENT_ID_PATTERN, examples=["CLIENT123"])]


def order_id_or_404(order_id: str) -> str:
    """An order id that cannot exist is a 404 before any query (as an unknown one is after)."""
    if not ORDER_ID.fullmatch(order_id):
        raise NotFound("Order not found", code="ORDER_NOT_FOUND")
    return order_id


@dataclass
class Services:
    """Everything a request needs, built once at start (see `lifespan.lifespan`)."""

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
