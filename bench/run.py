"""`make bench`: the service under load, next to pgbench running the same SQL, in one run.

    make bench                                        # 10 s per measurement, 32 connections
    make bench BENCH_ARGS="--client-auth header"      # one CLIENT_AUTH mode only (quicker)
    make bench BENCH_ARGS="--duration 30"
    make bench BENCH_ARGS="--large-ledger 10000000"   # adds cost growth (minutes, GBs of disk)
    make bench BENCH_ARGS="--replica"                 # reads from a streaming replica, and without

Starts PostgreSQL (a fresh database on DATABASE_URL's server, else an embedded one), the
fulfillment simulator and `wallet serve` with production settings on loopback; credits the
wallets; then for each scenario drives the service with wrk (or the Python fallback) and the same
statements with pgbench, reading the CPU both spend (bench/cpu.py), and prints one table. The
client scenarios run once per CLIENT_AUTH mode, each against a service started for it.
Everything it started is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import secrets
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

import asyncpg
import httpx

from bench import ceiling, cpu, growth, load, outbox, paired, replica, report, seed, stack
from bench.load import Request
from bench.report import Cpu, Row, Target
from wallet.database import migrate_url, plain_url
from wallet.settings import Settings

FIRST_WALLET, WALLETS = 100001, 1000  # client ids are numbers so pgbench can pick them
HOT_WALLET, DEBIT_WALLET = 200001, 300001
AUTH_MODES = ("api_key", "header")  # CLIENT_AUTH values; the production default first
# Rate limiting on, as in production, with a limit no bench reaches: every request pays for the
# count (two round trips to Redis when REDIS_URL is set) and none is refused. The window is one
# second so that the moving window's list of hits, all from 127.0.0.1, stays about one
# second of requests long rather than a minute's.
RATE_LIMIT = "1000000/second"
P99_MS = 25  # issue 13, at 32 connections


@dataclass(frozen=True)
class Scenario:
    name: str
    requests: list[Request]  # one is picked at random per request
    script: ceiling.Script  # the same work as raw SQL
    target: Target
    replica_read: bool = False  # served by DATABASE_READ_URL when set (README: which reads go where)
    client: bool = True  # a client route, measured under each CLIENT_AUTH mode; else an admin one
    orders: bool = False  # an order scenario: measured again without the outbox (bench/outbox.py)


def scenarios(keys: dict[str, str], admin_key: str) -> list[Scenario]:
    def client(client_id: int) -> dict[str, str]:
        headers = {"client-id": str(client_id)}
        if keys:
            headers["Authorization"] = f"Bearer {keys[str(client_id)]}"
        return headers

    spread = range(FIRST_WALLET, FIRST_WALLET + WALLETS)
    ids = (FIRST_WALLET, FIRST_WALLET + WALLETS - 1)
    order = {"amount": ceiling.ORDER_CENTS / 100}
    debit = {"client_id": str(DEBIT_WALLET), "amount": ceiling.DEBIT_CENTS / 100}
    admin = {"Authorization": f"Bearer {admin_key}"}
    return [
        Scenario(
            f"orders, {WALLETS:,} wallets",
            [Request("POST", "/orders", client(c), order) for c in spread],
            ceiling.order(ids),
            Target(ratio=2, p99_ms=P99_MS),  # issue 13: the targets, against two transactions
            orders=True,
        ),
        Scenario(
            "orders, one hot wallet",
            [Request("POST", "/orders", client(HOT_WALLET), order)],
            ceiling.order((HOT_WALLET, HOT_WALLET)),
            Target(ratio=3, p99_ms=P99_MS),
            orders=True,
        ),
        Scenario(
            f"balance reads, {WALLETS:,} wallets",
            [Request("GET", "/wallet/balance", client(c)) for c in spread],
            ceiling.balance(ids),
            Target(ratio=0.3, p99_ms=P99_MS),
        ),
        Scenario(
            "admin debits, one wallet",
            [Request("POST", "/admin/wallet/debit", admin, debit)],
            ceiling.debit(DEBIT_WALLET),
            Target(),
            client=False,
        ),
        Scenario(
            f"history pages, {WALLETS:,} wallets",
            [Request("GET", "/wallet/transactions", client(c)) for c in spread],
            ceiling.history_page(ids),
            Target(),
            replica_read=True,
        ),
        Scenario(
            f"statements, {WALLETS:,} wallets",
            [Request("GET", "/wallet/statement", client(c)) for c in spread],
            ceiling.whole_statement(ids),
            Target(),
            replica_read=True,
        ),
    ]


def service_env(
    database_url: str,
    provider_port: int,
    port: int,
    admin_key: str,
    client_auth: str,
    redis_url: str | None = None,
) -> dict[str, str]:
    """Production settings (issue 13): APP_ENV=production, rate limiting on (counted in Redis
    when `redis_url` is given, as several workers or hosts would share it, else in each worker's
    memory), JSON logs at info (one access line per request, to a file), metrics on (they always
    are; `wallet serve` gives its workers a shared PROMETHEUS_MULTIPROC_DIR). Anything else the
    caller's environment says about the service is dropped."""
    ours = {name.upper() for name in Settings.model_fields} | {"PROMETHEUS_MULTIPROC_DIR"}
    env = {name: value for name, value in os.environ.items() if name not in ours}
    if redis_url:
        env["REDIS_URL"] = redis_url
    env.update(
        APP_ENV="production",
        DATABASE_URL=database_url,
        ADMIN_API_KEY=admin_key,
        LEDGER_KEY=ceiling.LEDGER_KEY.secret.decode(),
        LEDGER_KEY_ID=ceiling.LEDGER_KEY.key_id,
        FULFILLMENT_API_URL=f"http://127.0.0.1:{provider_port}/fulfillments",
        CLIENT_AUTH=client_auth,
        RATE_LIMIT=RATE_LIMIT,
        LOG_LEVEL="info",
        LOG_FORMAT="json",
        HOST="127.0.0.1",
        PORT=str(port),
    )
    return env


