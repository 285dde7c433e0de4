"""A client's own wallet: its balance (now or at a moment) and its ledger, page by page."""

from __future__ import annotations

from pydantic import Field
from starlette.responses import Response

from wallet import statements
from wallet.http.deps import Params, read_lagging
from wallet.http.pages import Page, ledger_page
from wallet.http.routing import Auth, Call, Routes
from wallet.http.schemas import BalanceAtEnvelope, BalanceEnvelope, LedgerPage, error_responses
from wallet.money import from_cents
from wallet.wire import TimeText, iso, json_response, ok, parse_time


class BalanceWhen(Params):
    at: TimeText | None = Field(
        None,
        max_length=64,
        description="ISO 8601 time with a zone: the balance after every entry dated at or before it, "
        "to the millisecond shown (0 before the first; a future time gives the balance now)",
    )


routes = Routes(tags=["client"], auth=Auth.CLIENT)


@routes.get(
    "/wallet/balance",
    responses={
        200: {
            "model": BalanceEnvelope | BalanceAtEnvelope,
            "description": "The balance now, or with `at` the balance at that moment",
        },
        **error_responses(400, 401, 403, 404, 429),
    },
)
async def get_balance(call: Call, params: BalanceWhen) -> Response:
    svc, client_id = call.svc, call.client_id
    moment = parse_time(params.at, "at")
    if moment is not None:
        cents = await read_lagging(
            svc.reads, lambda reads: statements.balance_at(reads, svc.wallets.single, client_id, moment)
        )
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


@routes.get(
    "/wallet/transactions", responses={200: {"model": LedgerPage}, **error_responses(400, 401, 403, 404, 429)}
)
async def own_transactions(call: Call, params: Page) -> Response:
    return await read_lagging(
        call.svc.reads, lambda reads: ledger_page(reads, call.client_id, params.limit, params.cursor)
    )
