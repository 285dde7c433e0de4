"""The operator moves money: credit a wallet (creating it and its client on first credit) and
debit it, both idempotent with an Idempotency-Key."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field
from starlette.responses import Response

from wallet import idempotency
from wallet.http.deps import ClientIdField, RequestBody, Text, replayed, reply
from wallet.http.routing import Auth, Call, Routes
from wallet.http.schemas import MovementEnvelope, error_responses
from wallet.ledger import Movement
from wallet.money import Amount, from_cents
from wallet.wallets import Moved
from wallet.wire import Reply, json_response, ok


class CreditRequest(RequestBody):
    client_id: ClientIdField
    amount: Amount
    name: Annotated[str, Field(max_length=200, pattern=r"^[^\x00]*$")] | None = None
    # An address at least shaped like one (one @, something on both sides, no spaces): a typo
    # caught here is a client an operator can still write to.
    email: Annotated[str, Field(max_length=254, pattern=r"^[^@\s\x00]+@[^@\s\x00]+$")] | None = None
    description: Text | None = None


class DebitRequest(RequestBody):
    client_id: ClientIdField
    amount: Amount
    description: Text | None = None


routes = Routes(tags=["admin"], auth=Auth.ADMIN)


@routes.post(
    "/admin/wallet/credit",
    idempotent=True,
    responses={200: {"model": MovementEnvelope}, **error_responses(400, 401, 403, 409, 413, 422, 429)},
)
async def credit_wallet(call: Call, body: CreditRequest) -> Response:
    result = await call.svc.wallets.credit(
        body.client_id,
        body.amount,
        idem=idempotency.key_for(idempotency.ADMIN_SCOPE, call.idempotency_key, "credit", body),
        description=body.description,
        name=body.name,
        email=body.email,
    )
    return _answer(result, "amountCredited", "Wallet credited successfully")


@routes.post(
    "/admin/wallet/debit",
    idempotent=True,
    responses={200: {"model": MovementEnvelope}, **error_responses(400, 401, 403, 404, 409, 413, 422, 429)},
)
async def debit_wallet(call: Call, body: DebitRequest) -> Response:
    result = await call.svc.wallets.debit(
        body.client_id,
        body.amount,
        idem=idempotency.key_for(idempotency.ADMIN_SCOPE, call.idempotency_key, "debit", body),
        description=body.description,
    )
    return _answer(result, "amountDebited", "Wallet debited successfully")


def _answer(result: Moved | Reply, amount_field: str, message: str) -> Response:
    """The movement, the same for the request that made it and for every replay."""
    if isinstance(result, Reply):  # a replay of a record kept before migration 0013, as stored
        return reply(result)
    return replayed(
        result.replayed, json_response(200, ok(_movement_json(result.movement, amount_field), message))
    )


def _movement_json(movement: Movement, amount_field: str) -> dict[str, Any]:
    return {
        "clientId": movement.client_id,
        "previousBalance": from_cents(movement.balance_before),
        "newBalance": from_cents(movement.balance_after),
        amount_field: from_cents(movement.amount),
    }
