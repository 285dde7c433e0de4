"""Every SQL statement that changes a balance lives here, and nowhere else.

Each movement is one statement: a conditional `UPDATE wallets ... RETURNING` (the row lock is
held only for that statement's duration inside its transaction) feeding the ledger INSERT
through a CTE. The same UPDATE advances the wallet's hash chain (chain.py), so the entry's hash
is computed in the database from the previous head without a second round trip, by the SQL
functions `ledger_entry_content` and `ledger_chain_hash` (migration 0008) that every statement
here calls: one definition for single movements and batches.

An entry's time is taken once its wallet's row lock is granted (`_stamped`: the clock read after
the lock, never before it), and never before the previous entry's (`wallets.updated_at`, re-read
under the lock): `updated_at` never goes back, and an entry is not dated back across a wait for
the lock. Dated when its statement began, a movement that waited seconds for a lock committed
seconds after its date, so a statement or a balance at a moment read in between changed later.

Each statement also writes the events its change means (`events`: wallet.credited,
wallet.debited, order.created, order.failed, order.resolved, balance.low) through one more CTE,
in the same statement: an event exists exactly when its change committed, at no extra round trip.

Group commit: `place_orders` pays for a batch of orders in one statement through
`ledger_place_orders` (migration 0008): one row lock per wallet, taken in client_id order, the
wallet's orders applied in arrival order, one WAL flush for the lot.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from wallet.chain import LedgerKey
from wallet.database import Direct, Statement
from wallet.errors import BalanceCapExceeded, InsufficientFunds, WalletError
from wallet.events import (
    INSERT_EVENT,
    balance_low_sql,
    movement_data_sql,
    order_data_sql,
    settled_order_events_sql,
)
from wallet.idempotency import IdempotencyKey
from wallet.money import MAX_CENTS, from_cents
from wallet.reads import BALANCE, HELD_SQL, ORDER_COLUMNS, SETTLE_TARGET, OrderRow, no_wallet, settling


class EntryType(StrEnum):
    CREDIT = "CREDIT"
    DEBIT = "DEBIT"
    ORDER_DEDUCTION = "ORDER_DEDUCTION"
    ORDER_REFUND = "ORDER_REFUND"


# The time a movement writes: once its lock is held, never before the wallet's previous movement.
_MOVE_TIME = "greatest(stamp.at, wallets.updated_at)"


def _stamped(wallet_rows: str) -> str:
    """The CTEs `locked` (the wallet rows of `wallet_rows`, a FROM clause over `wallets`,
    locked) and `stamp` (the clock once they are: a CTE that locks is never inlined, so it runs
    to the end before `stamp` reads it). A movement's UPDATE joins `stamp`; no wallet, no row."""
    return f"""locked AS (
    SELECT wallets.client_id FROM {wallet_rows} FOR NO KEY UPDATE OF wallets
), stamp AS (
    SELECT clock_timestamp() AS at FROM locked
)"""


def _content_sql(type_: str, amount: str, delta: str, ref: str, desc: str) -> str:
    """The entry's content (`ledger_entry_content`, migration 0008: SQL twin of
    `chain.canonical_content`), evaluated against the wallet row *before* the update."""
    return (
        "ledger_entry_content(wallets.client_id, wallets.entry_count + 1, "
        f"{type_}, {amount}, wallets.balance, wallets.balance + {delta}, {ref}, {desc}, {_MOVE_TIME})"
    )


def _move_sql(type_: str, amount: str, delta: str, ref: str, desc: str) -> str:
    """The SET clause every movement shares: balance, entry counter, hash-chain head, time.
    The head is `ledger_chain_hash` (migration 0008): HMAC(key, previous head || content) from
    the padded keys of `LedgerKey`, the same function `ledger_place_orders` chains with."""
    content = _content_sql(type_, amount, delta, ref, desc)
    return f"""
        balance = wallets.balance + {delta},
        entry_count = wallets.entry_count + 1,
        head_hash = ledger_chain_hash(wallets.head_hash, {content},
                                      CAST(:ipad_key AS bytea), CAST(:opad_key AS bytea)),
        updated_at = {_MOVE_TIME}
    """


_P_TYPE, _P_AMOUNT, _P_DELTA = (
    "CAST(:type AS text)",
    "CAST(:amount AS bigint)",
    "CAST(:delta AS bigint)",
)
_P_REF, _P_DESC = "CAST(:ref AS text)", "CAST(:desc AS text)"

_INSERT_ENTRY = """
    INSERT INTO ledger_entries (client_id, entry_no, type, amount, balance_before, balance_after,
                                reference_id, description, created_at, hash, key_id)
"""

