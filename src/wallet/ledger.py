"""Every SQL statement that changes a balance lives here, and nowhere else.

Each movement is one statement: a conditional `UPDATE wallets ... RETURNING` (the row lock is
held only for that statement's duration inside its transaction) feeding the ledger INSERT
through a CTE. The same UPDATE advances the wallet's hash chain, so the entry's hash is computed
in the database from the previous head without a second round trip:

    hash = HMAC-SHA256(LEDGER_KEY, previous_hash || canonical_content(entry))

written out in plain SQL (no extension) as sha256(opad_key || sha256(ipad_key || message)),
with the two padded keys computed here and sent as parameters: the key never reaches a table.
The content and the chain step are SQL functions (`ledger_entry_content`, `ledger_chain_hash`,
migration 0008) that every statement here calls, one definition for single movements and batches.
Each entry names its key (`key_id`) so keys can rotate; entries written before migration 0003
have no key id and an unkeyed sha256(previous_hash || content). `chain_hash` is the Python twin
of both; `wallet verify` recomputes them.

An entry's time is `greatest(statement_timestamp(), wallets.updated_at)`, the previous entry's
time re-read after the row lock is granted: a movement that waited for the lock can never be
stamped earlier than the one it waited for, and `updated_at` never goes back.

Each statement also writes the events its change means (`events`: wallet.credited,
wallet.debited, order.created, order.failed, order.resolved, balance.low) through one more CTE,
in the same statement: an event exists exactly when its change committed, at no extra round trip.

Group commit: `place_orders` pays for a batch of orders in one statement through
`ledger_place_orders` (migration 0008): one row lock per wallet, taken in client_id order, the
wallet's orders applied in arrival order, one WAL flush for the lot.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from wallet.errors import BalanceCapExceeded, InsufficientFunds, NotFound, WalletError
from wallet.events import (
    INSERT_EVENT,
    balance_low_sql,
    movement_data_sql,
    order_data_sql,
    settled_order_events_sql,
)
from wallet.idempotency import IdempotencyKey
from wallet.money import MAX_CENTS, from_cents

GENESIS_HASH = bytes(32)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class EntryType(StrEnum):
    CREDIT = "CREDIT"
    DEBIT = "DEBIT"
    ORDER_DEDUCTION = "ORDER_DEDUCTION"
    ORDER_REFUND = "ORDER_REFUND"


def canonical_content(
    *,
    client_id: str,
    entry_no: int,
    type: str,
    amount: int,
    balance_before: int,
    balance_after: int,
    reference_id: str | None,
    description: str | None,
    created_at: datetime,
) -> bytes:
    """Length-prefixed text fields keep the encoding unambiguous whatever they contain."""
    micros = (created_at - _EPOCH) // timedelta(microseconds=1)
    parts = [
        client_id,
        str(entry_no),
        type,
        str(amount),
        str(balance_before),
        str(balance_after),
        str(-1 if reference_id is None else len(reference_id)),
        reference_id or "",
        str(-1 if description is None else len(description)),
        description or "",
        str(micros),
    ]
    return "|".join(parts).encode()


KEY_ID_PATTERN = r"^[A-Za-z0-9_.-]{1,32}$"
_BLOCK = 64  # SHA-256 block size, for HMAC's padded keys


@dataclass(frozen=True, slots=True)
class LedgerKey:
    """The chain's HMAC key (`LEDGER_KEY`, id `LEDGER_KEY_ID`) and the retired keys that older
    entries were written with (`LEDGER_OLD_KEYS`). Built once from settings; never stored."""

    key_id: str
    secret: bytes = field(repr=False)
    old: Mapping[str, bytes] = field(default_factory=dict, repr=False)
    _params: dict[str, Any] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # What a movement statement needs to compute HMAC in SQL: the key id and the key padded
        # and XORed with HMAC's ipad and opad (RFC 2104). Computed once.
        key = self.secret if len(self.secret) <= _BLOCK else hashlib.sha256(self.secret).digest()
        key = key.ljust(_BLOCK, b"\0")
        params = {
            "key_id": self.key_id,
            "ipad_key": bytes(b ^ 0x36 for b in key),
            "opad_key": bytes(b ^ 0x5C for b in key),
        }
        object.__setattr__(self, "_params", params)

    def secret_for(self, key_id: str) -> bytes | None:
        return self.secret if key_id == self.key_id else self.old.get(key_id)

    def sql_params(self) -> dict[str, Any]:
        return self._params


def chain_hash(previous: bytes, content: bytes, secret: bytes | None) -> bytes:
    """An entry's hash: HMAC-SHA256 with its key, or plain SHA-256 for a legacy (pre-0003) one."""
    if secret is None:
        return hashlib.sha256(previous + content).digest()
    return hmac.digest(secret, previous + content, "sha256")


# The time a movement writes: never before the wallet's previous movement (see module doc).
_MOVE_TIME = "greatest(statement_timestamp(), wallets.updated_at)"


