"""Proof that the ledger was not edited: recompute every wallet from its entries, check the
orders against them, and test that the database really refuses to change the ledger.

Everything is read in one REPEATABLE READ, READ ONLY transaction: one snapshot, so money moving
while verify runs is never mistaken for a fault. Wallets and entries are streamed in
(client_id, entry_no) order with server-side cursors and merged here, so memory stays constant
however large the ledger is; the order checks are aggregate queries that return faults only.

Checks, per wallet in entry order: entry numbers 1, 2, 3... without gaps; a known type with a
positive amount, and after = before +/- amount as the type says; each balance_before is the
previous balance_after (0 first); times never go back; each hash is the HMAC-SHA256 of the
entry with the key its key_id names (or, for entries written before migration 0003 only, the
unkeyed SHA-256), chained from the previous entry's hash; the wallet's balance, entry count and
head hash are what its last entry says. Across tables: no entries without a wallet; every
order has exactly one ORDER_DEDUCTION of its client and amount, a FAILED order exactly one
ORDER_REFUND after it and others none; no ORDER_* entry names a missing order. And the
append-only protection: UPDATE and DELETE of an entry are refused (tried, then rolled back),
both triggers exist as created, fire for ordinary sessions, on every event, with the original
function; no role or database setting turns ordinary sessions into replicas.

With a digest (`take_digest`, stored outside the database), also: every wallet in it still has
the entry at its entry count with its hash, and every entry after it is keyed.
"""

from __future__ import annotations

import contextlib
import hmac
import json
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from wallet.chain import GENESIS_HASH, LedgerKey, canonical_content, chain_hash
from wallet.wire import iso

_SIGN = {"CREDIT": 1, "ORDER_REFUND": 1, "DEBIT": -1, "ORDER_DEDUCTION": -1}
_BATCH = 5000

_WALLETS = text("SELECT client_id, balance, entry_count, head_hash FROM wallets ORDER BY client_id")
_ENTRIES = text("""
SELECT id, client_id, entry_no, type, amount, balance_before, balance_after, reference_id,
       description, created_at, hash, key_id
FROM ledger_entries ORDER BY client_id, entry_no
""")
# Entries whose wallet is gone (possible only with foreign keys bypassed): reported under their
# own client id, and left out of the merge so that no other wallet is blamed for them.
_ORPHAN_ENTRIES = text("""
SELECT client_id, count(*) AS entries, min(id) AS first_id FROM ledger_entries e
WHERE NOT EXISTS (SELECT 1 FROM wallets w WHERE w.client_id = e.client_id)
GROUP BY client_id
""")
_LEGACY_UNTIL = text("SELECT legacy_until_id FROM ledger_keying")
# Orders against their entries: only the orders that break a rule come back.
_ORDER_FAULTS = text("""
SELECT o.order_id, o.client_id, o.status,
       count(e.id) FILTER (WHERE e.type = 'ORDER_DEDUCTION') AS deductions,
       count(e.id) FILTER (WHERE e.type = 'ORDER_REFUND') AS refunds,
       count(e.id) FILTER (WHERE e.client_id <> o.client_id OR e.amount <> o.amount) AS mismatched,
       min(e.entry_no) FILTER (WHERE e.type = 'ORDER_DEDUCTION') AS deduction_no,
       max(e.entry_no) FILTER (WHERE e.type = 'ORDER_REFUND') AS refund_no
FROM orders o
LEFT JOIN ledger_entries e
       ON e.reference_id = o.order_id AND e.type IN ('ORDER_DEDUCTION', 'ORDER_REFUND')
GROUP BY o.client_id, o.id
HAVING count(e.id) FILTER (WHERE e.type = 'ORDER_DEDUCTION') <> 1
    OR count(e.id) FILTER (WHERE e.type = 'ORDER_REFUND') <> (o.status = 'FAILED')::int
    OR count(e.id) FILTER (WHERE e.client_id <> o.client_id OR e.amount <> o.amount) > 0
    OR max(e.entry_no) FILTER (WHERE e.type = 'ORDER_REFUND')
       < min(e.entry_no) FILTER (WHERE e.type = 'ORDER_DEDUCTION')
ORDER BY o.client_id, o.id
""")
_ENTRIES_WITHOUT_ORDER = text("""
SELECT e.id, e.client_id, e.entry_no, e.type, e.reference_id FROM ledger_entries e
WHERE e.type IN ('ORDER_DEDUCTION', 'ORDER_REFUND')
  AND NOT EXISTS (SELECT 1 FROM orders o WHERE o.order_id = e.reference_id)
ORDER BY e.client_id, e.entry_no
""")

