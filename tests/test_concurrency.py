"""Many requests at once on one wallet never overdraw it, and tell one serial story (SPEC §7)."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections import Counter, defaultdict
from decimal import Decimal

import asyncpg

from tests.builders import Provider, start_service
from wallet.database import plain_url


async def test_100_concurrent_orders_of_30_on_1000(database_url: str, provider: Provider) -> None:
    async with start_service(database_url, provider.url) as api:
        await api.credit("hot", 1000)
        responses = await asyncio.gather(*(api.order("hot", 30) for _ in range(100)))
        statuses = Counter(r.status_code for r in responses)
        assert statuses == {201: 33, 400: 67}
        assert all(r.json()["code"] == "INSUFFICIENT_FUNDS" for r in responses if r.status_code == 400)
        assert await api.balance("hot") == Decimal(10)
        conn = await asyncpg.connect(plain_url(database_url))
        try:
            assert await conn.fetchval("SELECT count(*) FROM orders") == 33
        finally:
            await conn.close()


async def test_many_wallets_in_parallel(database_url: str, provider: Provider) -> None:
    wallets = [f"w{n}" for n in range(20)]
    async with start_service(database_url, provider.url) as api:
        await asyncio.gather(*(api.credit(w, 200) for w in wallets))
        spend = {w: [random.randint(1, 1500) / 100 for _ in range(10)] for w in wallets}
        jobs = [api.order(w, amount) for w in wallets for amount in spend[w]]
        responses = await asyncio.gather(*jobs)
        assert [r.text for r in responses if r.status_code != 201] == []
        for w in wallets:
            expected = Decimal(200) - sum(Decimal(str(a)) for a in spend[w])
            assert await api.balance(w) == expected


def serial_order(start: int, transitions: list[tuple[int, int]]) -> list[int]:
    """A walk from `start` using every (before, after) transition exactly once, if one exists
    (Hierholzer). Balances may repeat, so this is an Eulerian path, not a simple chain."""
    edges: dict[int, list[int]] = defaultdict(list)
    for before, after in transitions:
        edges[before].append(after)
    stack, walk = [start], []
    while stack:
        node = stack[-1]
        if edges[node]:
            stack.append(edges[node].pop())
        else:
            walk.append(stack.pop())
    walk.reverse()
    assert len(walk) == len(transitions) + 1, "the transitions do not form one serial history"
    return walk


async def test_concurrent_credits_and_debits_form_one_serial_history(
    database_url: str, provider: Provider
) -> None:
    """Every reported (previous -> new) transition continues another: together they form one
    serial history from the starting balance to the final one, nothing lost or doubled."""
    async with start_service(database_url, provider.url) as api:
        await api.credit("hot", 50)
        moves = [("credit", random.randint(1, 2000)) for _ in range(100)]
        moves += [("debit", random.randint(1, 2000)) for _ in range(100)]
        random.shuffle(moves)

        async def move(kind: str, cents: int) -> tuple[str, int, dict[str, object]]:
            amount = cents / 100
            response = await (api.credit("hot", amount) if kind == "credit" else api.debit("hot", amount))
            return kind, response.status_code, response.json()

        results = await asyncio.gather(*(move(k, c) for k, c in moves))
        transitions: list[tuple[int, int]] = []
        for kind, status, body in results:
            if status == 400:
                assert kind == "debit"
                assert body["code"] == "INSUFFICIENT_FUNDS"
                continue
            assert status == 200, body
            data = body["data"]
            assert isinstance(data, dict)
            before = round(data["previousBalance"] * 100)
            after = round(data["newBalance"] * 100)
            moved = round(data["amountCredited" if kind == "credit" else "amountDebited"] * 100)
            assert after - before == (moved if kind == "credit" else -moved)
            transitions.append((before, after))
        walk = serial_order(5000, transitions)
        assert await api.balance("hot") == Decimal(walk[-1]) / 100
        assert walk[-1] == 5000 + sum(after - before for before, after in transitions)
        # The ledger, in its own order, is one such history: the same transitions exactly.
        conn = await asyncpg.connect(plain_url(database_url))
        try:
            rows = await conn.fetch(
                "SELECT balance_before, balance_after FROM ledger_entries"
                " WHERE client_id = 'hot' AND entry_no > 1 ORDER BY entry_no"
            )
        finally:
            await conn.close()
        ledger = [(r["balance_before"], r["balance_after"]) for r in rows]
        assert sorted(ledger) == sorted(transitions)
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ledger))
