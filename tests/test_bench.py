"""The benchmark's ceiling must run the service's own statements and leave the same data the
service would: otherwise the ratios `make bench` prints compare different work. Its CPU figures
must count the processes they name, inside the measurement and nowhere else."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy import text

from bench import ceiling, cpu, growth, outbox, report, run
from bench.load import Load
from bench.paired import Paired
from tests.builders import ADMIN_KEY, ServerProcess, spawn_service
from wallet import chain, ledger, orders, reads
from wallet.database import create_engine, plain_url
from wallet.events import INSERT_EVENT
from wallet.settings import ClientAuth, Settings
from wallet.verify import verify_ledger

REPO = str(Path(__file__).resolve().parent.parent)
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


async def test_the_batched_ceiling_is_group_commit_s_work(database_url: str) -> None:
    """The outbox's steady figure reads PostgreSQL's CPU per order from this script: it must place
    and complete whole batches with their events, chained as the service chains them."""
    await _wallets(database_url, "100001", "100002")
    size = 4
    with tempfile.TemporaryDirectory() as tmp:
        batches = await asyncio.to_thread(
            ceiling.run_pgbench,
            database_url,
            ceiling.batch_order((100001, 100002), size),
            Path(tmp),
            clients=2,
            threads=1,
            seconds=1,
        )
    assert batches.error is None
    assert batches.transactions > 0
    placed = size * batches.transactions
    statuses = await _rows(
        database_url, "SELECT status, amount, fulfillment_id, count(*) FROM orders GROUP BY 1, 2, 3"
    )
    assert statuses == [("COMPLETED", ceiling.ORDER_CENTS, "101", placed)]
    assert all(
        ORDER_ID.fullmatch(str(o)) for (o,) in await _rows(database_url, "SELECT order_id FROM orders")
    )
    emitted = await _rows(database_url, "SELECT type, count(*) FROM events GROUP BY type ORDER BY type")
    assert [row for row in emitted if str(row[0]).startswith("order.")] == [
        ("order.completed", placed),
        ("order.created", placed),
    ]
    balances: dict[str, int] = dict(await _rows(database_url, "SELECT client_id, balance FROM wallets"))
    assert balances["100001"] + balances["100002"] == 2_000_000 - placed * ceiling.ORDER_CENTS
    verdict, _ = await growth.verify(database_url)
    assert verdict.faults == []


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


def test_the_report_prints_the_outbox_cost_of_the_service_and_of_the_sql() -> None:
    def sql(orders_per_s: float, per_tx: int, cpu_seconds: float | None) -> outbox.SqlRun:
        tps = orders_per_s / per_tx
        return outbox.SqlRun(ceiling.Ceiling(tps, int(tps * 10), 1.0, 0, None), per_tx, cpu_seconds)

    def served(rps: int, errors: int = 0) -> Load:
        return Load(rps, 1.0, 1.0, 2.0, 0, {201: rps - errors, 503: errors} if errors else {201: rps})

    rounds = {outbox.WITH: [served(950), served(930), served(990)], outbox.WITHOUT: [served(1000)] * 3}
    cpu_us = {outbox.WITH: [4000.0, 4200.0, 3900.0], outbox.WITHOUT: [3800.0] * 3}
    means = {outbox.WITH: {"placement": 11.6, "completion": 9.0}, outbox.WITHOUT: {"placement": 12.2}}
    measured = Paired("orders", rounds, cpu_us, means)
    hot = Paired("hot", rounds, cpu_us, {outbox.WITH: {"placement": 23.0}})
    assert outbox.formed_batch([measured, hot]) == 11  # the least amortised, whole orders
    assert outbox.formed_batch([Paired("orders", rounds, cpu_us)]) == outbox.BATCH
    single = outbox.SqlPair("single", [sql(700, 1, 7.0)] * 2, [sql(1000, 1, 8.0)] * 2)
    # 1,600 orders/s for 10 s = 16,000 orders: 4.8 s of PostgreSQL is 300 µs an order, 4.0 s 200 µs
    batched = outbox.SqlPair("batched", [sql(1600, 16, 4.8)] * 2, [sql(1600, 16, 3.2)] * 2)
    cost = outbox.OutboxCost([measured], [single, batched])
    markdown = report.render([], about={}, peak_rss=0, processes=1, sections=cost.render(10))
    assert "**The outbox's cost to the order path: 5.0%** (< 10%, 0 errors: met)" in markdown
    # 100 µs added an order over the 4,000 µs an order takes with its events
    assert "The events' own SQL accounts for 2.5% of an order's CPU" in markdown
    assert "| orders | 950 | 1,000 | 5.0% (1.0% to 7.0%) | 4,000 / 3,800 | 5.0% | 11.6 / 12.2 |" in markdown
    assert "| single | 700 | 1,000 | 30.0% | 1,000 / 800 | 200 µs |" in markdown
    assert "| batched | 1,600 | 1,600 | 0.0% | 300 / 200 | 100 µs |" in markdown
    assert cost.share == pytest.approx(0.025)
    blind = outbox.OutboxCost([Paired("orders", rounds)], [])  # the database's CPU not visible
    assert blind.share is None
    assert blind.cost == pytest.approx(0.05)
    assert "| - / - | - | - / - |" in "\n".join(blind.render(10))
    slow = {outbox.WITH: [served(850)] * 3, outbox.WITHOUT: [served(1000)] * 3}
    assert outbox.OutboxCost([Paired("orders", slow)], []).verdict().endswith("MISSED")
    heavy = outbox.SqlPair("batched", [sql(1600, 16, 12.0)] * 2, [sql(1600, 16, 3.2)] * 2)
    assert outbox.OutboxCost([measured], [heavy]).share == pytest.approx(
        550 / 4000
    )  # a floor, not the verdict
    failing = {outbox.WITH: [served(1000, errors=1)] * 3, outbox.WITHOUT: [served(1000)] * 3}
    assert outbox.OutboxCost([Paired("orders", failing)], []).verdict().endswith("MISSED")
    assert outbox.OutboxCost([], []).verdict().endswith("MISSED")


async def _order_events(server: ServerProcess, client_id: str, orders: int) -> int:
    """Place `orders` orders, each on a new connection so the kernel spreads them over the
    workers; the order events the client's feed then holds for them."""
    headers = {"client-id": client_id, "Connection": "close"}
    once = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=server.url, limits=once) as http:
        placed = set()
        for _ in range(orders):
            answer = await http.post("/orders", json={"amount": 1}, headers=headers)
            assert answer.status_code == 201, answer.text
            placed.add(answer.json()["data"]["orderId"])
        feed = await http.get("/events", params={"limit": 100}, headers=headers)
    assert feed.status_code == 200, feed.text
    return sum(e["type"].startswith("order.") and e["data"]["orderId"] in placed for e in feed.json()["data"])