# --- The append-only protection, as migration 0001 created it ----------------------------------
_GUARD_FUNCTION = "ledger_is_append_only"
_GUARD_BODY = """
BEGIN
    RAISE EXCEPTION 'ledger_entries is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
"""
# pg_trigger.tgtype bits: ROW 1, BEFORE 2, INSERT 4, DELETE 8, UPDATE 16, TRUNCATE 32.
_GUARDS = {"ledger_no_update_delete": 1 | 2 | 8 | 16, "ledger_no_truncate": 2 | 32}
_TRIGGERS = text("""
SELECT t.tgname, t.tgenabled::text AS tgenabled, t.tgtype, t.tgqual IS NOT NULL AS has_when,
       t.tgattr::text <> '' AS has_columns, p.proname, l.lanname, p.prosrc
FROM pg_trigger t
JOIN pg_proc p ON p.oid = t.tgfoid
JOIN pg_language l ON l.oid = p.prolang
WHERE t.tgrelid = 'ledger_entries'::regclass AND NOT t.tgisinternal
""")
# Triggers enabled as 'O' (origin, the default) do not fire in sessions whose
# session_replication_role is replica: a role or database default can make every session one.
_REPLICA_DEFAULTS = text("""
SELECT coalesce(r.rolname, 'every role') AS role, coalesce(d.datname, 'every database') AS db, c
FROM pg_db_role_setting s
LEFT JOIN pg_roles r ON r.oid = s.setrole
LEFT JOIN pg_database d ON d.oid = s.setdatabase
CROSS JOIN LATERAL unnest(s.setconfig) AS c
WHERE (s.setdatabase = 0 OR d.datname = current_database())
  AND lower(c) LIKE 'session_replication_role=%' AND lower(c) <> 'session_replication_role=origin'
""")
_SESSION_ROLE = text("SELECT setting, reset_val FROM pg_settings WHERE name = 'session_replication_role'")
_NEWEST_ENTRY = text("SELECT id FROM ledger_entries ORDER BY id DESC LIMIT 1")
_PROBES = {
    "UPDATE": text("UPDATE ledger_entries SET description = description WHERE id = :id"),
    "DELETE": text("DELETE FROM ledger_entries WHERE id = :id"),
}


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


# --- Digest ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Head:
    entry_count: int
    head_hash: bytes


