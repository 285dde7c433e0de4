"""The operator's view of one client: its profile with balance and held money, and its ledger."""

from __future__ import annotations

from sqlalchemy import text
from starlette.responses import Response

from wallet.errors import NotFound
from wallet.http.deps import ClientPath
from wallet.http.pages import Page, ledger_page
from wallet.http.routing import Auth, Call, Routes
from wallet.http.schemas import ClientEnvelope, LedgerPage, error_responses
from wallet.money import from_cents
from wallet.reads import HELD_SQL
from wallet.wire import iso, json_response, ok

_PROFILE = text(f"""
SELECT c.client_id, c.name, c.email, c.low_balance_threshold, c.created_at, w.balance, w.updated_at,
       {HELD_SQL.format(client="w.client_id")} AS held
FROM clients c JOIN wallets w USING (client_id)
WHERE c.client_id = :client_id
""")

routes = Routes(tags=["admin"], auth=Auth.ADMIN)


class ClientPage(ClientPath, Page):
    pass


@routes.get(
    "/admin/clients/{client_id}",
    responses={200: {"model": ClientEnvelope}, **error_responses(400, 401, 403, 404, 429)},
)
async def client_profile(call: Call, params: ClientPath) -> Response:
    client_id = params.client_id
    async with call.svc.reads.connect() as conn:
        row = (await conn.execute(_PROFILE, {"client_id": client_id})).first()
    if row is None:
        raise NotFound(f"Client {client_id} not found", code="CLIENT_NOT_FOUND")
    data = {
        "clientId": row.client_id,
        "name": row.name,
        "email": row.email,
        "balance": from_cents(row.balance),
        "held": from_cents(row.held),
        "lowBalanceThreshold": None
        if row.low_balance_threshold is None
        else from_cents(row.low_balance_threshold),
        "createdAt": iso(row.created_at),
        "updatedAt": iso(row.updated_at),
    }
    return json_response(200, ok(data))


@routes.get(
    "/admin/clients/{client_id}/ledger",
    responses={200: {"model": LedgerPage}, **error_responses(400, 401, 403, 404, 429)},
)
async def client_ledger(call: Call, params: ClientPage) -> Response:
    return await ledger_page(call.svc.reads, params.client_id, params.limit, params.cursor)