async def _migrate(url: str) -> str:
    """Migrate; the server's version, for the report."""
    await migrate_url(url)
    conn = await asyncpg.connect(plain_url(url))
    try:
        version: str = await conn.fetchval("SHOW server_version")
        return version
    finally:
        await conn.close()


def settle(url: str) -> None:
    """Vacuum and checkpoint, so that no measurement pays for the rows the previous one wrote
    (autovacuum and checkpoints would otherwise land in whichever run comes next)."""

    async def run() -> None:
        conn = await asyncpg.connect(plain_url(url))
        try:
            await conn.execute("VACUUM (ANALYZE)")
            with contextlib.suppress(asyncpg.InsufficientPrivilegeError):  # not a superuser: skip it
                await conn.execute("CHECKPOINT")
        finally:
            await conn.close()

    asyncio.run(run())


@dataclass(frozen=True)
class ServiceRun:
    auth: str  # CLIENT_AUTH
    rows: list[Row]
    peak_rss: int
    processes: int
    counted: int  # requests /metrics counted over the run: proof that metrics were on
    meter_seconds: float  # what reading /proc cost (bench/cpu.py), over...
    meter_wall: float  # ...the measurements' wall time


def auth_modes(choice: str) -> tuple[str, ...]:
    """--client-auth both|api_key|header: the CLIENT_AUTH modes to measure, one service each."""
    return AUTH_MODES if choice == "both" else (choice,)


@dataclass(frozen=True)
class Database:
    url: str  # the primary
    read_url: str | None  # the replica (`--replica`), the service's DATABASE_READ_URL
    where: str