# Admin credit: refused if the balance plus money out for PENDING orders (which may come back
# as refunds) would pass the cap, so that a refund can never be refused later.
#
# Why no race lets a credit past the cap: only credits raise balance + pending, and credits of
# one client run one at a time, because _ENSURE_CLIENT locks the client row (ON CONFLICT DO
# UPDATE locks the row it conflicts with even when its WHERE is false). Orders and refunds move
# money between balance and pending, debits and completions lower the sum. So a check that holds
# on the snapshot this statement starts with still holds for whatever commits while it waits for
# the wallet row, however PostgreSQL re-reads that row. Keep that lock if _ENSURE_CLIENT changes.
_CREDIT = text(f"""
WITH {_stamped("wallets WHERE wallets.client_id = :client_id")}, moved AS (
    UPDATE wallets SET {_move_sql(_P_TYPE, _P_AMOUNT, _P_DELTA, _P_REF, _P_DESC)}
    FROM stamp
    WHERE client_id = :client_id
      AND wallets.balance + :delta + {HELD_SQL.format(client="wallets.client_id")} <= {MAX_CENTS}
    RETURNING client_id, entry_count, balance - :delta AS before, balance AS after,
              head_hash, updated_at, CAST(:amount AS bigint) AS amount
), emitted AS (
    {INSERT_EVENT}
    SELECT client_id, 'wallet.credited', {movement_data_sql("moved", "amountCredited")}, updated_at
    FROM moved
)
{_INSERT_ENTRY}
SELECT client_id, entry_count, :type, :amount, before, after, :ref, :desc, updated_at, head_hash,
       :key_id
FROM moved
RETURNING balance_before, balance_after, created_at
""")

_DEBIT = text(f"""
WITH {_stamped("wallets WHERE wallets.client_id = :client_id")}, moved AS (
    UPDATE wallets SET {_move_sql(_P_TYPE, _P_AMOUNT, _P_DELTA, _P_REF, _P_DESC)}
    FROM stamp
    WHERE client_id = :client_id AND wallets.balance >= :amount
    RETURNING client_id, entry_count, balance - :delta AS before, balance AS after,
              head_hash, updated_at, CAST(:amount AS bigint) AS amount
), emitted AS (
    {INSERT_EVENT}
    SELECT client_id, 'wallet.debited', {movement_data_sql("moved", "amountDebited")}, updated_at
    FROM moved
    UNION ALL {balance_low_sql("moved")}
)
{_INSERT_ENTRY}
SELECT client_id, entry_count, :type, :amount, before, after, :ref, :desc, updated_at, head_hash,
       :key_id
FROM moved
RETURNING balance_before, balance_after, created_at
""")

_PLACE_ORDER = text(f"""
WITH {_stamped("wallets WHERE wallets.client_id = :client_id")}, moved AS (
    UPDATE wallets SET {
    _move_sql("'ORDER_DEDUCTION'", _P_AMOUNT, "-" + _P_AMOUNT, "CAST(:order_id AS text)", _P_DESC)
}
    FROM stamp
    WHERE client_id = :client_id AND wallets.balance >= :amount
    RETURNING client_id, entry_count, balance + :amount AS before, balance AS after,
              head_hash, updated_at
), entry AS (
    {_INSERT_ENTRY}
    SELECT client_id, entry_count, 'ORDER_DEDUCTION', :amount, before, after, :order_id, :desc,
           updated_at, head_hash, :key_id
    FROM moved
), placed AS (
    INSERT INTO orders (order_id, client_id, amount, status, next_attempt_at, sent_by, request_id,
                        created_at, updated_at)
    SELECT :order_id, client_id, :amount, 'PENDING',
           updated_at + make_interval(secs => :lease_seconds),
           updated_at + make_interval(secs => :lease_seconds), CAST(:request_id AS text),
           updated_at, updated_at
    FROM moved
    RETURNING {ORDER_COLUMNS}
), emitted AS (
    {INSERT_EVENT}
    SELECT client_id, 'order.created', {order_data_sql("placed")}, created_at FROM placed
    UNION ALL {balance_low_sql("moved")}
)
SELECT {ORDER_COLUMNS} FROM placed
""")

