"""Cost growth: the same reads and orders on a wallet with 10 ledger entries and with N, and
`wallet verify` over the database before and after the N entries are written.

The long history is a valid keyed chain (issue 15: verify must be measured on it, and a fake
hash would make verify stop at the first entry): CREDIT entries whose balances follow each
other, times one microsecond apart, each hashed with the bench service's LEDGER_KEY exactly as
`chain_hash(previous, canonical_content(...), secret)` does. The chain is sequential, so
it is computed here in Python and loaded with COPY, a chunk at a time, while the next chunk is
computed in a thread; the wallet row gets the last entry's balance, count, hash and time.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import statistics
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

from bench import ceiling
from bench.report import GrowthRow
from wallet import statements
from wallet.chain import GENESIS_HASH, LedgerKey, canonical_content, chain_hash
from wallet.database import create_engine, plain_url
from wallet.verify import Verdict, verify_ledger

SMALL_WALLET, LARGE_WALLET = 900001, 900002
SMALL_SIZE = 10
CHUNK = 100_000  # entries per COPY: a few tens of MB of Python objects at most
PROGRESS = 1_000_000
CHECK_EVERY = 10_000  # entries between cross-checks of the content against canonical_content
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# ceiling.ENTRY_TIME in Python: the statement scenarios compute periods with the SQL twin.
ENTRY_BASE = datetime(1990, 1, 1, tzinfo=UTC)
ENTRY_STEP_MICROS = 100_000_000
EXPLAIN_RUNS = 7

# Growth rows of `wallet verify` over the whole bench database (clean, or the bench stops).
VERIFY_ENTRIES = "wallet verify, whole database (entries)"
VERIFY_SECONDS = "wallet verify, whole database (s)"
VERIFY_RATE = "wallet verify, whole database (entries/s)"

OPENING = 100_000_000_000  # cents: the first entry, so that orders never run out of money
STEP = 100  # every later entry credits 1.00

COLUMNS = (
    "client_id",
    "entry_no",
    "type",
    "amount",
    "balance_before",
    "balance_after",
    "reference_id",
    "description",
    "created_at",
    "hash",
    "key_id",
)
Record = tuple[str, int, str, int, int, int, None, None, datetime, bytes, str]


def chain(client_id: str, entries: int, key: LedgerKey) -> Iterator[Record]:
    """A wallet's ledger as `ledger.credit` would have written it, in COPY column order: entry 1
    credits OPENING, every later one STEP; entry n is stamped ceiling.ENTRY_TIME(n) (1990-01-01
    plus n times 100 s), so times grow with entry order as in the service and a statement's period
    holds a known number of entries.

    The loop runs N times, so it formats the content directly (cheaper than a keyword call to
    `canonical_content` per entry) and computes the HMAC from SHA-256 states
    pre-fed with the key's padded halves (the same bytes as `chain_hash`, in half the time).
    Every CHECK_EVERY entries both are compared with `canonical_content` and `chain_hash`: a
    change there stops the generator instead of producing a chain verify rejects."""
    base_micros = (ENTRY_BASE - _EPOCH) // timedelta(microseconds=1)
    key_id, pads = key.key_id, key.sql_params()
    inner, outer = hashlib.sha256(pads["ipad_key"]), hashlib.sha256(pads["opad_key"])
    previous, before = GENESIS_HASH, 0
    for entry_no in range(1, entries + 1):
        amount = OPENING if entry_no == 1 else STEP
        after = before + amount
        micros = base_micros + entry_no * ENTRY_STEP_MICROS
        content = f"{client_id}|{entry_no}|CREDIT|{amount}|{before}|{after}|-1||-1||{micros}".encode()
        created_at = ENTRY_BASE + timedelta(microseconds=entry_no * ENTRY_STEP_MICROS)
        mac = inner.copy()
        mac.update(previous + content)
        hashed = outer.copy()
        hashed.update(mac.digest())
        if entry_no % CHECK_EVERY == 1:
            _check(key, previous, content, hashed.digest(), client_id, entry_no, amount, before, created_at)
        previous = hashed.digest()
        yield (client_id, entry_no, "CREDIT", amount, before, after, None, None, created_at, previous, key_id)
        before = after


def _check(
    key: LedgerKey,
    previous: bytes,
    content: bytes,
    hashed: bytes,
    client_id: str,
    entry_no: int,
    amount: int,
    before: int,
    at: datetime,
) -> None:
    """Stop unless `chain` formatted and hashed this entry as the service would."""
    expected = canonical_content(
        client_id=client_id,
        entry_no=entry_no,
        type="CREDIT",
        amount=amount,
        balance_before=before,
        balance_after=before + amount,
        reference_id=None,
        description=None,
        created_at=at,
    )
    if content != expected or hashed != chain_hash(previous, expected, key.secret):
        raise AssertionError(f"bench.growth writes entries unlike the service: {content!r}")


async def make_wallet(url: str, client_id: int, entries: int, key: LedgerKey = ceiling.LEDGER_KEY) -> None:
    """A wallet with a ledger of `entries` that `wallet verify` finds clean."""
    cid = str(client_id)
    conn = await asyncpg.connect(plain_url(url))
    try:
        await conn.execute("INSERT INTO clients (client_id) VALUES ($1)", cid)
        await conn.execute("INSERT INTO wallets (client_id) VALUES ($1)", cid)
        records = chain(cid, entries, key)

        def next_chunk() -> list[Record]:
            return list(itertools.islice(records, CHUNK))

        started, written = time.monotonic(), 0
        chunk = next_chunk()
        last = chunk[-1] if chunk else None
        while chunk:
            # PostgreSQL stores this chunk while a thread hashes the next one.
            copy = conn.copy_records_to_table("ledger_entries", records=chunk, columns=COLUMNS)
            _, following = await asyncio.gather(copy, asyncio.to_thread(next_chunk))
            written += len(chunk)
            if entries >= PROGRESS and (written % PROGRESS == 0 or written == entries):
                rate = written / (time.monotonic() - started)
                print(f"bench: {written:,}/{entries:,} ledger entries ({rate:,.0f}/s)", file=sys.stderr)
            chunk = following
            last = chunk[-1] if chunk else last
        if last is not None:
            await conn.execute(
                "UPDATE wallets SET balance = $2, entry_count = $3, head_hash = $4, updated_at = $5"
                " WHERE client_id = $1",
                cid,
                last[5],
                last[1],
                last[9],
                last[8],
            )
        await conn.execute("VACUUM ANALYZE ledger_entries")
    finally:
        await conn.close()


async def verify(url: str) -> tuple[Verdict, float]:
    """`wallet verify` over the whole database, as the CLI runs it: (verdict, seconds)."""

    def progress(verdict: Verdict) -> None:
        if verdict.entries % PROGRESS == 0:
            print(f"bench: wallet verify: {verdict.entries:,} entries", file=sys.stderr)

    engine = create_engine(url, pool_size=2)
    try:
        started = time.monotonic()
        verdict = await verify_ledger(engine, ceiling.LEDGER_KEY, progress=progress)
        return verdict, time.monotonic() - started
    finally:
        await engine.dispose()


def verified(url: str, when: str) -> tuple[Verdict, float]:
    """Verify, and stop the bench if anything is wrong: the generator (or the service) wrote a
    ledger that is not valid, and every figure measured on it would be about the wrong data."""
    verdict, seconds = asyncio.run(verify(url))
    if not verdict.ok:
        faults = "\n".join(f"  {fault.describe()}" for fault in verdict.faults[:20])
        raise RuntimeError(
            f"wallet verify {when}: {len(verdict.faults)} faults in the bench database:\n{faults}"
        )
    print(
        f"bench: wallet verify {when}: {verdict.entries:,} entries in {verdict.wallets:,} wallets, "
        f"{seconds:.1f} s ({verdict.entries / seconds:,.0f}/s), clean",
        file=sys.stderr,
    )
    return verdict, seconds


async def explain_page(url: str, client_id: int, before: int) -> tuple[float, float]:
    """(median execution ms, shared buffers touched) of the deep ledger page query."""
    sql = ceiling.to_pgbench(ceiling.LEDGER_PAGE, {"client_id": "$1", "before": "$2"})
    return await _explain(url, sql, str(client_id), before)


async def explain_statement(url: str, client_id: int, position: int) -> tuple[float, float]:
    """The same for a statement's entries query over a period of STATEMENT_SPAN entries."""
    start = ceiling.ENTRY_TIME.format(n="$2::bigint")
    end = ceiling.ENTRY_TIME.format(n=f"($2::bigint + {ceiling.STATEMENT_SPAN})")
    binds = {"client_id": "$1", "start": start, "end": end, "limit": "10001"}
    sql = ceiling.to_pgbench(statements.ENTRIES_SQL, binds)
    return await _explain(url, sql, str(client_id), position)


