"""The benchmark's ceiling must run the service's own statements and leave the same data the
service would: otherwise the ratios `make bench` prints compare different work."""

from __future__ import annotations

import asyncio
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from bench import ceiling, growth, outbox, report
from wallet import chain, ledger, orders, reads
from wallet.database import create_engine
from wallet.events import INSERT_EVENT
from wallet.verify import verify_ledger

ORDER_ID = re.compile(r"^ORD-[0-9]{13}-[0-9a-f]{8}$")


def test_binds_become_pgbench_variables_and_casts_stay() -> None:
    assert ceiling.to_pgbench(reads.BALANCE, {"client_id": ":cid"}) == (
        "SELECT balance, updated_at FROM wallets WHERE client_id = :cid"
    )
    script = ceiling.order((100001, 100001)).text
    assert "::numeric" in script  # the events' money casts (events.money_sql)
    assert ":client_id" not in script
    assert ":order_id" not in script


def test_a_bind_the_bench_does_not_know_stops_it() -> None:
    with pytest.raises(KeyError, match="no pgbench value for bind :delta"):
        ceiling.to_pgbench(ledger._DEBIT, {"client_id": ":cid"})


async def _wallets(url: str, *client_ids: str) -> None:
    engine = create_engine(url, pool_size=1)
    try:
        async with engine.begin() as conn:
            for client_id in client_ids:
                await ledger.credit(conn, client_id, 1_000_000, key=ceiling.LEDGER_KEY)
    finally:
        await engine.dispose()


async def _rows(url: str, sql: str) -> list[tuple[Any, ...]]:
    engine = create_engine(url, pool_size=1)
    try:
        async with engine.connect() as conn:
            return [tuple(row) for row in (await conn.execute(text(sql))).all()]
    finally:
        await engine.dispose()


async def test_ceiling_orders_and_debits_are_the_service_s_transactions(database_url: str) -> None:
    await _wallets(database_url, "100001", "100002", "300001")
    with tempfile.TemporaryDirectory() as tmp:
        orders = await asyncio.to_thread(
            ceiling.run_pgbench,
            database_url,
            ceiling.order((100001, 100002)),
            Path(tmp),
            clients=2,
            threads=1,
            seconds=1,
        )
        debits = await asyncio.to_thread(
            ceiling.run_pgbench,
            database_url,
            ceiling.debit(300001),
            Path(tmp),
            clients=2,
            threads=1,
            seconds=1,
        )
    assert orders.error is None
    assert debits.error is None
    assert orders.transactions > 0
    assert debits.transactions > 0
    placed = await _rows(database_url, "SELECT order_id, status, amount, fulfillment_id FROM orders")
    assert len(placed) == orders.transactions
    assert all(ORDER_ID.fullmatch(str(order_id)) for order_id, *_ in placed)
    assert {(status, amount, fid) for _, status, amount, fid in placed} == {
        ("COMPLETED", ceiling.ORDER_CENTS, "101")
    }
    entries = await _rows(
        database_url,
        "SELECT e.description, o.order_id FROM ledger_entries e "
        "LEFT JOIN orders o ON o.order_id = e.reference_id WHERE e.type = 'ORDER_DEDUCTION'",
    )
    assert len(entries) == orders.transactions
    assert all(description == f"Payment for order {order_id}" for description, order_id in entries)
    balances: dict[str, int] = dict(await _rows(database_url, "SELECT client_id, balance FROM wallets"))
    assert balances["100001"] + balances["100002"] == 2_000_000 - orders.transactions * ceiling.ORDER_CENTS
    assert balances["300001"] == 1_000_000 - debits.transactions * ceiling.DEBIT_CENTS


async def test_ceiling_reads_run_the_service_s_history_and_statement_queries(database_url: str) -> None:
    await _wallets(database_url, "100001", "100002")
    with tempfile.TemporaryDirectory() as tmp:
        for script in (ceiling.history_page((100001, 100002)), ceiling.whole_statement((100001, 100002))):
            ran = await asyncio.to_thread(
                ceiling.run_pgbench, database_url, script, Path(tmp), clients=2, threads=1, seconds=1
            )
            assert ran.error is None, (script.name, ran.error)
            assert ran.transactions > 0
    assert "REPEATABLE READ READ ONLY" in ceiling.whole_statement((100001, 100002)).text


