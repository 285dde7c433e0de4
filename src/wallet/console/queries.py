"""What the console's pages read. Reads only: every change goes through the API's operations.

Order counts over a period use the primary key: an order id starts with its creation time in
epoch milliseconds (`ORD-<13 digits>-…`), so `order_id >= 'ORD-<ms>'` is a range of its unique
index.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from wallet.reads import HELD_SQL, ORDER_COLUMNS, OrderRow
from wallet.verify import Verdict


def order_id_floor(moment: datetime) -> str:
    """The smallest order id created at or after `moment`."""
    return f"ORD-{int(moment.timestamp() * 1000):013d}"


_MONEY = text("""
SELECT (SELECT coalesce(sum(balance), 0)::bigint FROM wallets) AS balances,
       (SELECT coalesce(sum(amount), 0)::bigint FROM orders WHERE status = 'PENDING') AS held,
       (SELECT count(*) FROM orders WHERE needs_review AND status = 'PENDING') AS review,
       (SELECT min(order_id) FROM orders WHERE status = 'PENDING') AS oldest_pending,
       (SELECT count(*) FROM wallets) AS clients
""")
_PERIOD = text("""
SELECT count(*) AS orders, coalesce(sum(amount), 0)::bigint AS volume,
       count(*) FILTER (WHERE status = 'COMPLETED') AS completed,
       count(*) FILTER (WHERE status = 'FAILED') AS failed