async def _explain(url: str, sql: str, *args: Any) -> tuple[float, float]:
    conn = await asyncpg.connect(plain_url(url))
    try:
        times, buffers = [], 0.0
        for _ in range(EXPLAIN_RUNS):
            raw = await conn.fetchval(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}", *args)
            plan: dict[str, Any] = (raw if isinstance(raw, list) else json.loads(raw))[0]
            times.append(float(plan["Execution Time"]))
            top = plan["Plan"]
            buffers = float(top.get("Shared Hit Blocks", 0) + top.get("Shared Read Blocks", 0))
        return statistics.median(times), buffers
    finally:
        await conn.close()


def measure(url: str, size: int, workdir: Path, *, clients: int, seconds: int) -> list[GrowthRow]:
    """Set both wallets up, verify the database before and after the large one, then measure
    each wallet at 10 entries and at `size`."""
    asyncio.run(make_wallet(url, SMALL_WALLET, SMALL_SIZE))
    checks = [verified(url, f"with {SMALL_SIZE} entries in the growth wallet")]
    started = time.monotonic()
    asyncio.run(make_wallet(url, LARGE_WALLET, size))
    print(f"bench: {size:,} ledger entries in {time.monotonic() - started:.0f} s", file=sys.stderr)
    checks.append(verified(url, f"with {size:,} entries in the growth wallet"))
    results: dict[str, list[float]] = {}
    for client_id, entries in ((SMALL_WALLET, SMALL_SIZE), (LARGE_WALLET, size)):
        scripts = [
            ("balance reads", ceiling.balance((client_id, client_id))),
            ("orders (one wallet)", ceiling.order((client_id, client_id))),
            ("ledger page, random depth", ceiling.ledger_page(client_id, entries)),
            ("statement of 10 entries, random period", ceiling.statement(client_id, entries)),
        ]
        for name, script in scripts:
            run = ceiling.run_pgbench(url, script, workdir, clients=clients, threads=2, seconds=seconds)
            if run.error:
                raise RuntimeError(f"{name}: {run.error}")
            results.setdefault(f"{name} (tps)", []).append(run.tps)
        ms, buffers = asyncio.run(explain_page(url, client_id, max(21, entries // 2)))
        results.setdefault("ledger page, mid-history (EXPLAIN ANALYZE ms)", []).append(ms)
        results.setdefault("ledger page, mid-history (buffers)", []).append(buffers)
        ms, buffers = asyncio.run(explain_statement(url, client_id, max(1, entries // 2)))
        results.setdefault("statement of 10 entries, mid-history (EXPLAIN ANALYZE ms)", []).append(ms)
        results.setdefault("statement of 10 entries, mid-history (buffers)", []).append(buffers)
    (small, small_s), (large, large_s) = checks
    results[VERIFY_ENTRIES] = [float(small.entries), float(large.entries)]
    results[VERIFY_SECONDS] = [small_s, large_s]
    results[VERIFY_RATE] = [small.entries / small_s, large.entries / large_s]
    return [GrowthRow(name, small, large) for name, (small, large) in results.items()]
