"""What handlers share: the services built at start, the rules of request bodies (exact decimals,
no coercion, a 400 envelope on anything wrong) and the fields several of them use."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from wallet import idempotency
from wallet.auth import CLIENT_ID_PATTERN, ClientAuthenticator
from wallet.database import Connector, ReadRouter
from wallet.errors import BadRequest, ClientNotFound, NotFound
from wallet.money import parse_json
from wallet.orders import ORDER_ID_PATTERN, Orders
from wallet.settings import Settings
from wallet.wallets import Wallets
from wallet.webhooks import Webhooks
from wallet.wire import JSONBytes, Reply

ORDER_ID = re.compile(ORDER_ID_PATTERN)
R = TypeVar("R")


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


async def read_lagging(reads: Connector, read: Callable[[Connector], Awaitable[R]]) -> R:
    """`read(reads)`, about one client, where a replica may lag: a client it does not know yet
    (created after the WAL it has replayed) is asked of the primary, so a lagging replica may show
    an older page but never says that a client who exists does not. Costs a second query only
    when the client is unknown to the replica."""
    try:
        return await read(reads)
    except ClientNotFound:
        if not isinstance(reads, ReadRouter):
            raise
        return await read(reads.primary)


class RequestBody(BaseModel):
    """What every JSON request body is: an unknown field is refused, and no value is coerced
    (a string is not a number). Parsed by `parse_body`."""

    model_config = ConfigDict(extra="forbid", strict=True)


class Params(BaseModel):
    """Path and query parameters: given as text, so validated in pydantic's lax mode (`"20"` is 20,
    `"true"` is True); unknown query parameters are ignored."""

    model_config = ConfigDict(extra="ignore")


ClientIdField = Annotated[str, Field(pattern=CLIENT_ID_PATTERN, examples=["CLIENT123"])]
Text = Annotated[str, Field(max_length=500, pattern=r"^[^\x00]*$")]


class ClientPath(Params):
    client_id: ClientIdField


class OrderPath(Params):
    """Any text: an id that cannot exist is a 404, as an unknown one is (`order_id_or_404`)."""

    order_id: Annotated[str, Field(examples=["ORD-1703251234567-a1b2c3d4"])]


M = TypeVar("M", bound=BaseModel)


async def parse_body(request: Request, model: type[M]) -> M:
    """Parse the body ourselves: exact decimals, no duplicate keys, 400 on anything wrong. Only
    the model is kept: what a request means (its idempotency fingerprint included) is read from
    it, never from the JSON as it was spelled."""
    raw = parse_json(await request.body())
    if not isinstance(raw, dict):
        raise BadRequest("Request body must be a JSON object")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise invalid(exc) from None


def invalid(exc: ValidationError, where: Callable[[Any], tuple[str, ...]] = lambda _: ()) -> BadRequest:
    """The 400 for a request that does not fit its model: every problem, the first in the message.
    `where` names the part of the request a field came from ("query", "path"; none for a body)."""
    details = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = (*where(err["loc"][0]), *err["loc"]) if err["loc"] else ()
        # Our validators' own sentences, without pydantic's "Value error, " in front of them.
        message = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        details.append({"field": ".".join(str(p) for p in loc) or "body", "message": message})
    first = details[0]
    return BadRequest(f"{first['field']}: {first['message']}", details=details)


def reply(stored: Reply) -> Response:
    return replayed(True, JSONBytes(stored.body, status_code=stored.status))


def replayed(replay: bool, response: Response) -> Response:
    """A replay of an idempotent request says so (`Idempotent-Replayed: true`)."""
    if replay:
        response.headers[idempotency.REPLAYED_HEADER] = "true"
    return response