FROM orders WHERE order_id >= :floor
""")
_PER_MINUTE = text("""
SELECT substr(order_id, 5, 13)::bigint / 60000 AS minute, status, count(*) AS n
FROM orders WHERE order_id >= :floor GROUP BY 1, 2
""")
_LAST_CHECK = text(
    "SELECT checked_at, ok, wallets, entries, faults FROM ledger_checks ORDER BY id DESC LIMIT 1"
)
_RECORD_CHECK = text("""
INSERT INTO ledger_checks (ok, wallets, entries, faults, checked_by)
VALUES (:ok, :wallets, :entries, CAST(:faults AS jsonb), :by)
""")


@dataclass(frozen=True, slots=True)
class Period:
    orders: int
    volume: int
    completed: int
    failed: int

    @property
    def failure_rate(self) -> float | None:
        finished = self.completed + self.failed
        return None if finished == 0 else self.failed / finished


@dataclass(frozen=True, slots=True)
class Overview:
    balances: int
    held: int
    clients: int
    review: int
    oldest_pending: str | None
    today: Period
    week: Period
    per_minute: dict[int, dict[str, int]]  # minute (epoch / 60) -> status -> orders
    chart_start: int
    last_check: Any


async def overview(conn: AsyncConnection, now: datetime) -> Overview:
    money = (await conn.execute(_MONEY)).one()
    midnight = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    periods = []
    for start in (midnight, now - timedelta(days=7)):
        row = (await conn.execute(_PERIOD, {"floor": order_id_floor(start)})).one()
        periods.append(Period(row.orders, row.volume, row.completed, row.failed))
    day_ago = now - timedelta(hours=24)
    per_minute: dict[int, dict[str, int]] = {}
    for row in await conn.execute(_PER_MINUTE, {"floor": order_id_floor(day_ago)}):
        per_minute.setdefault(row.minute, {})[row.status] = row.n
    return Overview(
        balances=money.balances,
        held=money.held,
        clients=money.clients,
        review=money.review,
        oldest_pending=money.oldest_pending,
        today=periods[0],
        week=periods[1],
        per_minute=per_minute,
        chart_start=int(day_ago.timestamp()) // 60 + 1,
        last_check=(await conn.execute(_LAST_CHECK)).first(),
    )


async def record_check(conn: AsyncConnection, verdict: Verdict, by: str) -> None:
    data = verdict.as_json()
    params = {
        "ok": verdict.ok,
        "wallets": verdict.wallets,
        "entries": verdict.entries,
        "faults": orjson.dumps(data["faults"]).decode(),
        "by": by,
    }
    await conn.execute(_RECORD_CHECK, params)


async def last_check(conn: AsyncConnection) -> Any:
    return (await conn.execute(_LAST_CHECK)).first()


CLIENT_SORTS = {
    "id": "c.client_id ASC",
    "balance": "w.balance DESC, c.client_id ASC",
    "balance_asc": "w.balance ASC, c.client_id ASC",
}


async def clients(conn: AsyncConnection, search: str, sort: str, page: int, per_page: int) -> list[Any]:
    """A page of clients matching `search` in id, name or email. A search reads every client
    (an operator's occasional look-up, not a hot path); without one, each sort is an index
    order."""
    query = "SELECT c.client_id, c.name, c.email, w.balance FROM clients c JOIN wallets w USING (client_id)"
    params: dict[str, Any] = {"limit": per_page + 1, "offset": (page - 1) * per_page}
    if search:
        pattern = "%" + search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        query += " WHERE c.client_id ILIKE :p OR c.name ILIKE :p OR c.email ILIKE :p"
        params["p"] = pattern
    query += f" ORDER BY {CLIENT_SORTS[sort]} LIMIT :limit OFFSET :offset"
    return list((await conn.execute(text(query), params)).all())


_PROFILE = text(f"""
SELECT c.client_id, c.name, c.email, c.created_at, w.balance, w.updated_at, w.entry_count,
       {HELD_SQL.format(client="w.client_id")} AS held
FROM clients c JOIN wallets w USING (client_id)
WHERE c.client_id = :client_id
""")
_LEDGER = text("""
SELECT entry_no, type, amount, balance_before, balance_after, reference_id, description, created_at
FROM ledger_entries WHERE client_id = :client_id AND entry_no < :before
ORDER BY entry_no DESC LIMIT :limit
""")
_ORDERS = text(f"""
SELECT id, {ORDER_COLUMNS} FROM orders WHERE client_id = :client_id AND id < :before
ORDER BY id DESC LIMIT :limit
""")
_KEYS = text("""
SELECT key_id, created_at, revoked_at FROM api_keys WHERE client_id = :client_id
ORDER BY created_at DESC, key_id
""")
LAST = 2**63 - 1


async def profile(conn: AsyncConnection, client_id: str) -> Any:
    return (await conn.execute(_PROFILE, {"client_id": client_id})).first()


async def ledger(conn: AsyncConnection, client_id: str, before: int, limit: int) -> list[Any]:
    params = {"client_id": client_id, "before": before, "limit": limit + 1}
    return list((await conn.execute(_LEDGER, params)).all())


def _order_page(rows: list[Any], limit: int) -> tuple[list[OrderRow], int | None]:
    page, next_key = _keyed(rows, limit)
    return [OrderRow.of(r) for r in page], next_key


async def client_orders(
    conn: AsyncConnection, client_id: str, before: int, limit: int
) -> tuple[list[OrderRow], int | None]:
    params = {"client_id": client_id, "before": before, "limit": limit + 1}
    return _order_page(list(await conn.execute(_ORDERS, params)), limit)


async def api_keys(conn: AsyncConnection, client_id: str) -> list[Any]:
    return list((await conn.execute(_KEYS, {"client_id": client_id})).all())


async def orders(
    conn: AsyncConnection, status: str | None, review: bool, before: int, limit: int
) -> tuple[list[OrderRow], int | None]:
    """Newest first; each filter combination is an index ending in `id` (see http/pages.py)."""
    where = ["id < :before"]
    params: dict[str, Any] = {"before": before, "limit": limit + 1}
    if status:
        where.append("status = :status")
        params["status"] = status
    if review:
        where.append("needs_review")
    query = (
        f"SELECT id, {ORDER_COLUMNS} FROM orders WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT :limit"
    )
    return _order_page(list(await conn.execute(text(query), params)), limit)


_WEBHOOK_ENDPOINTS = text("""
SELECT id, endpoint_id, client_id, url, event_types, description, enabled, disabled_reason,
       failing_since, created_at
FROM webhook_endpoints WHERE id < :before ORDER BY id DESC LIMIT :limit
""")
# The newest attempts of each endpoint (one descent of webhook_attempts_endpoint_page each:
# endpoints are few), merged; with the delivery's state now, the event's type, and whether this
# is the newest attempt of its delivery shown (where a replay is offered).
_WEBHOOK_ATTEMPTS = text("""
SELECT a.id, a.endpoint_id, w.client_id AS endpoint_client, a.event_id, e.type AS event_type,
       a.attempted_at, a.status_code, a.latency_ms, a.error, d.status AS delivery_status,
       a.id = max(a.id) OVER (PARTITION BY a.client_id, a.delivery_id) AS last_shown
FROM webhook_endpoints w
CROSS JOIN LATERAL (
    SELECT * FROM webhook_attempts x
    WHERE x.endpoint_id = w.endpoint_id AND x.id < :before ORDER BY x.id DESC LIMIT :limit
) a
JOIN webhook_deliveries d ON d.client_id = a.client_id AND d.id = a.delivery_id
JOIN events e ON e.client_id = d.client_id AND e.id = d.event_no
WHERE CAST(:endpoint_id AS text) IS NULL OR w.endpoint_id = :endpoint_id
ORDER BY a.id DESC LIMIT :limit
""")


def _keyed(rows: list[Any], limit: int) -> tuple[list[Any], int | None]:
    """The page and the key of the next one (None on the last)."""
    return rows[:limit], rows[limit - 1].id if len(rows) > limit else None


async def webhook_endpoints(conn: AsyncConnection, before: int, limit: int) -> tuple[list[Any], int | None]:
    """Every endpoint, global ones included, newest first."""
    rows = (await conn.execute(_WEBHOOK_ENDPOINTS, {"before": before, "limit": limit + 1})).all()
    return _keyed(list(rows), limit)


async def webhook_attempts(
    conn: AsyncConnection, endpoint_id: str | None, before: int, limit: int
) -> tuple[list[Any], int | None]:
    """Delivery attempts, newest first: every endpoint's, or one's."""
    params = {"endpoint_id": endpoint_id, "before": before, "limit": limit + 1}
    return _keyed(list((await conn.execute(_WEBHOOK_ATTEMPTS, params)).all()), limit)
