"""Statements (SPEC §6): a wallet's opening and closing balance, totals and entries for a period,
and their JSON and CSV shapes; and its balance at any past moment. The HTTP answer (which shape,
the attachment's name) is `http/statements.py`'s.

Boundaries: `from` is inclusive and `to` exclusive, so consecutive periods never share or miss
an entry, and "the balance at T" is the balance after every entry written before T: the
closing balance of a statement to T and the opening balance of one from T. Before a wallet's
first entry it is 0; a moment in the future gives the balance now.

Every figure is an index range scan of `ledger_client_time (client_id, created_at, entry_no)`
(ledger times never go back within a wallet, so time order is entry order): one probe for each
balance, one scan of the period's entries, all in one snapshot. A statement costs what its
period holds, never what the wallet's whole history holds. A period of more than
STATEMENT_MAX_ENTRIES entries is refused (400 STATEMENT_TOO_LARGE, narrow the period), so no
request reads an unbounded range and a statement is never silently cut short.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import text

from wallet.database import Connector
from wallet.errors import BadRequest, ClientNotFound
from wallet.money import from_cents
from wallet.wire import iso

STATEMENT_MAX_ENTRIES = 10_000
CSV_TYPE = "text/csv"

_COLUMNS = "id, entry_no, type, amount, balance_before, balance_after, reference_id, description, created_at"
# "Until now" is the snapshot's moment to the millisecond, as shown (`wire.parse_time`).
_NOW = text(
    "SELECT date_trunc('milliseconds', now()) AS now,"
    " EXISTS (SELECT 1 FROM wallets WHERE client_id = :client_id) AS known"
)
# The balance after the last entry written before a moment (0 before the first entry).
BALANCE_BEFORE_SQL = text("""
SELECT balance_after FROM ledger_entries
WHERE client_id = :client_id AND created_at < :at
ORDER BY created_at DESC, entry_no DESC LIMIT 1
""")
ENTRIES_SQL = text(f"""
SELECT {_COLUMNS} FROM ledger_entries
WHERE client_id = :client_id AND created_at >= :start AND created_at < :end
ORDER BY created_at, entry_no LIMIT :limit
""")
_BEGINNING = datetime.min.replace(tzinfo=UTC)  # before any entry


@dataclass(frozen=True, slots=True)
class Statement:
    client_id: str
    start: datetime | None
    end: datetime
    opening: int
    closing: int
    totals: dict[str, int]
    entries: list[Any]


async def statement(
    snapshots: Connector, client_id: str, start: datetime | None, end: datetime | None
) -> Statement:
    """One snapshot (`database.snapshot`, on the replica when there is one), so the balances,
    totals and entries agree with each other."""
    if start is not None and end is not None and start > end:
        raise BadRequest("from must not be after to", code="INVALID_PERIOD")
    async with snapshots.connect() as conn:
        now = (await conn.execute(_NOW, {"client_id": client_id})).one()
        if not now.known:
            raise ClientNotFound(f"Wallet not found for client {client_id}")
        upper = end if end is not None else now.now
        lower = start if start is not None else _BEGINNING
        params = {"client_id": client_id, "start": lower, "end": upper}
        rows = (await conn.execute(ENTRIES_SQL, {**params, "limit": STATEMENT_MAX_ENTRIES + 1})).all()
        if len(rows) > STATEMENT_MAX_ENTRIES:
            raise BadRequest(
                f"The period holds more than {STATEMENT_MAX_ENTRIES:,} entries: ask for a shorter one",
                code="STATEMENT_TOO_LARGE",
                details={"maxEntries": STATEMENT_MAX_ENTRIES},
            )
        opening = (await conn.execute(BALANCE_BEFORE_SQL, {"client_id": client_id, "at": lower})).scalar()
        closing = (await conn.execute(BALANCE_BEFORE_SQL, {"client_id": client_id, "at": upper})).scalar()
    totals: dict[str, int] = {}
    for row in rows:
        totals[row.type] = totals.get(row.type, 0) + row.amount
    return Statement(client_id, start, upper, opening or 0, closing or 0, totals, list(rows))


_SHOWN_PRECISION = timedelta(milliseconds=1)  # `at` covers its whole millisecond (wire.parse_time)


async def balance_at(reads: Connector, primary: Connector, client_id: str, at: datetime) -> int:
    """The balance after every entry dated at or before `at` as the API shows times (to the
    millisecond): `at` a balance's `lastUpdated`, or an entry's `createdAt`, gives the balance
    shown then. (A statement's `to` is exclusive instead, so periods never share an entry.)

    A past moment is history, read where history is read (`reads`: the replica when there is
    one). A moment not yet past asks for the balance now, which must show the client's own last
    write (a balance right after an order): the primary."""
    async with (reads if at < datetime.now(UTC) else primary).connect() as conn:
        known = (await conn.execute(_NOW, {"client_id": client_id})).one().known
        if not known:
            raise ClientNotFound(f"Wallet not found for client {client_id}")
        params = {"client_id": client_id, "at": at + _SHOWN_PRECISION}
        value = (await conn.execute(BALANCE_BEFORE_SQL, params)).scalar()
    return int(value or 0)


def entry_json(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "entryNo": row.entry_no,
        "type": row.type,
        "amount": from_cents(row.amount),
        "balanceBefore": from_cents(row.balance_before),
        "balanceAfter": from_cents(row.balance_after),
        "referenceId": row.reference_id,
        "description": row.description,
        "createdAt": iso(row.created_at),
    }


def statement_json(st: Statement) -> dict[str, Any]:
    return {
        "clientId": st.client_id,
        "from": iso(st.start) if st.start is not None else None,
        "to": iso(st.end),
        "openingBalance": from_cents(st.opening),
        "closingBalance": from_cents(st.closing),
        "totals": {kind: from_cents(amount) for kind, amount in sorted(st.totals.items())},
        "entries": [entry_json(row) for row in st.entries],
    }


def decimal_text(cents: int) -> str:
    """Exact, from integer cents: `1234.50`, no separators, so a spreadsheet reads a number."""
    sign = "-" if cents < 0 else ""
    whole, part = divmod(abs(cents), 100)
    return f"{sign}{whole}.{part:02d}"


_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: str) -> str:
    """A cell a spreadsheet shows as text, never runs: one starting like a formula gets a `'`
    in front (OWASP's advice for CSV injection)."""
    return "'" + value if value.startswith(_FORMULA_STARTS) else value


CSV_HEADER = [
    "entryNo",
    "createdAt",
    "type",
    "amount",
    "balanceBefore",
    "balanceAfter",
    "referenceId",
    "description",
]


def statement_csv(st: Statement) -> bytes:
    """UTF-8 with a byte-order mark (so spreadsheets do not guess another encoding), a header
    row, then the period's opening balance, one row per entry and its closing balance, each
    balance a row of its own type (`OPENING_BALANCE`, `CLOSING_BALANCE`) at the period's bound,
    so a file alone says what the JSON says. Amounts are exact decimals; every text cell is
    escaped."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_HEADER)
    start = "" if st.start is None else iso(st.start)
    writer.writerow(["", start, "OPENING_BALANCE", "", "", decimal_text(st.opening), "", ""])
    for row in st.entries:
        writer.writerow(
            [
                str(row.entry_no),
                iso(row.created_at),
                csv_cell(row.type),
                decimal_text(row.amount),
                decimal_text(row.balance_before),
                decimal_text(row.balance_after),
                csv_cell(row.reference_id or ""),
                csv_cell(row.description or ""),
            ]
        )
    writer.writerow(["", iso(st.end), "CLOSING_BALANCE", "", "", decimal_text(st.closing), "", ""])
    return "\ufeff".encode() + out.getvalue().encode()