# A batch of orders as one statement (group commit): `ledger_place_orders` (migration 0008)
# moves the money, chains the entries and inserts the orders; the events are written here, in
# the shapes the single statement writes them. Each input row comes back, in arrival order, with
# its outcome: placed (the order's columns), refused (the balance that refused it), no_wallet,
# or claimed (its Idempotency-Key is already taken: nothing happened).
_PLACE_ORDERS = Statement.of(
    text(f"""
WITH moved AS (
    SELECT r.ord, r.outcome, r.balance_before AS before, r.balance_after AS after, (r.placed).*
    FROM ledger_place_orders(
        CAST(:client_ids AS text[]), CAST(:order_ids AS text[]), CAST(:amounts AS bigint[]),
        CAST(:descriptions AS text[]), CAST(:request_ids AS text[]), CAST(:idem_callers AS text[]),
        CAST(:idem_keys AS text[]), CAST(:idem_fingerprints AS bytea[]),
        CAST(:idem_ttl_hours AS double precision), CAST(:lease_seconds AS double precision),
        CAST(:key_id AS text), CAST(:ipad_key AS bytea), CAST(:opad_key AS bytea)) AS r
), placed AS (
    SELECT * FROM moved WHERE outcome = 'placed'
), emitted AS (
    {INSERT_EVENT}
    SELECT client_id, 'order.created', {order_data_sql("placed")}, created_at FROM placed
    UNION ALL {balance_low_sql("placed")}
)
SELECT ord, outcome, before, {ORDER_COLUMNS} FROM moved ORDER BY ord
""")
)

_REFUND_ORDER = text(f"""
WITH {settling("orders WHERE orders.order_id = :order_id")}, failed AS (
    UPDATE orders
    SET status = 'FAILED', failure = :failure, next_attempt_at = NULL, needs_review = false,
        attempts = orders.attempts + :attempts, last_error = CAST(:detail AS text),
        resolved_by = CAST(:resolved_by AS text),
        resolved_at = CASE WHEN CAST(:resolved_by AS text) IS NULL THEN NULL ELSE clock_timestamp() END,
        resolution_note = CAST(:note AS text), updated_at = clock_timestamp()
    FROM target
    WHERE {SETTLE_TARGET}
    RETURNING {ORDER_COLUMNS}
), {_stamped("wallets JOIN failed ON wallets.client_id = failed.client_id")}, moved AS (
    UPDATE wallets
    SET {
    _move_sql(
        "'ORDER_REFUND'",
        "failed.amount",
        "failed.amount",
        "failed.order_id",
        "'Refund for failed order ' || failed.order_id",
    )
}
    FROM failed, stamp
    WHERE wallets.client_id = failed.client_id
    RETURNING wallets.client_id, wallets.entry_count, wallets.balance - failed.amount AS before,
              wallets.balance AS after, wallets.head_hash, wallets.updated_at,
              failed.amount, failed.order_id
), entry AS (
    {_INSERT_ENTRY}
    SELECT client_id, entry_count, 'ORDER_REFUND', amount, before, after, order_id,
           'Refund for failed order ' || order_id, updated_at, head_hash, :key_id
    FROM moved
), emitted AS (
    {INSERT_EVENT}
    {settled_order_events_sql("failed", "order.failed")}
)
SELECT {ORDER_COLUMNS} FROM failed
""")

_ENSURE_CLIENT = text("""
INSERT INTO clients (client_id, name, email) VALUES (:client_id, :name, :email)
ON CONFLICT (client_id) DO UPDATE
    SET name = coalesce(EXCLUDED.name, clients.name),
        email = coalesce(EXCLUDED.email, clients.email),
        updated_at = now()
    WHERE EXCLUDED.name IS NOT NULL OR EXCLUDED.email IS NOT NULL
""")
_ENSURE_WALLET = text("INSERT INTO wallets (client_id) VALUES (:client_id) ON CONFLICT DO NOTHING")


@dataclass(frozen=True, slots=True)
class Movement:
    client_id: str
    balance_before: int
    balance_after: int
    amount: int
    created_at: datetime


# The original service's words: an order is refused "for order", a debit plainly.
_INSUFFICIENT = "Insufficient wallet balance"
_INSUFFICIENT_FOR_ORDER = "Insufficient wallet balance for order"


def _insufficient(balance: int, amount: int, message: str = _INSUFFICIENT) -> InsufficientFunds:
    return InsufficientFunds(
        message,
        details={"balance": from_cents(balance), "requested": from_cents(amount)},
    )


async def _explain_refusal(
    conn: AsyncConnection, client_id: str, amount: int, message: str = _INSUFFICIENT
) -> None:
    """Cold path after a conditional UPDATE matched nothing: say which rule refused it."""
    row = (await conn.execute(BALANCE, {"client_id": client_id})).first()
    if row is None:
        raise no_wallet(client_id)
    raise _insufficient(row.balance, amount, message)


async def credit(
    conn: AsyncConnection,
    client_id: str,
    amount: int,
    *,
    key: LedgerKey,
    description: str | None = None,
    name: str | None = None,
    email: str | None = None,
) -> Movement:
    """Admin credit; creates the client and its wallet on first use."""
    await conn.execute(_ENSURE_CLIENT, {"client_id": client_id, "name": name, "email": email})
    await conn.execute(_ENSURE_WALLET, {"client_id": client_id})
    params = {
        "client_id": client_id,
        "type": EntryType.CREDIT.value,
        "amount": amount,
        "delta": amount,
        "ref": None,
        "desc": description,
        **key.sql_params(),
    }
    row = (await conn.execute(_CREDIT, params)).first()
    if row is None:
        raise BalanceCapExceeded(
            f"Credit would take the balance above {from_cents(MAX_CENTS)}",
            details={"maxBalance": from_cents(MAX_CENTS)},
        )
    return Movement(client_id, row.balance_before, row.balance_after, amount, row.created_at)