@contextlib.contextmanager
def database(args: argparse.Namespace, workdir: Path) -> Iterator[Database]:
    """`stack.postgres`, or with `--replica` a primary and a streaming replica of our own,
    started from the machine's PostgreSQL binaries as the replica tests start them."""
    if not args.replica:
        with stack.postgres(workdir) as (url, where):
            yield Database(url, None, where)
        return
    from tests.servers import primary_and_replica

    with primary_and_replica() as servers:
        yield Database(
            servers.primary_url,
            servers.replica_url,
            "a primary and a streaming replica of the bench's own (initdb, fsync=off), one machine",
        )


def measure_service(
    args: argparse.Namespace, kind: str, db: Database, workdir: Path, auth: str, *, first: bool
) -> ServiceRun:
    """The service over `db.url` with CLIENT_AUTH=`auth`, reading from `db.read_url`
    (`--replica`) when there is one. `first`: the run that credits the wallets and measures the
    admin scenario (its route does not depend on CLIENT_AUTH)."""
    provider_port, port = stack.free_port(), stack.free_port()
    admin_key = secrets.token_urlsafe(32)
    env = service_env(db.url, provider_port, port, admin_key, auth, os.environ.get("REDIS_URL"))
    with contextlib.ExitStack() as pooled:
        if db.read_url is not None:
            env["DATABASE_READ_URL"] = db.read_url
        if args.pooler == "transaction":
            # The service (not pgbench: the ceiling stays raw SQL on the server) through PgBouncer.
            from tests.servers import pgbouncer

            env["DATABASE_URL"] = pooled.enter_context(pgbouncer(db.url, pool_size=args.pooler_pool_size))
            if db.read_url is not None:
                bouncer = pgbouncer(db.read_url, pool_size=args.pooler_pool_size)
                env["DATABASE_READ_URL"] = pooled.enter_context(bouncer)
            env["DB_POOLER"] = "transaction"
        service = _Service(env, provider_port, port, admin_key, auth)
        return _measure(args, kind, db, workdir, service, first=first)


def compare_reads(args: argparse.Namespace, kind: str, db: Database, workdir: Path) -> list[paired.Paired]:
    """`--replica`, after the main run: the reads a replica serves through a service with and one
    without DATABASE_READ_URL, in alternating rounds (bench/replica.py). Direct connections, with
    the first of the measured CLIENT_AUTH modes."""
    assert db.read_url is not None
    read_url = db.read_url
    auth = auth_modes(args.client_auth)[0]
    provider_port = stack.free_port()
    admin_key = secrets.token_urlsafe(32)
    client_ids = [
        *(str(c) for c in range(FIRST_WALLET, FIRST_WALLET + WALLETS)),
        str(HOT_WALLET),
        str(DEBIT_WALLET),
    ]
    keys = asyncio.run(seed.api_keys(db.url, client_ids)) if auth == "api_key" else {}
    reads = [(s.name, s.requests) for s in scenarios(keys, admin_key) if s.replica_read]
    redis_url = os.environ.get("REDIS_URL")

    def env_for(port: int, with_replica: bool) -> dict[str, str]:
        env = service_env(db.url, provider_port, port, admin_key, auth, redis_url)
        if with_replica:
            env["DATABASE_READ_URL"] = read_url
        return env

    simulator = [sys.executable, "-m", "wallet.cli", "simulator", "--port", str(provider_port)]
    env = service_env(db.url, provider_port, 0, admin_key, auth, redis_url)
    with stack.process("provider-compare", simulator, env=env, workdir=workdir) as provider:
        stack.wait_port(provider_port, provider)
        return replica.compare(
            reads, env_for, workdir, kind=kind, seconds=args.duration, connections=args.connections
        )