def _content_sql(type_: str, amount: str, delta: str, ref: str, desc: str) -> str:
    """The entry's content (`ledger_entry_content`, migration 0008: SQL twin of
    `canonical_content`), evaluated against the wallet row *before* the update."""
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

# Money out of the wallet for orders whose outcome is not known yet (orders_pending_client).
HELD_SQL = (
    "(SELECT coalesce(sum(o.amount), 0)::bigint FROM orders o"
    " WHERE o.client_id = {client} AND o.status = 'PENDING')"
)

# What every reader of an order gets: the client's view and the operator's.
ORDER_COLUMNS = """order_id, client_id, amount, status, fulfillment_id, failure, attempts,
    resolver_attempts, next_attempt_at, sent_by, last_error, needs_review, flagged_at, resolved_by,
    resolved_at, resolution_note, created_at, updated_at"""

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
WITH moved AS (
    UPDATE wallets SET {_move_sql(_P_TYPE, _P_AMOUNT, _P_DELTA, _P_REF, _P_DESC)}
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
WITH moved AS (
    UPDATE wallets SET {_move_sql(_P_TYPE, _P_AMOUNT, _P_DELTA, _P_REF, _P_DESC)}
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
WITH moved AS (
    UPDATE wallets SET {
    _move_sql("'ORDER_DEDUCTION'", _P_AMOUNT, "-" + _P_AMOUNT, "CAST(:order_id AS text)", _P_DESC)
}
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
_PLACE_ORDERS = text(f"""
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

_REFUND_ORDER = text(f"""
WITH failed AS (
    UPDATE orders
    SET status = 'FAILED', failure = :failure, next_attempt_at = NULL, needs_review = false,
        attempts = orders.attempts + :attempts, last_error = CAST(:detail AS text),
        resolved_by = CAST(:resolved_by AS text),
        resolved_at = CASE WHEN CAST(:resolved_by AS text) IS NULL THEN NULL ELSE clock_timestamp() END,
        resolution_note = CAST(:note AS text), updated_at = clock_timestamp()
    WHERE order_id = :order_id AND status = 'PENDING'
    RETURNING {ORDER_COLUMNS}
), moved AS (
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
    FROM failed
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
_BALANCE = text("SELECT balance, updated_at FROM wallets WHERE client_id = :client_id")
_BALANCE_COLUMNS = f"balance, updated_at, {HELD_SQL.format(client='wallets.client_id')} AS held, client_id"
# One wallet's read, as the bench's raw-SQL ceiling runs it; the service reads in batches:
# every balance read of one event-loop pass in one query (`balances`).
_BALANCE_HELD = text(f"SELECT {_BALANCE_COLUMNS} FROM wallets WHERE client_id = :client_id")
_BALANCES = text(f"SELECT {_BALANCE_COLUMNS} FROM wallets WHERE client_id = ANY(CAST(:client_ids AS text[]))")


@dataclass(frozen=True, slots=True)
class Movement:
    client_id: str
    balance_before: int
    balance_after: int
    amount: int
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Balance:
    client_id: str
    balance: int
    updated_at: datetime
    held: int  # in PENDING orders: out of the balance until their outcome is known


def _insufficient(balance: int, amount: int) -> InsufficientFunds:
    return InsufficientFunds(
        "Insufficient wallet balance",
        details={"balance": from_cents(balance), "requested": from_cents(amount)},
    )


def _no_wallet(client_id: str) -> NotFound:
    return NotFound(f"Wallet not found for client {client_id}", code="CLIENT_NOT_FOUND")


async def _explain_refusal(conn: AsyncConnection, client_id: str, amount: int) -> None:
    """Cold path after a conditional UPDATE matched nothing: say which rule refused it."""
    row = (await conn.execute(_BALANCE, {"client_id": client_id})).first()
    if row is None:
        raise _no_wallet(client_id)
    raise _insufficient(row.balance, amount)


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
        return cls(*(getattr(row, name) for name in cls.__slots__))


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
    conn: AsyncConnection,
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
    for payment, row in zip(payments, (await conn.execute(_PLACE_ORDERS, params)).all(), strict=True):
        if row.outcome == "placed":
            results.append(OrderRow.of(row))
        elif row.outcome == "refused":
            results.append(_insufficient(row.before, payment.amount))
        elif row.outcome == "no_wallet":
            results.append(_no_wallet(payment.client_id))
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
        await _explain_refusal(conn, client_id, amount)
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


async def balances(conn: AsyncConnection, client_ids: Sequence[str]) -> list[Balance | NotFound]:
    """Each wallet's balance and held money, in the order asked, from one query."""
    rows = (await conn.execute(_BALANCES, {"client_ids": list(set(client_ids))})).all()
    found = {row.client_id: Balance(row.client_id, row.balance, row.updated_at, row.held) for row in rows}
    return [found.get(client_id) or _no_wallet(client_id) for client_id in client_ids]