async def test_the_growth_ledger_is_a_chain_verify_finds_clean(database_url: str) -> None:
    """A fault here means every cost-growth figure would be measured on a ledger the service
    could never have written."""
    await growth.make_wallet(database_url, growth.LARGE_WALLET, 2_000)
    verdict, _ = await growth.verify(database_url)
    assert verdict.faults == []
    assert (verdict.wallets, verdict.entries) == (1, 2_000)
    engine = create_engine(database_url, pool_size=2)
    try:
        async with engine.connect() as conn:
            wallet = (await conn.execute(text("SELECT balance, entry_count FROM wallets"))).one()
        other_key = chain.LedgerKey(ceiling.LEDGER_KEY.key_id, b"another-key-0123456789")
        forged = await verify_ledger(engine, other_key)
    finally:
        await engine.dispose()
    assert tuple(wallet) == (growth.OPENING + 1_999 * growth.STEP, 2_000)
    assert [f.reason for f in forged.faults] == ["hash mismatch: the entry was changed after it was written"]


def test_growth_counts_print_without_decimals() -> None:
    rows = [report.GrowthRow(growth.VERIFY_ENTRIES, 10_541.0, 1_010_541.0)]
    markdown = report.render([], about={}, peak_rss=0, processes=1, growth=rows, growth_size=1_000_000)
    assert f"| {growth.VERIFY_ENTRIES} | 10,541 | 1,010,541 | 95.87 |" in markdown


def test_without_outbox_takes_out_the_events_ctes_and_nothing_else() -> None:
    for statement in (ledger._PLACE_ORDER, ledger._DEBIT, orders._COMPLETE, orders._RESCHEDULE):
        bare = outbox.without_outbox(statement.text)
        assert INSERT_EVENT not in bare
        assert "emitted" not in bare
        assert bare.count("(") == bare.count(")")
        kept = [
            name
            for name in ("moved", "entry", "placed", "done", "stored", "kept")
            if f"{name} AS (" in statement.text
        ]
        assert kept
        assert all(f"{name} AS (" in bare for name in kept)
    assert outbox.without_outbox("SELECT 1") == "SELECT 1"


async def test_the_order_path_without_outbox_is_the_same_work_but_the_events(database_url: str) -> None:
    await _wallets(database_url, "100001", "100002")
    script = ceiling.order((100001, 100002))
    bare = ceiling.Script("bare", outbox.without_outbox(script.text), script.defines)
    with tempfile.TemporaryDirectory() as tmp:
        run = {"clients": 2, "threads": 1, "seconds": 1}
        without = await asyncio.to_thread(ceiling.run_pgbench, database_url, bare, Path(tmp), **run)
        assert without.error is None
        assert without.transactions > 0
        assert await _rows(database_url, "SELECT count(*) FROM events WHERE type LIKE 'order.%'") == [(0,)]
        with_events = await asyncio.to_thread(ceiling.run_pgbench, database_url, script, Path(tmp), **run)
    assert with_events.error is None
    placed = await _rows(database_url, "SELECT status, count(*) FROM orders GROUP BY status")
    assert placed == [("COMPLETED", without.transactions + with_events.transactions)]
    emitted = await _rows(
        database_url, "SELECT type, count(*) FROM events WHERE type LIKE 'order.%' GROUP BY type"
    )
    assert sorted(emitted) == [
        ("order.completed", with_events.transactions),
        ("order.created", with_events.transactions),
    ]


def test_the_report_prints_the_outbox_cost() -> None:
    def tps(value: float) -> ceiling.Ceiling:
        return ceiling.Ceiling(value, int(value), 1.0, 0, None)

    cost = outbox.OutboxCost([tps(950), tps(970)], [tps(1000), tps(1000)])
    markdown = report.render([], about={}, peak_rss=0, processes=1, outbox=cost)
    assert (
        "| order path (pgbench: place + complete) | 960 | 1,000 | 4.0% | < 10%, 0 errors: met |" in markdown
    )
    slow = outbox.OutboxCost([tps(800)], [tps(1000)])
    assert slow.verdict().endswith("MISSED")
