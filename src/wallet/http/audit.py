"""The ledger's audit for the operator: the verdict of every wallet's hash chain, and a digest of
the chain heads to keep outside the database."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.responses import Response

from wallet.http.deps import Admin, Svc
from wallet.http.schemas import DigestEnvelope, VerifyEnvelope, error_responses
from wallet.verify import take_digest, verify_ledger
from wallet.wire import json_response, ok

router = APIRouter()


@router.get(
    "/admin/ledger/verify",
    tags=["admin"],
    dependencies=[Admin],
    responses={200: {"model": VerifyEnvelope}, **error_responses(401, 403, 429)},
)
async def ledger_verdict(svc: Svc) -> Response:
    """Recomputes every wallet's chain: costs a full read of the ledger."""
    verdict = await verify_ledger(svc.wallets.engine, svc.settings.chain_key)
    return json_response(200, ok(verdict.as_json()))


@router.get(
    "/admin/ledger/digest",
    tags=["admin"],
    dependencies=[Admin],
    responses={200: {"model": DigestEnvelope}, **error_responses(401, 403, 429)},
)
async def ledger_digest(svc: Svc) -> Response:
    """Every wallet's chain head at this moment, HMACed: store `data` outside the database and
    give it to `wallet verify --digest` later."""
    return json_response(200, ok(await take_digest(svc.wallets.engine, svc.settings.chain_key)))
