"""Proof that the ledger was not edited: recompute every wallet from its entries.

For each wallet, in entry order: entry numbers are 1, 2, 3...; each entry's balance_before is
the previous balance_after (0 for the first); after = before +/- amount as its type says; its
hash is sha256(previous hash || canonical content); and the wallet's balance, entry count and
head hash are what the last entry says. The database refuses UPDATE/DELETE on the ledger, so an
edit means someone disabled that trigger: this finds what they changed, and says if the trigger
is off now.

Wallets and entries are streamed in (client_id, entry_no) order with server-side cursors and
merged in Python, so memory stays constant however large the ledger is.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from wallet.ledger import GENESIS_HASH, canonical_content, chain_hash

_SIGN = {"CREDIT": 1, "ORDER_REFUND": 1, "DEBIT": -1, "ORDER_DEDUCTION": -1}
_BATCH = 5000

_WALLETS = text("SELECT client_id, balance, entry_count, head_hash FROM wallets ORDER BY client_id")
_ENTRIES = text("""
SELECT id, client_id, entry_no, type, amount, balance_before, balance_after, reference_id,
       description, created_at, hash
FROM ledger_entries ORDER BY client_id, entry_no
""")
_ENABLED_TRIGGERS = text("""
SELECT t.tgname FROM pg_trigger t
WHERE t.tgrelid = 'ledger_entries'::regclass AND NOT t.tgisinternal AND t.tgenabled <> 'D'
""")
_EXPECTED_TRIGGERS = {"ledger_no_update_delete", "ledger_no_truncate"}


@dataclass(frozen=True, slots=True)
class Fault:
    client_id: str | None
    entry_no: int | None
    ledger_id: int | None
    reason: str

    def describe(self) -> str:
        where = self.client_id or "database"
        if self.entry_no is not None:
            where += f" entry {self.entry_no} (ledger id {self.ledger_id})"
        return f"{where}: {self.reason}"


@dataclass
class Verdict:
    wallets: int = 0
    entries: int = 0
    faults: list[Fault] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.faults

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "wallets": self.wallets,
            "entries": self.entries,
            "faults": [
                {
                    "clientId": f.client_id,
                    "entryNo": f.entry_no,
                    "ledgerId": f.ledger_id,
                    "reason": f.reason,
                }
                for f in self.faults
            ],
        }


async def _rows(conn: AsyncConnection, query: Any) -> AsyncIterator[Any]:
    result = await conn.stream(query.execution_options(yield_per=_BATCH))
    async for row in result:
        yield row


def _check_entry(row: Any, expected_no: int, before: int, previous_hash: bytes) -> str | None:
    if row.entry_no != expected_no:
        return f"expected entry {expected_no} here, found {row.entry_no}: entries were removed"
    if row.balance_before != before:
        return f"balance before is {row.balance_before}, the previous entry left {before}"
    if row.amount <= 0 or row.balance_after != row.balance_before + _SIGN[row.type] * row.amount:
        return f"{row.type} of {row.amount} cannot take {row.balance_before} to {row.balance_after}"
    content = canonical_content(
        client_id=row.client_id,
        entry_no=row.entry_no,
        type=row.type,
        amount=row.amount,
        balance_before=row.balance_before,
        balance_after=row.balance_after,
        reference_id=row.reference_id,
        description=row.description,
        created_at=row.created_at,
    )
    if chain_hash(previous_hash, content) != bytes(row.hash):
        return "hash mismatch: the entry was changed after it was written"
    return None


async def verify_ledger(engine: AsyncEngine, progress: Callable[[Verdict], None] | None = None) -> Verdict:
    verdict = Verdict()
    async with engine.connect() as triggers_conn:
        enabled = set((await triggers_conn.execute(_ENABLED_TRIGGERS)).scalars())
    for missing in sorted(_EXPECTED_TRIGGERS - enabled):
        verdict.faults.append(
            Fault(None, None, None, f"append-only trigger {missing} is missing or disabled")
        )
    async with engine.connect() as wallets_conn, engine.connect() as entries_conn:
        entries = _rows(entries_conn, _ENTRIES)
        pending = await anext(entries, None)
        async for wallet in _rows(wallets_conn, _WALLETS):
            verdict.wallets += 1
            before, previous_hash, count, fault = 0, GENESIS_HASH, 0, None
            while pending is not None and pending.client_id == wallet.client_id:
                count += 1
                verdict.entries += 1
                if fault is None:
                    reason = _check_entry(pending, count, before, previous_hash)
                    if reason is not None:
                        fault = Fault(wallet.client_id, pending.entry_no, pending.id, reason)
                    count = pending.entry_no
                    before, previous_hash = pending.balance_after, bytes(pending.hash)
                if progress is not None and verdict.entries % _BATCH == 0:
                    progress(verdict)
                pending = await anext(entries, None)
            if fault is None:
                if wallet.balance != before:
                    fault = Fault(
                        wallet.client_id,
                        None,
                        None,
                        f"balance is {wallet.balance}, the ledger adds up to {before}",
                    )
                elif wallet.entry_count != count or bytes(wallet.head_hash) != previous_hash:
                    fault = Fault(
                        wallet.client_id,
                        None,
                        None,
                        "the wallet's entry count or head hash differs from its ledger",
                    )
            if fault is not None:
                verdict.faults.append(fault)
    return verdict
