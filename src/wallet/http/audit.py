"""The ledger's audit for the operator: the verdict of every wallet's hash chain, and a digest of
the chain heads to keep outside the database."""

from __future__ import annotations

from starlette.responses import Response

from wallet.http.routing import Auth, Call, Routes
from wallet.http.schemas import DigestEnvelope, VerifyEnvelope, error_responses
from wallet.verify import take_digest, verify_ledger
from wallet.wire import json_response, ok

routes = Routes(tags=["admin"], auth=Auth.ADMIN)


@routes.get(
    "/admin/ledger/verify", responses={200: {"model": VerifyEnvelope}, **error_responses(401, 403, 429)}
)
async def ledger_verdict(call: Call) -> Response:
    """Recomputes every wallet's chain: costs a full read of the ledger."""
    verdict = await verify_ledger(call.svc.wallets.engine, call.svc.settings.chain_key)
    return json_response(200, ok(verdict.as_json()))


@routes.get(
    "/admin/ledger/digest", responses={200: {"model": DigestEnvelope}, **error_responses(401, 403, 429)}
)
async def ledger_digest(call: Call) -> Response:
    """Every wallet's chain head at this moment, HMACed: store `data` outside the database and
    give it to `wallet verify --digest` later."""
    return json_response(200, ok(await take_digest(call.svc.wallets.engine, call.svc.settings.chain_key)))