async def test_the_bench_service_switches_its_outbox(database_url: str, tmp_path: Path) -> None:
    """The outbox's arms run through one service; every worker must be in the arm the bench asked
    for, or the comparison measures a mix."""
    switch = outbox.Switch(tmp_path, workers=2)
    env = {
        "WORKERS": "2",
        "DATABASE_URL": database_url,
        "ADMIN_API_KEY": ADMIN_KEY,
        outbox.ACKS_ENV: str(tmp_path),
        "PYTHONPATH": REPO,
    }
    command = ("-c", outbox.SERVE_SWITCHING)
    async with spawn_service(env, command=command) as server, httpx.AsyncClient(base_url=server.url) as http:
        credit = {"client_id": "SWITCH", "amount": 100}
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        assert (await http.post("/admin/wallet/credit", json=credit, headers=admin)).status_code == 200
        counts = []
        for arm in (outbox.WITHOUT, outbox.WITH, outbox.WITHOUT):
            await asyncio.to_thread(switch, arm)
            counts.append(await _order_events(server, "SWITCH", orders=6))
    assert counts == [0, 12, 0]  # order.created and order.completed for each order with events
    assert await asyncio.to_thread(switch.arms) == [outbox.WITHOUT] * 2


def test_a_statement_without_outbox_is_only_that_statement_s_variant() -> None:
    """In a process of its own: switching mutates the service's modules."""
    probe = (
        "from bench import outbox; from wallet import ledger, orders; from wallet.events import INSERT_EVENT;"
        "found = outbox.outbox_statements(); [s.use(outbox.WITHOUT) for s in found];"
        "statements = (ledger._PLACE_ORDERS, ledger._PLACE_ORDER, orders._COMPLETE);"
        "print(len(found), *(INSERT_EVENT in s.text for s in statements))"
    )
    here = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=here, check=True)
    changed, *still_there = done.stdout.split()
    assert int(changed) >= 5
    assert still_there == ["False", "False", "False"]
    assert INSERT_EVENT in ledger._PLACE_ORDERS.text  # this process's statements are untouched


