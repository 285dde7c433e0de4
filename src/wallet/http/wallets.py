"""A client's own wallet: its balance (now or at a moment) and its ledger, page by page."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from starlette.responses import Response

from wallet import statements
from wallet.http.deps import ClientId, Svc
from wallet.http.pages import Cursor, Limit, ledger_page
from wallet.http.schemas import BalanceAtEnvelope, BalanceEnvelope, LedgerPage, error_responses
from wallet.money import from_cents
from wallet.wire import iso, json_response, ok

router = APIRouter()


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


@router.get(
    "/wallet/transactions",
    tags=["client"],
    responses={200: {"model": LedgerPage}, **error_responses(400, 401, 403, 404, 429)},
)
async def own_transactions(
    svc: Svc, client_id: ClientId, limit: Limit = 20, cursor: Cursor = None
) -> Response:
    return await ledger_page(svc.reads, client_id, limit, cursor)
