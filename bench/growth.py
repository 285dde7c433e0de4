"""Cost growth: the same reads and orders on a wallet with 10 ledger entries and with N.

The long history is generated in SQL (a consistent chain of CREDIT entries whose balances follow
each other, and the wallet's balance and entry count to match). The hash column only has
to have 32 bytes: nothing here verifies the chain, and computing it would only slow the setup.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg

from bench import ceiling
from bench.report import GrowthRow
from wallet import statements
from wallet.database import plain_url

SMALL_WALLET, LARGE_WALLET = 900001, 900002
SMALL_SIZE = 10
CHUNK = 1_000_000
EXPLAIN_RUNS = 7

OPENING = 100_000_000_000  # cents: the first entry, so that orders never run out of money

# Entry 1 credits OPENING, every later one 1.00; each balance_before is the previous balance_after.
# Entry g is written at ceiling.ENTRY_TIME(g), so ledger times grow with entry order as in the
# service and a period holds a known number of entries; entries name the bench's key id, as the
# database requires since migration 0003.
_ENTRIES = f"""
INSERT INTO ledger_entries (client_id, entry_no, type, amount, balance_before, balance_after,
                            created_at, hash, key_id)
SELECT $1, g, 'CREDIT', CASE WHEN g = 1 THEN $4::bigint ELSE 100 END,
       CASE WHEN g = 1 THEN 0 ELSE $4::bigint + (g - 2) * 100 END, $4::bigint + (g - 1) * 100,
       {ceiling.ENTRY_TIME.format(n="g")}, sha256(int8send(g)), '{ceiling.LEDGER_KEY.key_id}'
FROM generate_series($2::bigint, $3::bigint) AS g
"""


async def make_wallet(url: str, client_id: int, entries: int) -> None:
    conn = await asyncpg.connect(plain_url(url))
    try:
        await conn.execute("INSERT INTO clients (client_id) VALUES ($1)", str(client_id))
        await conn.execute("INSERT INTO wallets (client_id) VALUES ($1)", str(client_id))
        started = time.monotonic()
        for first in range(1, entries + 1, CHUNK):
            last = min(entries, first + CHUNK - 1)
            await conn.execute(_ENTRIES, str(client_id), first, last, OPENING)
            if entries > CHUNK:
                rate = last / (time.monotonic() - started)
                print(f"bench: {last:,}/{entries:,} ledger entries ({rate:,.0f}/s)", file=sys.stderr)
        await conn.execute(
            "UPDATE wallets SET balance = $2, entry_count = $3 WHERE client_id = $1",
            str(client_id),
            OPENING + (entries - 1) * 100,
            entries,
        )
        await conn.execute("VACUUM ANALYZE ledger_entries")
    finally:
        await conn.close()


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
    """Set both wallets up, then measure each at 10 entries and at `size`."""
    asyncio.run(make_wallet(url, SMALL_WALLET, SMALL_SIZE))
    started = time.monotonic()
    asyncio.run(make_wallet(url, LARGE_WALLET, size))
    print(f"bench: {size:,} ledger entries in {time.monotonic() - started:.0f} s", file=sys.stderr)
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
    return [GrowthRow(name, small, large) for name, (small, large) in results.items()]