# A process that burns the CPU seconds it is sent, one line at a time, and says when it is done.
BURNER = """
import sys, time
for line in sys.stdin:
    end = time.process_time() + float(line)
    while time.process_time() < end:
        pass
    print("burnt", flush=True)
"""
TICK = 1 / cpu.CLOCK_TICKS  # what one /proc reading may round away


def _burn(child: subprocess.Popen[str], seconds: float) -> None:
    assert child.stdin is not None
    assert child.stdout is not None
    child.stdin.write(f"{seconds}\n")
    child.stdin.flush()
    assert child.stdout.readline() == "burnt\n"


def _burner(*wrapper: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*wrapper, sys.executable, "-c", BURNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )


def test_the_meter_counts_what_a_process_spends_inside_the_window_only() -> None:
    child = _burner()
    try:
        _burn(child, 0.2)  # before: not counted
        with cpu.Meter({"child": lambda: [child.pid]}) as meter:
            _burn(child, 0.3)
    finally:
        child.kill()
        child.wait()
    assert 0.3 - 2 * TICK <= meter.seconds["child"] <= 0.45


def test_the_meter_counts_a_whole_process_tree_born_inside_the_window() -> None:
    """`wallet serve` is a supervisor with workers: the CPU is in the children."""
    parent: subprocess.Popen[str] | None = None
    with cpu.Meter({"tree": lambda: cpu.tree(parent.pid) if parent else []}) as meter:
        parent = _burner(sys.executable, "-c", "import subprocess, sys; subprocess.run(sys.argv[1:])")
        try:
            _burn(parent, 0.3)  # the worker (a child of `parent`) burns it
            assert len(cpu.tree(parent.pid)) == 2
        finally:
            assert parent.stdin is not None
            parent.stdin.close()
            parent.wait()
    # Both interpreters' start-up counts too: the processes were born inside the window. The
    # worker exits between two readings: what it spent after the last one (at most an interval of
    # its burn, when the sampling thread waited for a core) is not seen, as bench/cpu.py says.
    assert 0.3 - cpu.INTERVAL - 2 * TICK <= meter.seconds["tree"] <= 1.5


def test_the_meter_keeps_what_a_process_spent_before_it_exited() -> None:
    """pgbench's backends exit with pgbench, inside the window: their last reading stays."""
    child = _burner()
    assert child.stdin is not None
    with cpu.Meter({"child": lambda: [child.pid]}) as meter:
        _burn(child, 0.3)
        child.stdin.close()
        child.wait()
    # Lost: what it spent after its last reading, at most about one interval of a busy process.
    assert 0.3 - 2 * cpu.INTERVAL - 2 * TICK <= meter.seconds["child"] <= 0.45


@pytest.mark.parametrize(
    ("title", "expected"),
    [
        ("postgres: 15/main: postgres wallet_bench_1 127.0.0.1(5432) idle", True),
        ("postgres: 15/main: app wallet_bench_1 [local] SELECT", True),
        ("postgres: 15/main: postgres wallet_bench_2 127.0.0.1(5432) idle", False),
        ("postgres: 15/main: postgres postgres 127.0.0.1(5432) idle", False),
        ("postgres: 15/main: autovacuum worker wallet_bench_1", True),
        ("postgres: 15/main: autovacuum worker other", False),
        ("postgres: 15/main: autovacuum worker", None),  # not yet on a database
        ("postgres: 15/main: checkpointer", False),
        ("postgres: 15/main: walwriter", False),
        ("postgres: 15/main: logical replication launcher", False),
        ("/usr/lib/postgresql/15/bin/postgres -D /var/lib/postgresql/15/main", None),  # just forked
    ],
)
def test_which_postgres_processes_serve_the_bench_database(title: str, expected: bool | None) -> None:
    assert cpu.serves_database(title, "wallet_bench_1", "15/main") is expected
    without_cluster_name = title.replace("15/main: ", "")
    assert cpu.serves_database(without_cluster_name, "wallet_bench_1") is expected