async def debit(
    conn: AsyncConnection,
    client_id: str,
    amount: int,
    *,
    key: LedgerKey,
    description: str | None = None,
) -> Movement:
    params = {
        "client_id": client_id,
        "type": EntryType.DEBIT.value,
        "amount": amount,
        "delta": -amount,
        "ref": None,
        "desc": description,
        **key.sql_params(),
    }
    row = (await conn.execute(_DEBIT, params)).first()
    if row is None:
        await _explain_refusal(conn, client_id, amount)
    assert row is not None
    return Movement(client_id, row.balance_before, row.balance_after, amount, row.created_at)


def _order_description(order_id: str) -> str:
    return f"Payment for order {order_id}"


@dataclass(frozen=True, slots=True)
class OrderPayment:
    """One order to pay for in a batch (`place_orders`)."""

    client_id: str
    order_id: str
    amount: int
    request_id: str | None
    idem: IdempotencyKey | None


# What `place_orders` answers for a payment whose Idempotency-Key was already taken: nothing
# happened; the single path (claim, replay) answers it.
KEY_TAKEN = None


async def place_orders(
    conn: Direct,
    payments: Sequence[OrderPayment],
    *,
    lease_seconds: float,
    idempotency_ttl_hours: float,
    key: LedgerKey,
) -> list[OrderRow | WalletError | None]:
    """`place_order` for many orders in one statement (group commit), each with its
    Idempotency-Key claimed in it: per payment, in order, the PENDING order, the error the
    single path would raise (InsufficientFunds, NotFound), or KEY_TAKEN."""
    params = {
        "client_ids": [p.client_id for p in payments],
        "order_ids": [p.order_id for p in payments],
        "amounts": [p.amount for p in payments],
        "descriptions": [_order_description(p.order_id) for p in payments],
        "request_ids": [p.request_id for p in payments],
        "idem_callers": [p.idem.caller if p.idem else None for p in payments],
        "idem_keys": [p.idem.key if p.idem else None for p in payments],
        "idem_fingerprints": [p.idem.fingerprint if p.idem else None for p in payments],
        "idem_ttl_hours": idempotency_ttl_hours,
        "lease_seconds": lease_seconds,
        **key.sql_params(),
    }
    results: list[OrderRow | WalletError | None] = []
    for payment, row in zip(payments, await conn.fetch(_PLACE_ORDERS, params), strict=True):
        if row["outcome"] == "placed":
            results.append(OrderRow.of(row))
        elif row["outcome"] == "refused":
            results.append(_insufficient(row["before"], payment.amount, _INSUFFICIENT_FOR_ORDER))
        elif row["outcome"] == "no_wallet":
            results.append(no_wallet(payment.client_id))
        else:
            results.append(KEY_TAKEN)
    return results


async def place_order(
    conn: AsyncConnection,
    *,
    client_id: str,
    order_id: str,
    amount: int,
    lease_seconds: float,
    request_id: str | None,
    key: LedgerKey,
) -> OrderRow:
    """Take the amount, insert the PENDING order with its lease, write ORDER_DEDUCTION."""
    params = {
        "client_id": client_id,
        "order_id": order_id,
        "amount": amount,
        "desc": _order_description(order_id),
        "lease_seconds": lease_seconds,
        "request_id": request_id,
        **key.sql_params(),
    }
    row = (await conn.execute(_PLACE_ORDER, params)).first()
    if row is None:
        await _explain_refusal(conn, client_id, amount, _INSUFFICIENT_FOR_ORDER)
    assert row is not None
    return OrderRow.of(row)


async def refund_order(
    conn: AsyncConnection,
    order_id: str,
    *,
    failure: str,
    attempts: int,
    key: LedgerKey,
    detail: str | None = None,
    resolved_by: str | None = None,
    note: str | None = None,
) -> OrderRow | None:
    """Mark a PENDING order FAILED and put its money back, or None if it is no longer PENDING
    (another process, or an operator, finished it first)."""
    params = {
        "order_id": order_id,
        "failure": failure,
        "attempts": attempts,
        "detail": detail,
        "resolved_by": resolved_by,
        "note": note,
        **key.sql_params(),
    }
    row = (await conn.execute(_REFUND_ORDER, params)).first()
    return None if row is None else OrderRow.of(row)