@dataclass(frozen=True, slots=True)
class Digest:
    """`GET /admin/ledger/digest`'s data: every chain head at one moment, MACed with the key."""

    taken_at: str
    key_id: str
    heads: Mapping[str, Head]
    mac: str

    @classmethod
    def parse(cls, data: Any) -> Digest:
        """From the JSON shape `take_digest` returns; ValueError if it is not that shape."""
        try:
            heads = {
                w["clientId"]: Head(int(w["entryCount"]), bytes.fromhex(w["headHash"]))
                for w in data["wallets"]
            }
            return cls(str(data["takenAt"]), str(data["keyId"]), heads, str(data["digest"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a ledger digest: {exc!r}") from None


def _digest_mac(secret: bytes, taken_at: str, heads: Mapping[str, Head]) -> str:
    """HMAC over the moment and every head, one line each in client order: the file proves
    itself to whoever holds the key, and no one without it can edit it."""
    mac = hmac.new(secret, f"wallet-ledger-digest-v1\n{taken_at}\n".encode(), "sha256")
    for client_id in sorted(heads):
        head = heads[client_id]
        mac.update(f"{client_id}\t{head.entry_count}\t{head.head_hash.hex()}\n".encode())
    return mac.hexdigest()


@contextlib.asynccontextmanager
async def _snapshot(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """One REPEATABLE READ, READ ONLY transaction: every query in it sees the same moment."""
    async with engine.connect() as conn:
        await conn.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
        async with conn.begin():
            yield conn


async def take_digest(engine: AsyncEngine, key: LedgerKey) -> dict[str, Any]:
    """Every wallet's entry count and head hash in one snapshot, with an overall HMAC.
    Shape: {version, takenAt, keyId, walletCount, entryCount, wallets: [{clientId,
    entryCount, headHash}], digest}; wallets without entries are left out."""
    async with _snapshot(engine) as conn:
        taken_at = iso(await conn.scalar(text("SELECT transaction_timestamp()")))
        heads: dict[str, Head] = {}
        async for row in _rows(conn, _WALLETS):
            if row.entry_count > 0:
                heads[row.client_id] = Head(row.entry_count, bytes(row.head_hash))
    return {
        "version": 1,
        "takenAt": taken_at,
        "keyId": key.key_id,
        "walletCount": len(heads),
        "entryCount": sum(h.entry_count for h in heads.values()),
        "wallets": [
            {"clientId": c, "entryCount": h.entry_count, "headHash": h.head_hash.hex()}
            for c, h in heads.items()
        ],
        "digest": _digest_mac(key.secret, taken_at, heads),
    }


def load_digest(path: str) -> Digest:
    with open(path, encoding="utf-8") as source:
        return Digest.parse(json.load(source))


# --- Verify ------------------------------------------------------------------------------------


async def _rows(conn: AsyncConnection, query: Any) -> AsyncIterator[Any]:
    """Rows from a server-side cursor, fetched a batch per round trip (and per greenlet switch:
    one switch per row cost more than the HMAC)."""
    result = await conn.stream(query.execution_options(yield_per=_BATCH))
    async for batch in result.partitions():
        for row in batch:
            yield row


@dataclass
class _Chain:
    """Where one wallet's walk through its entries stands."""

    count: int = 0
    before: int = 0
    previous_hash: bytes = GENESIS_HASH
    previous_time: datetime | None = None
    keyed: bool = False
    fault: Fault | None = None


def _check_entry(
    row: Any, chain: _Chain, key: LedgerKey, legacy_until: int, head: Head | None, keyed_after: int | None
) -> str | None:
    """Why this entry breaks its wallet's chain, or None."""
    if row.entry_no != chain.count:
        return f"expected entry {chain.count} here, found {row.entry_no}: entries were removed"
    if row.type not in _SIGN:
        return f"unknown type {row.type}"
    if row.balance_before != chain.before:
        return f"balance before is {row.balance_before}, the previous entry left {chain.before}"
    if row.amount <= 0 or row.balance_after != row.balance_before + _SIGN[row.type] * row.amount:
        return f"{row.type} of {row.amount} cannot take {row.balance_before} to {row.balance_after}"
    if chain.previous_time is not None and row.created_at < chain.previous_time:
        return f"time {row.created_at.isoformat()} is before the previous entry's"
    if row.key_id is None:
        # Legacy only under an id a pre-0003 entry had: identity ids start at 1, and a forger who
        # picks the id (OVERRIDING SYSTEM VALUE) must not pass for one with 0 or below.
        legacy = 1 <= row.id <= legacy_until
        if chain.keyed or not legacy or (keyed_after is not None and row.entry_no > keyed_after):
            return "unkeyed hash on an entry written since the ledger was keyed"
        secret = None
    else:
        secret = key.secret_for(row.key_id)
        if secret is None:
            return f"signed with key id {row.key_id}, which is neither LEDGER_KEY_ID nor in LEDGER_OLD_KEYS"
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
    if not hmac.compare_digest(chain_hash(chain.previous_hash, content, secret), bytes(row.hash)):
        return "hash mismatch: the entry was changed after it was written"
    if head is not None and row.entry_no == head.entry_count and bytes(row.hash) != head.head_hash:
        return "hash differs from the digest: the entry or one before it was replaced since"
    return None


def _check_wallet(wallet: Any, chain: _Chain, head: Head | None) -> str | None:
    if head is not None and chain.count < head.entry_count:
        return f"the digest saw {head.entry_count} entries, {chain.count} are left: entries were removed"
    if wallet.balance != chain.before:
        return f"balance is {wallet.balance}, the ledger adds up to {chain.before}"
    if wallet.entry_count != chain.count or bytes(wallet.head_hash) != chain.previous_hash:
        return "the wallet's entry count or head hash differs from its ledger"
    return None


async def _verify_chains(
    conn: AsyncConnection,
    verdict: Verdict,
    key: LedgerKey,
    digest: Digest | None,
    progress: Callable[[Verdict], None] | None,
) -> None:
    legacy_until = int(await conn.scalar(_LEGACY_UNTIL) or 0)
    orphans: set[str] = set()
    for row in (await conn.execute(_ORPHAN_ENTRIES)).all():
        orphans.add(row.client_id)
        verdict.faults.append(
            Fault(row.client_id, None, row.first_id, f"{row.entries} ledger entries without a wallet")
        )
    heads = digest.heads if digest is not None else {}
    seen: set[str] = set()
    entries = _rows(conn, _ENTRIES)
    pending = await anext(entries, None)
    async for wallet in _rows(conn, _WALLETS):
        verdict.wallets += 1
        seen.add(wallet.client_id)
        head = heads.get(wallet.client_id)
        # With a digest, whatever came after it must be keyed, whatever ledger_keying says.
        keyed_after = None if digest is None else (head.entry_count if head is not None else 0)
        chain = _Chain()
        while pending is not None and pending.client_id in orphans:
            verdict.entries += 1
            pending = await anext(entries, None)
        while pending is not None and pending.client_id == wallet.client_id:
            chain.count += 1
            verdict.entries += 1
            if chain.fault is None:
                reason = _check_entry(pending, chain, key, legacy_until, head, keyed_after)
                if reason is not None:
                    chain.fault = Fault(wallet.client_id, pending.entry_no, pending.id, reason)
                chain.count = pending.entry_no
                chain.before, chain.previous_hash = pending.balance_after, bytes(pending.hash)
                chain.previous_time, chain.keyed = pending.created_at, pending.key_id is not None
            if progress is not None and verdict.entries % _BATCH == 0:
                progress(verdict)
            pending = await anext(entries, None)
        if chain.fault is None:
            reason = _check_wallet(wallet, chain, head)
            if reason is not None:
                chain.fault = Fault(wallet.client_id, None, None, reason)
        if chain.fault is not None:
            verdict.faults.append(chain.fault)
    while pending is not None:  # only orphans sort after the last wallet
        verdict.entries += 1
        pending = await anext(entries, None)
    for client_id in sorted(set(heads) - seen):
        verdict.faults.append(Fault(client_id, None, None, "the wallet in the digest is gone"))


async def _verify_orders(conn: AsyncConnection, verdict: Verdict) -> None:
    for o in (await conn.execute(_ORDER_FAULTS)).all():
        expected_refunds = 1 if o.status == "FAILED" else 0
        if o.deductions != 1 or o.refunds != expected_refunds:
            reason = (
                f"order {o.order_id} is {o.status} with {o.deductions} ORDER_DEDUCTION and "
                f"{o.refunds} ORDER_REFUND entries; it needs 1 and {expected_refunds}"
            )
        elif o.mismatched:
            reason = f"order {o.order_id} has ledger entries of another client or amount"
        else:
            reason = f"order {o.order_id} was refunded before its money was taken"
        verdict.faults.append(Fault(o.client_id, None, None, reason))
    for e in (await conn.execute(_ENTRIES_WITHOUT_ORDER)).all():
        verdict.faults.append(
            Fault(e.client_id, e.entry_no, e.id, f"{e.type} names order {e.reference_id}, which is not there")
        )


async def _protection_faults(engine: AsyncEngine) -> list[str]:
    """Why an ordinary session could change the ledger, if it could. Behaviour for UPDATE and
    DELETE (tried on one entry inside a transaction that is rolled back); the catalogue for
    TRUNCATE too, which is not tried: its ACCESS EXCLUSIVE lock would stall live traffic."""
    reasons: list[str] = []
    async with engine.connect() as conn:
        await conn.execute(text("SET LOCAL lock_timeout = '2s'"))
        await conn.execute(text("SET LOCAL statement_timeout = '10s'"))
        newest = await conn.scalar(_NEWEST_ENTRY)
        for operation, probe in _PROBES.items() if newest is not None else ():
            savepoint = await conn.begin_nested()
            try:
                await conn.execute(probe, {"id": newest})
                reasons.append(f"the database let this session {operation} a ledger entry")
            except DBAPIError as exc:
                if "append-only" not in str(exc.orig):
                    reasons.append(f"could not test {operation} on the ledger: {exc.orig}")
            await savepoint.rollback()
        triggers = {row.tgname: row for row in (await conn.execute(_TRIGGERS)).all()}
        replica_defaults = (await conn.execute(_REPLICA_DEFAULTS)).all()
        session_role = (await conn.execute(_SESSION_ROLE)).one()
        await conn.rollback()
    origin_only = False
    for name, tgtype in _GUARDS.items():
        trigger = triggers.get(name)
        if trigger is None:
            reasons.append(f"append-only trigger {name} is missing")
            continue
        if trigger.tgenabled not in ("O", "A"):
            state = {"D": "disabled", "R": "enabled for replica sessions only"}.get(trigger.tgenabled, "off")
            reasons.append(f"append-only trigger {name} is {state}")
        origin_only |= trigger.tgenabled == "O"
        if trigger.tgtype != tgtype or trigger.has_when or trigger.has_columns:
            reasons.append(f"append-only trigger {name} no longer fires before every event it guards")
        if trigger.proname != _GUARD_FUNCTION:
            reasons.append(f"append-only trigger {name} runs another function than {_GUARD_FUNCTION}")
        elif trigger.lanname != "plpgsql" or trigger.prosrc.split() != _GUARD_BODY.split():
            reasons.append(f"append-only trigger {name}: the body of {_GUARD_FUNCTION} was changed")
    if origin_only:
        for row in replica_defaults:
            reasons.append(
                f"{row.c} is the default for {row.role} in {row.db}: the append-only triggers are off there"
            )
        if "origin" not in (session_role.setting, session_role.reset_val):
            reasons.append(
                f"session_replication_role is {session_role.reset_val}: the append-only triggers are off"
            )
    return reasons


async def verify_ledger(
    engine: AsyncEngine,
    key: LedgerKey,
    *,
    digest: Digest | None = None,
    progress: Callable[[Verdict], None] | None = None,
) -> Verdict:
    verdict = Verdict()
    database_faults = await _protection_faults(engine)
    if digest is not None:
        secret = key.secret_for(digest.key_id)
        if secret is None:
            database_faults.append(f"the digest's key id {digest.key_id} is not configured")
        elif not hmac.compare_digest(_digest_mac(secret, digest.taken_at, digest.heads), digest.mac):
            database_faults.append("the digest file was altered: its HMAC does not match")
    verdict.faults.extend(Fault(None, None, None, reason) for reason in database_faults)
    async with _snapshot(engine) as conn:
        await _verify_chains(conn, verdict, key, digest, progress)
        await _verify_orders(conn, verdict)
    return verdict
