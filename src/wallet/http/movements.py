"""The operator moves money: credit a wallet (creating it and its client on first credit) and
debit it, both idempotent with an Idempotency-Key."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from pydantic import Field
from starlette.responses import Response

from wallet import idempotency
from wallet.http.deps import (
    Admin,
    ClientIdField,
    IdemHeader,
    Parsed,
    RequestBody,
    Svc,
    Text,
    body_doc,
    json_body,
    reply,
)
from wallet.http.schemas import MovementEnvelope, error_responses
from wallet.money import Amount


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
