"""The operator's view of one client: its profile with balance and held money, and its ledger."""

from __future__ import annotations

from typing import Any

from sqlalchemy import text
from starlette.responses import Response

from wallet.database import Connector
from wallet.errors import ClientNotFound
from wallet.http.deps import ClientPath, read_lagging
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

    async def profile(reads: Connector) -> Any:
        async with reads.connect() as conn:
            row = (await conn.execute(_PROFILE, {"client_id": client_id})).first()
        if row is None:
            raise ClientNotFound(f"Client {client_id} not found")
        return row

    row = await read_lagging(call.svc.reads, profile)
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
    return await read_lagging(
        call.svc.reads, lambda reads: ledger_page(reads, params.client_id, params.limit, params.cursor)
    )
