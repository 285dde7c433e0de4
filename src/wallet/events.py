"""Events: a transactional outbox of everything a client or an operator cares about.

An event is written by the statement that makes the change it describes (a CTE inside the
ledger's and the orders' single statements), so it exists exactly when the change committed.
Its `data` is built in SQL in the very shapes the API answers with: amounts through `MONEY`
(numeric cents / 100 with trailing zeros trimmed, the JSON number `money.from_cents` gives) and
times through `TIME` (what `wire.iso` prints). The table is immutable (migration 0004); a
statement trigger queues a statement's events for the delivery job's fan-out in the same
transaction, one INSERT for a whole group-committed batch (migration 0010).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from wallet.wire import iso

EventType = Literal[
    "wallet.credited",
    "wallet.debited",
    "order.created",
    "order.completed",
    "order.failed",
    "order.pending",
    "order.needs_review",
    "order.resolved",
    "balance.low",
    "api_key.created",
    "api_key.revoked",
    "webhook_endpoint.disabled",
]
EVENT_ID_PATTERN = r"^evt_[0-9a-f]{32}$"
# The client id of events about the platform itself (a global endpoint disabled): outside the
# client id alphabet (migration 0009), so no client's feed or endpoint ever matches it; the
# admin's feed and the global endpoints see it, with `clientId` null.
OPERATOR_STREAM = "*"


def money_sql(cents: str) -> str:
    """Cents as the API's JSON number: 1000.5, 250, never 1000.50."""
    return f"trim_scale(({cents})::numeric / 100)"


def time_sql(moment: str) -> str:
    """A timestamptz as `wire.iso` prints it: UTC, milliseconds, Z. No colon in the SQL text:
    pgbench (the bench's raw-SQL ceiling runs these statements) takes `:MI` for a variable even
    inside a literal, so the colons are put in by translate()."""
    spelled = f"""to_char(({moment}) AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24|MI|SS.MS"Z"')"""
    return f"translate({spelled}, '|', chr(58))"


def order_data_sql(row: str) -> str:
    """The client's view of an order (`orders.order_json(updated=True)`) from a row alias."""
    return (
        f"jsonb_build_object('orderId', {row}.order_id, 'amount', {money_sql(row + '.amount')}, "
        f"'status', {row}.status, 'fulfillmentId', {row}.fulfillment_id, "
        f"'createdAt', {time_sql(row + '.created_at')}, 'updatedAt', {time_sql(row + '.updated_at')})"
    )


def movement_data_sql(row: str, amount_field: str) -> str:
    """`wallets._movement_json` from a CTE row with client_id, before, after, amount."""
    return (
        f"jsonb_build_object('clientId', {row}.client_id, 'previousBalance', {money_sql(row + '.before')}, "
        f"'newBalance', {money_sql(row + '.after')}, '{amount_field}', {money_sql(row + '.amount')})"
    )


def balance_low_sql(row: str) -> str:
    """`balance.low` rows for a movement CTE `row` (client_id, before, after, updated_at) that
    took the balance from at least the client's threshold to below it."""
    data = (
        f"jsonb_build_object('clientId', {row}.client_id, 'balance', {money_sql(row + '.after')}, "
        f"'threshold', {money_sql('c.low_balance_threshold')})"
    )
    return f"""
    SELECT {row}.client_id, 'balance.low', {data}, {row}.updated_at
    FROM {row} JOIN clients c ON c.client_id = {row}.client_id
    WHERE {row}.before >= c.low_balance_threshold AND {row}.after < c.low_balance_threshold"""


def settled_order_events_sql(row: str, outcome: str) -> str:
    """The events of an order settled in CTE `row`: its outcome (`order.completed`,
    `order.failed`) and, when an operator settled it, `order.resolved` as well."""
    return f"""SELECT client_id, '{outcome}', {order_data_sql(row)}, updated_at FROM {row}
    UNION ALL
    SELECT client_id, 'order.resolved', {order_data_sql(row)}, updated_at FROM {row}
    WHERE {row}.resolved_by IS NOT NULL"""


INSERT_EVENT = "INSERT INTO events (client_id, type, data, created_at)"

_COLUMNS = "id, event_id, client_id, type, data, created_at"


def event_json(row: Any) -> dict[str, Any]:
    """An event as the API lists it and as a webhook delivers it."""
    return {
        "id": row.event_id,
        "type": row.type,
        "createdAt": iso(row.created_at),
        "clientId": None if row.client_id == OPERATOR_STREAM else row.client_id,
        # Without a column type SQLAlchemy hands jsonb over as its text.
        "data": orjson.loads(row.data) if isinstance(row.data, str | bytes) else row.data,
    }


async def page(
    conn: AsyncConnection,
    *,
    limit: int,
    before_key: int | None,
    client_id: str | None,
    type_: str | None,
    after: datetime | None,
) -> tuple[list[dict[str, Any]], int | None]:
    """Newest first; each filter combination is a range scan of events_page or
    events_client_type_page (or the primary key) with a LIMIT."""
    filters = {
        "client_id": "client_id = :client_id",
        "type": "type = :type",
        # After the millisecond `after` shows (`wire.parse_time`): never an event shown at it.
        "after": "created_at >= CAST(:after AS timestamptz) + interval '1 millisecond'",
        "key": "id < :key",
    }
    given = {"client_id": client_id, "type": type_, "after": after, "key": before_key}
    params: dict[str, Any] = {name: value for name, value in given.items() if value is not None}
    query = f"SELECT {_COLUMNS} FROM events"
    if params:
        query += " WHERE " + " AND ".join(filters[name] for name in params)
    query += " ORDER BY id DESC LIMIT :limit"
    rows = (await conn.execute(text(query), {**params, "limit": limit + 1})).all()
    more = len(rows) > limit
    rows = rows[:limit]
    return [event_json(r) for r in rows], (rows[-1].id if more else None)


_PURGE = text("""
DELETE FROM events WHERE created_at < statement_timestamp() - make_interval(days => :days)
""")


async def purge_expired(engine: AsyncEngine, retention_days: int) -> int:
    """Delete events past EVENT_RETENTION_DAYS (their deliveries and attempts go with them): the
    one DELETE the immutability trigger lets through, and only for events that old."""
    async with engine.begin() as conn:
        await conn.execute(
            text("SELECT set_config('wallet.events_retention_days', :days, true)"),
            {"days": str(retention_days)},
        )
        result = await conn.execute(_PURGE, {"days": retention_days})
    return int(getattr(result, "rowcount", 0) or 0)
