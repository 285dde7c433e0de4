"""Wallets and orders as their readers see them: the money PENDING orders hold, the columns
every reader of an order gets, how a settling statement finds its orders, and balance reads.
Nothing here changes a row; the movement statements in ledger.py return these same shapes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import text

from wallet.database import Direct, Statement
from wallet.errors import ClientNotFound, NotFound

# Money out of the wallet for orders whose outcome is not known yet (orders_pending_client).
HELD_SQL = (
    "(SELECT coalesce(sum(o.amount), 0)::bigint FROM orders o"
    " WHERE o.client_id = {client} AND o.status = 'PENDING')"
)

# What every reader of an order gets: the client's view and the operator's.
ORDER_COLUMNS = """order_id, client_id, amount, status, fulfillment_id, failure, attempts,
    resolver_attempts, next_attempt_at, sent_by, last_error, needs_review, flagged_at, resolved_by,
    resolved_at, resolution_note, created_at, updated_at"""


def settling(rows: str, *, carrying: str = "") -> str:
    """The CTE `target` a statement that settles orders updates through: the orders `rows` (a
    FROM clause matching them by key: the order id, with the client id when the caller knows
    it, never the status) finds, locked in order-id order, each with the status the lock found
    (the latest: a settler that waited sees the winner's status). The update then matches
    `SETTLE_TARGET`: by primary key, only where that status is PENDING.

    Never `order_id = ... AND status = 'PENDING'` in one scan: when the statistics call PENDING
    rare and a backlog says otherwise, the planner ANDs the id's index with a scan of every
    PENDING order, for each order settled (docs/benchmarks.md, "A planner trap in the settle statements").
    Nothing is changed here; the lock is the settling statement's own."""
    also = f", {carrying}" if carrying else ""
    return f"""target AS (
    SELECT orders.client_id AS target_client, orders.id AS target_id, orders.status AS target_status{also}
    FROM {rows}
    ORDER BY orders.order_id
    FOR NO KEY UPDATE OF orders
)"""


SETTLE_TARGET = (
    "orders.client_id = target.target_client AND orders.id = target.target_id"
    " AND target.target_status = 'PENDING'"
)


@dataclass(frozen=True, slots=True)
class OrderRow:
    """An order as stored (ORDER_COLUMNS)."""

    order_id: str
    client_id: str
    amount: int
    status: str
    fulfillment_id: str | None
    failure: str | None
    attempts: int
    resolver_attempts: int
    next_attempt_at: datetime | None
    sent_by: datetime | None
    last_error: str | None
    needs_review: bool
    flagged_at: datetime | None
    resolved_by: str | None
    resolved_at: datetime | None
    resolution_note: str | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, row: Any) -> OrderRow:
        """From a SQLAlchemy row, or an asyncpg record (the group-commit statements)."""
        values = row._mapping if hasattr(row, "_mapping") else row
        return cls(*(values[name] for name in cls.__slots__))


@dataclass(frozen=True, slots=True)
class Balance:
    client_id: str
    balance: int
    updated_at: datetime
    held: int  # in PENDING orders: out of the balance until their outcome is known


# The bare balance: what a refused movement reports (ledger.py's cold path).
BALANCE = text("SELECT balance, updated_at FROM wallets WHERE client_id = :client_id")
_BALANCE_COLUMNS = f"balance, updated_at, {HELD_SQL.format(client='wallets.client_id')} AS held, client_id"
# One wallet's read, as the bench's raw-SQL ceiling runs it; the service reads in batches:
# every balance read of one event-loop pass in one query (`balances`).
BALANCE_HELD = text(f"SELECT {_BALANCE_COLUMNS} FROM wallets WHERE client_id = :client_id")
_BALANCES = Statement.of(
    text(f"SELECT {_BALANCE_COLUMNS} FROM wallets WHERE client_id = ANY(CAST(:client_ids AS text[]))")
)


def no_wallet(client_id: str) -> NotFound:
    return ClientNotFound(f"Wallet not found for client {client_id}")


async def balances(conn: Direct, client_ids: Sequence[str]) -> list[Balance | NotFound]:
    """Each wallet's balance and held money, in the order asked, from one query."""
    rows = await conn.fetch(_BALANCES, {"client_ids": list(set(client_ids))})
    found = {
        row["client_id"]: Balance(row["client_id"], row["balance"], row["updated_at"], row["held"])
        for row in rows
    }
    return [found.get(client_id) or no_wallet(client_id) for client_id in client_ids]
