"""Pages of a list, newest first: a wallet's ledger and orders (a client's, or any for the operator).

Pages are keyset-paginated: each page is one range scan of an index
(`ledger_entries (client_id, entry_no)`, `orders (client_id[, status], id)`) with a LIMIT, so
the millionth page costs what the first one does. The cursor is the last row's key, opaque to
clients (base64) but validated strictly.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from pydantic import Field
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.responses import Response

from wallet.database import Connector
from wallet.errors import BadRequest, ClientNotFound
from wallet.http.deps import Params
from wallet.orders import admin_order_json, order_json
from wallet.reads import ORDER_COLUMNS, OrderRow
from wallet.statements import entry_json
from wallet.wire import json_response

_CURSOR = re.compile(r"^c1:([1-9][0-9]{0,18})$")


class Page(Params):
    """Which page of a list: the query parameters every list takes."""

    limit: int = Field(20, ge=1, le=100, description="Page size, 1-100")
    cursor: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_-]{1,64}$", description="`nextCursor` of the previous page (opaque)"
    )


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
    if not rows and not admin and client_id is not None:
        await require_wallet(conn, client_id)
    more = len(rows) > limit
    rows = rows[:limit]
    view = admin_order_json if admin else _client_order_json
    return page_response([view(OrderRow.of(r)) for r in rows], rows[-1].id if more else None)


def _client_order_json(order: OrderRow) -> dict[str, Any]:
    return order_json(order, updated=True)


def page_response(items: list[dict[str, Any]], next_key: int | None) -> Response:
    """A page of a list, newest first: its items and the cursor of the next page (null on the last)."""
    body = {
        "success": True,
        "data": items,
        "nextCursor": encode_cursor(next_key) if next_key is not None else None,
    }
    return json_response(200, body)


_WALLET_EXISTS = text("SELECT 1 FROM wallets WHERE client_id = :client_id")


async def require_wallet(conn: AsyncConnection, client_id: str) -> None:
    """An empty page of a client's own list is a 404 when the client has no wallet, as the
    balance is (asked only then: a page with rows needs no second look)."""
    if (await conn.execute(_WALLET_EXISTS, {"client_id": client_id})).first() is None:
        raise ClientNotFound(f"Wallet not found for client {client_id}")


async def ledger_page(engine: Connector, client_id: str, limit: int, cursor: str | None) -> Response:
    key = decode_cursor(cursor)
    params = {"client_id": client_id, "limit": limit + 1, "key": key}
    async with engine.connect() as conn:
        rows = (await conn.execute(_LEDGER_FIRST if key is None else _LEDGER_AFTER, params)).all()
        if not rows:
            await require_wallet(conn, client_id)
    more = len(rows) > limit
    rows = rows[:limit]
    return page_response([entry_json(r) for r in rows], rows[-1].entry_no if more else None)
