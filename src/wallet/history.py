"""Reading what happened: pages of a wallet's ledger and of a client's orders, and the ledger
verdict for admins.

Pages are keyset-paginated, newest first: each page is one range scan of an index
(`ledger_entries (client_id, entry_no)`, `orders (client_id[, status], id)`) with a LIMIT, so
the millionth page costs what the first one does. The cursor is the last row's key, opaque to
clients (base64) but validated strictly.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.responses import Response

from wallet import statements
from wallet.api import Admin, ClientId, Svc
from wallet.database import Connector
from wallet.errors import BadRequest, NotFound
from wallet.money import from_cents
from wallet.orders import OrderStatus, admin_order_json, order_json
from wallet.reads import HELD_SQL, ORDER_COLUMNS, OrderRow
from wallet.schemas import (
    ClientEnvelope,
    DigestEnvelope,
    LedgerPage,
    OrderPage,
    StatementEnvelope,
    VerifyEnvelope,
    error_responses,
)
from wallet.statements import entry_json
from wallet.verify import take_digest, verify_ledger
from wallet.wire import iso, json_response, ok

_CURSOR = re.compile(r"^c1:([1-9][0-9]{0,18})$")

Limit = Annotated[int, Query(ge=1, le=100, description="Page size, 1-100")]
Cursor = Annotated[
    str | None,
    Query(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="`nextCursor` of the previous page (opaque)"),
]
PathClientId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_.:-]{1,64}$", examples=["CLIENT123"])]


def encode_cursor(key: int) -> str:
    return base64.urlsafe_b64encode(f"c1:{key}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> int | None:
    if cursor is None:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raw = ""
    match = _CURSOR.fullmatch(raw)
    if match is None or int(match.group(1)) > 2**63 - 1:
        raise BadRequest("Invalid cursor: pass the nextCursor of a previous page", code="INVALID_CURSOR")
    return int(match.group(1))


_LEDGER_COLUMNS = """id, entry_no, type, amount, balance_before, balance_after, reference_id,
    description, created_at"""
_LEDGER_FIRST = text(f"""
SELECT {_LEDGER_COLUMNS} FROM ledger_entries
WHERE client_id = :client_id ORDER BY entry_no DESC LIMIT :limit
""")
_LEDGER_AFTER = text(f"""
SELECT {_LEDGER_COLUMNS} FROM ledger_entries
WHERE client_id = :client_id AND entry_no < :key ORDER BY entry_no DESC LIMIT :limit
""")
_ORDER_FILTERS = {
    "client_id": "client_id = :client_id",
    "status": "status = :status",
    "needs_review": "needs_review = :needs_review",
    "key": "id < :key",
}


async def order_page(
    conn: AsyncConnection,
    limit: int,
    cursor: str | None,
    *,
    admin: bool,
    client_id: str | None = None,
    status: str | None = None,
    needs_review: bool | None = None,
) -> Response:
    """Newest first, narrowed by the filters that are not None. Each combination is served by an
    index ending in `id` (orders_client_page, orders_client_status_page, orders_status_page,
    orders_review_queue, the primary key)."""
    given = {
        "client_id": client_id,
        "status": status,
        "needs_review": needs_review,
        "key": decode_cursor(cursor),
    }
    params: dict[str, object] = {name: value for name, value in given.items() if value is not None}
    where = [_ORDER_FILTERS[name] for name in params]
    query = f"SELECT id, {ORDER_COLUMNS} FROM orders"
    if where:
        query += " WHERE " + " AND ".join(where)
    rows = (
        await conn.execute(text(query + " ORDER BY id DESC LIMIT :limit"), {**params, "limit": limit + 1})
    ).all()
    more = len(rows) > limit
    rows = rows[:limit]
    view = admin_order_json if admin else _client_order_json
    return page_response([view(OrderRow.of(r)) for r in rows], rows[-1].id if more else None)


def _client_order_json(order: OrderRow) -> dict[str, Any]:
    return order_json(order, updated=True)


_WALLET_EXISTS = text("SELECT 1 FROM wallets WHERE client_id = :client_id")
_PROFILE = text(f"""
SELECT c.client_id, c.name, c.email, c.low_balance_threshold, c.created_at, w.balance, w.updated_at,
       {HELD_SQL.format(client="w.client_id")} AS held