def outbox_cost(args: argparse.Namespace, kind: str, db: Database, workdir: Path) -> outbox.OutboxCost:
    """The order scenarios through a service with and one without its outbox, then the SQL alone
    (bench/outbox.py), over the wallets the first run credited, with the first CLIENT_AUTH mode."""
    auth = auth_modes(args.client_auth)[0]
    provider_port = stack.free_port()
    admin_key = secrets.token_urlsafe(32)
    client_ids = [*(str(c) for c in range(FIRST_WALLET, FIRST_WALLET + WALLETS)), str(HOT_WALLET)]
    keys = asyncio.run(seed.api_keys(db.url, client_ids)) if auth == "api_key" else {}
    orders = [(s.name, s.requests) for s in scenarios(keys, admin_key) if s.orders]
    redis_url = os.environ.get("REDIS_URL")
    database = asyncio.run(cpu.backends(db.url))  # PostgreSQL's processes, metered on both measures

    def env_for(port: int) -> dict[str, str]:
        return service_env(db.url, provider_port, port, admin_key, auth, redis_url)

    simulator = [sys.executable, "-m", "wallet.cli", "simulator", "--port", str(provider_port)]
    with stack.process("provider-outbox", simulator, env=env_for(0), workdir=workdir) as provider:
        stack.wait_port(provider_port, provider)
        service = outbox.measure_service(
            orders,
            env_for,
            workdir,
            kind=kind,
            seconds=args.duration,
            connections=args.connections,
            database=database,
        )
    spread = (FIRST_WALLET, FIRST_WALLET + WALLETS - 1)
    sql = outbox.measure_sql(
        db.url,
        spread,
        workdir,
        clients=args.connections,
        seconds=args.duration,
        settle=settle,
        database=database,
        batch=outbox.formed_batch(service),
    )
    cost = outbox.OutboxCost(service, sql)
    print(
        f"bench: outbox cost {cost.cost:.1%} (the events' SQL: {outbox.percent(cost.share)} of an order;"
        " the SQL alone " + ", ".join(f"{pair.script} {pair.cost:.1%}" for pair in sql) + ")",
        file=sys.stderr,
    )
    return cost


@dataclass(frozen=True)
class _Service:
    env: dict[str, str]
    provider_port: int
    port: int
    admin_key: str
    auth: str