async def _busy(url: str, rows: int) -> None:
    conn = await asyncpg.connect(plain_url(url))
    try:
        await conn.fetchval("SELECT count(*) FROM generate_series(1, $1::int)", rows)
    finally:
        await conn.close()


async def test_postgres_cpu_counts_the_bench_database_s_backends_and_not_another_s(
    database_url: str, postgres_url: str
) -> None:
    ours, other = await cpu.backends(database_url), await cpu.backends(postgres_url)
    assert ours is not None  # the tests' server runs on this machine
    assert other is not None
    work = 2_000_000  # rows counted: a few tenths of a second of a backend's CPU
    with cpu.Meter({"ours": ours, "other": other}) as elsewhere:
        await _busy(postgres_url, work)
    with cpu.Meter({"ours": ours}) as here:
        await _busy(database_url, work)
    assert elsewhere.seconds["other"] > 0.05
    assert elsewhere.seconds["ours"] < 0.2 * elsewhere.seconds["other"]
    assert here.seconds["ours"] > 0.05


def _load(requests: int, p99_ms: float = 10.0) -> Load:
    return Load(requests, 10.0, 2.0, p99_ms, 0, {200: requests})


def test_the_report_prints_cpu_per_request_and_per_pgbench_transaction() -> None:
    measured = report.Row(
        "orders, 1,000 wallets",
        _load(10_000),
        ceiling.Ceiling(1_000.0, 5_000, 32.0, 0, None),
        report.Target(ratio=2, p99_ms=25),
        auth="api_key",
        cpu=report.Cpu(service=12.5, database=4.0, ceiling_database=3.0, provider=1.5),
    )
    unreadable = report.Row(
        "balance reads",
        _load(100, p99_ms=30),
        ceiling.Ceiling(10.0, 100, 1.0, 0, None),
        report.Target(p99_ms=25),
    )
    markdown = report.render([measured, unreadable], about={}, peak_rss=0, processes=1)
    assert (
        "| orders, 1,000 wallets | api_key | 1,000 | 2.0 | 10.0 | 0 | 1,000 | 1.00x | 1,250 | 400 | 150 "
        "| 600 | ≥ 2x, p99 < 25 ms, 0 errors: MISSED ratio |" in markdown
    )
    assert "| - | - | - | - | p99 < 25 ms, 0 errors: MISSED p99 |" in markdown
    assert "not visible from here" in markdown
    figures = json.loads(json.dumps(report.data([measured], about={"date": "today"})))
    assert figures["rows"][0]["cpu_us"] == {
        "service_per_request": 1250.0,
        "database_per_request": 400.0,
        "provider_per_request": 150.0,
        "database_per_pgbench_transaction": 600.0,
    }
    assert figures["rows"][0]["auth"] == "api_key"


def test_the_service_runs_with_production_settings() -> None:
    """Issue 13: production, rate limiting on but never refusing, JSON logs at info."""
    env = run.service_env(
        "postgresql://db/bench", 8001, 8002, "a" * 32, "header", redis_url="redis://127.0.0.1:6379/0"
    )
    fields: dict[str, Any] = {
        name: env[name.upper()] for name in Settings.model_fields if name.upper() in env
    }
    settings = Settings(_env_file=None, **fields)
    assert settings.production
    assert settings.client_auth_mode is ClientAuth.HEADER
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert (settings.log_level, settings.log_renderer) == ("info", "json")
    item = settings.rate_limit_item
    assert item is not None
    assert item.amount / item.get_expiry() >= 100_000  # hits per second: far above any bench
    assert "REDIS_URL" not in run.service_env("postgresql://db/bench", 1, 2, "a" * 32, "api_key")
    assert run.auth_modes("both") == ("api_key", "header")
    assert run.auth_modes("header") == ("header",)