FROM clients c JOIN wallets w USING (client_id)
WHERE c.client_id = :client_id
""")


def page_response(items: list[dict[str, Any]], next_key: int | None) -> Response:
    """A page of a list, newest first: its items and the cursor of the next page (null on the last)."""
    body = {
        "success": True,
        "data": items,
        "nextCursor": encode_cursor(next_key) if next_key is not None else None,
    }
    return json_response(200, body)


async def ledger_page(engine: Connector, client_id: str, limit: int, cursor: str | None) -> Response:
    key = decode_cursor(cursor)
    params = {"client_id": client_id, "limit": limit + 1, "key": key}
    async with engine.connect() as conn:
        rows = (await conn.execute(_LEDGER_FIRST if key is None else _LEDGER_AFTER, params)).all()
        if not rows and (await conn.execute(_WALLET_EXISTS, params)).first() is None:
            raise NotFound(f"Wallet not found for client {client_id}", code="CLIENT_NOT_FOUND")
    more = len(rows) > limit
    rows = rows[:limit]
    return page_response([entry_json(r) for r in rows], rows[-1].entry_no if more else None)


router = APIRouter()


@router.get(
    "/wallet/transactions",
    tags=["client"],
    responses={200: {"model": LedgerPage}, **error_responses(400, 401, 403, 404, 429)},
)
async def own_transactions(
    svc: Svc, client_id: ClientId, limit: Limit = 20, cursor: Cursor = None
) -> Response:
    return await ledger_page(svc.reads, client_id, limit, cursor)


@router.get(
    "/orders",
    tags=["client"],
    responses={200: {"model": OrderPage}, **error_responses(400, 401, 403, 429)},
)
async def own_orders(
    svc: Svc,
    client_id: ClientId,
    status: Annotated[OrderStatus | None, Query()] = None,
    limit: Limit = 20,
    cursor: Cursor = None,
) -> Response:
    async with svc.reads.connect() as conn:
        return await order_page(conn, limit, cursor, admin=False, client_id=client_id, status=status)


@router.get(
    "/admin/clients/{client_id}",
    tags=["admin"],
    dependencies=[Admin],
    responses={200: {"model": ClientEnvelope}, **error_responses(400, 401, 403, 404, 429)},
)
async def client_profile(svc: Svc, client_id: PathClientId) -> Response:
    async with svc.reads.connect() as conn:
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


@router.get(
    "/admin/clients/{client_id}/ledger",
    tags=["admin"],
    dependencies=[Admin],
    responses={200: {"model": LedgerPage}, **error_responses(400, 401, 403, 404, 429)},
)
async def client_ledger(
    svc: Svc, client_id: PathClientId, limit: Limit = 20, cursor: Cursor = None
) -> Response:
    return await ledger_page(svc.reads, client_id, limit, cursor)


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


# --- statements (statements.py) ----------------------------------------------------------------

FromQuery = Annotated[
    statements.TimeText | None,
    Query(alias="from", max_length=64, description=f"Inclusive. {statements.TIME_DOC}"),
]
ToQuery = Annotated[
    statements.TimeText | None,
    Query(alias="to", max_length=64, description=f"Exclusive. {statements.TIME_DOC}"),
]
Format = Annotated[
    str | None, Query(pattern="^(json|csv)$", description="`csv` for CSV (or Accept: text/csv)")
]
STATEMENT_DOC: dict[int | str, dict[str, Any]] = {
    200: {
        "model": StatementEnvelope,
        "description": "The statement, or with `format=csv` / `Accept: text/csv` the entries as CSV",
        "content": {statements.CSV_TYPE: {"schema": {"type": "string"}}},
    },
}


async def _statement(
    request: Request, svc: Svc, client_id: str, start: str | None, end: str | None, fmt: str | None
) -> Response:
    begin, until = statements.parse_time(start, "from"), statements.parse_time(end, "to")
    st = await statements.statement(svc.snapshots, client_id, begin, until)
    return statements.statement_response(st, statements.wants_csv(request, fmt))


@router.get(
    "/wallet/statement",
    tags=["client"],
    responses={**STATEMENT_DOC, **error_responses(400, 401, 403, 404, 429)},
)
async def own_statement(
    request: Request,
    svc: Svc,
    client_id: ClientId,
    start: FromQuery = None,
    end: ToQuery = None,
    format: Format = None,
) -> Response:
    """Opening and closing balance, totals by type and every entry with `from` <= time < `to`
    (both optional: all history, until now). At most 10,000 entries: more is a 400."""
    return await _statement(request, svc, client_id, start, end, format)


@router.get(
    "/admin/clients/{client_id}/statement",
    tags=["admin"],
    dependencies=[Admin],
    responses={**STATEMENT_DOC, **error_responses(400, 401, 403, 404, 429)},
)
async def client_statement(
    request: Request,
    svc: Svc,
    client_id: PathClientId,
    start: FromQuery = None,
    end: ToQuery = None,
    format: Format = None,
) -> Response:
    """A client's statement, as `GET /wallet/statement` gives it to the client."""
    return await _statement(request, svc, client_id, start, end, format)