def counted_requests(port: int) -> int:
    """The requests `wallet_http_requests_total` counted, summed over every route, status and
    worker (/metrics in one worker sums them all)."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    lines = [line for line in text.splitlines() if line.startswith("wallet_http_requests_total{")]
    return round(sum(float(line.rsplit(" ", 1)[1]) for line in lines))


def _measure(
    args: argparse.Namespace, kind: str, db: Database, workdir: Path, run: _Service, *, first: bool
) -> ServiceRun:
    url = db.url
    label = " (replica)" if db.read_url else ""
    python = sys.executable
    # PostgreSQL's processes serving the bench database, on the primary and on the replica.
    primary = asyncio.run(cpu.backends(url))
    reader = asyncio.run(cpu.backends(db.read_url)) if db.read_url else None
    served_by = cpu.combined(primary, reader) if db.read_url else primary
    simulator = [python, "-m", "wallet.cli", "simulator", "--port", str(run.provider_port)]
    with stack.process(f"provider-{run.auth}", simulator, env=run.env, workdir=workdir) as provider:
        stack.wait_port(run.provider_port, provider)
        serve = [python, "-m", "wallet.cli", "serve"]
        name = f"service-{run.auth}"
        with (
            stack.process(name, serve, env=run.env, workdir=workdir) as service,
            stack.PeakRss(service.pid) as rss,
        ):
            stack.wait_http(f"http://127.0.0.1:{run.port}/ready", service, workdir / f"{name}.log")
            client_ids = [str(c) for c in range(FIRST_WALLET, FIRST_WALLET + WALLETS)]
            client_ids += [str(HOT_WALLET), str(DEBIT_WALLET)]
            if first:  # the wallets stay credited for the runs after it
                asyncio.run(seed.credit(f"http://127.0.0.1:{run.port}", run.admin_key, client_ids))
            keys = asyncio.run(seed.api_keys(url, client_ids)) if run.auth == "api_key" else {}
            service_tree = functools.partial(cpu.tree, service.pid)
            provider_tree = functools.partial(cpu.tree, provider.pid)
            rows = []
            meter_seconds = meter_wall = 0.0
            for scenario in scenarios(keys, run.admin_key):
                if not (scenario.client or first) or args.only == "outbox":
                    continue
                requests = load.write_requests(
                    scenario.requests, f"127.0.0.1:{run.port}", workdir / "requests.bin"
                )
                measure = {"seconds": args.duration, "connections": args.connections}
                settle(url)
                if args.warmup:
                    load.run(kind, run.port, requests, seconds=args.warmup, connections=args.connections)
                selects = {"service": service_tree, "database": served_by, "provider": provider_tree}
                with cpu.Meter(selects) as serving:
                    served = load.run(kind, run.port, requests, **measure)
                settle(url)
                pgbench_url = db.read_url if scenario.replica_read and db.read_url else url
                with cpu.Meter({"database": primary if pgbench_url == url else reader}) as pgbench:
                    raw = ceiling.run_pgbench(
                        pgbench_url,
                        scenario.script,
                        workdir,
                        clients=args.connections,
                        threads=2,
                        seconds=args.duration,
                    )
                row = Row(
                    scenario.name + (label if scenario.replica_read else ""),
                    served,
                    raw,
                    scenario.target,
                    auth=run.auth if scenario.client else "admin key",
                    cpu=Cpu(
                        serving.seconds.get("service"),
                        serving.seconds.get("database"),
                        pgbench.seconds.get("database"),
                        serving.seconds.get("provider"),
                    ),
                )
                meter_seconds += serving.own_seconds + pgbench.own_seconds
                meter_wall += serving.wall_seconds + pgbench.wall_seconds
                print(
                    f"bench: {row.scenario} [{row.auth}]: {served.rps:,.0f} req/s "
                    f"(p99 {served.p99_ms:.1f} ms, {served.errors} errors, CPU/req: service "
                    f"{_us(row.service_us)}, PostgreSQL {_us(row.database_us)}, "
                    f"provider {_us(row.provider_us)}), "
                    f"pgbench {raw.tps:,.0f} tps (PostgreSQL CPU/tx {_us(row.ceiling_database_us)}), "
                    f"{row.ratio:.2f}x",
                    file=sys.stderr,
                )
                rows.append(row)
            rss.sample()
            counted = counted_requests(run.port)
            return ServiceRun(run.auth, rows, rss.peak, rss.processes, counted, meter_seconds, meter_wall)


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f} µs"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per measurement (10)")
    parser.add_argument("--connections", type=int, default=32, help="HTTP connections and pgbench clients")
    parser.add_argument("--warmup", type=int, default=1, help="seconds of unmeasured load first (1)")
    parser.add_argument("--load", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument(
        "--client-auth",
        choices=["both", *AUTH_MODES],
        default="both",
        help="CLIENT_AUTH modes to measure the client scenarios in (both: a service started for each, "
        "api_key first; one mode is quicker)",
    )
    parser.add_argument(
        "--pooler",
        choices=["none", "transaction"],
        default="none",
        help="transaction: the service reaches PostgreSQL through a local PgBouncer in transaction mode",
    )
    parser.add_argument(
        "--pooler-pool-size", type=int, default=20, help="PgBouncer's server connections (default_pool_size)"
    )
    parser.add_argument(
        "--replica",
        action="store_true",
        help="start a primary and a streaming replica and serve with DATABASE_READ_URL; then compare "
        "the history and statement reads with and without it in alternating rounds",
    )
    parser.add_argument(
        "--only",
        choices=["all", "outbox"],
        default="all",
        help="outbox: seed the wallets, then measure only the outbox's cost (one CLIENT_AUTH mode)",
    )
    parser.add_argument(
        "--large-ledger", type=int, default=0, metavar="N", help="also compare 10 vs N ledger entries"
    )
    return parser.parse_args(argv)


def _terminate(signum: int, frame: FrameType | None) -> None:
    """SIGTERM unwinds like Ctrl-C, so every `finally` stops what it started."""
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _logs_kept_on_failure(workdir: Path) -> Iterator[None]:
    """The service's and the provider's logs live in a temporary directory: if the run fails,
    copy them out first, or what went wrong goes with it."""
    try:
        yield
    except BaseException:
        kept = report.RESULTS / f"failed-{datetime.now(UTC):%Y%m%dT%H%M%S}"
        kept.mkdir(parents=True, exist_ok=True)
        for log in workdir.glob("*.log"):
            shutil.copy(log, kept / log.name)
        print(f"bench: failed; the logs are in {kept}", file=sys.stderr)
        raise


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    kind = load.generator(args.load)
    started = datetime.now(UTC)
    with tempfile.TemporaryDirectory(prefix="wallet-bench-") as tmp:
        workdir = Path(tmp)
        with _logs_kept_on_failure(workdir), database(args, workdir) as db:
            version = asyncio.run(_migrate(db.url))
            runs = [
                measure_service(args, kind, db, workdir, auth, first=i == 0)
                for i, auth in enumerate(auth_modes(args.client_auth))
                if i == 0 or args.only == "all"
            ]
            cost = outbox_cost(args, kind, db, workdir)
            reads = compare_reads(args, kind, db, workdir) if db.read_url else []
            grown = []
            if args.large_ledger:
                grown = growth.measure(
                    db.url, args.large_ledger, workdir, clients=args.connections, seconds=args.duration
                )
    rows = [row for run in runs for row in run.rows]
    peak = max(runs, key=lambda run: run.peak_rss)
    metering = sum(run.meter_seconds for run in runs) / (sum(run.meter_wall for run in runs) or 1)
    limiter = "in Redis at REDIS_URL" if os.environ.get("REDIS_URL") else "in each worker's memory"
    about = {
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": report.machine(),
        "command": "make bench" + (f' BENCH_ARGS="{" ".join(sys.argv[1:])}"' if sys.argv[1:] else ""),
        "PostgreSQL": f"{version}, {db.where}",
        "service": f"wallet serve, APP_ENV=production, {os.cpu_count()} workers (default), "
        f"a fresh service per CLIENT_AUTH mode ({', '.join(auth_modes(args.client_auth))}; the auth column), "
        f"RATE_LIMIT={RATE_LIMIT} counted {limiter}, LOG_LEVEL=info LOG_FORMAT=json (an access line per"
        " request, to a file), metrics on"
        + (
            f", through PgBouncer 1.18 (pool_mode=transaction, default_pool_size={args.pooler_pool_size}),"
            " DB_POOLER=transaction (PgBouncer's CPU is in neither CPU column)"
            if args.pooler == "transaction"
            else ", direct to PostgreSQL"
        )
        + (", DATABASE_READ_URL=the replica" if args.replica else ""),
        "load": f"{kind}, {args.connections} keep-alive connections, {args.duration} s per measurement; "
        f"pgbench -M prepared -c {args.connections} -j 2",
        "metrics": ", ".join(f"{run.auth}: /metrics counted {run.counted:,} requests" for run in runs),
        "CPU meter": f"reading /proc every {cpu.INTERVAL * 1000:.0f} ms cost {metering:.1%} of one core",
    }
    markdown = report.render(
        rows,
        about=about,
        peak_rss=peak.peak_rss,
        processes=peak.processes,
        growth=grown,
        growth_size=args.large_ledger,
        sections=cost.render(args.duration) + replica.render(reads, args.duration),
    )
    print(markdown)
    saved = report.save(markdown, report.data(rows, about=about, outbox=cost))
    print(f"bench: written to {saved} and latest.json beside it", file=sys.stderr)


if __name__ == "__main__":
    main()
