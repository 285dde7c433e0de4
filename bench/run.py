"""`make bench`: the service under load, next to pgbench running the same SQL, in one run.

    make bench                                        # 10 s per measurement, 32 connections
    make bench BENCH_ARGS="--duration 30"
    make bench BENCH_ARGS="--large-ledger 10000000"   # adds cost growth (minutes, GBs of disk)
    make bench BENCH_ARGS="--replica"                 # reads from a streaming replica, and without

Starts PostgreSQL (a fresh database on DATABASE_URL's server, else an embedded one), the
fulfillment simulator and `wallet serve` in production mode on loopback; credits the wallets;
then for each scenario drives the service with wrk (or the Python fallback) and the same
statements with pgbench, and prints one table. Everything it started is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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

from bench import ceiling, growth, load, outbox, paired, replica, report, seed, stack
from bench.load import Request
from bench.report import Row, Target
from wallet.database import migrate_url, plain_url
from wallet.settings import Settings

FIRST_WALLET, WALLETS = 100001, 1000  # client ids are numbers so pgbench can pick them
HOT_WALLET, DEBIT_WALLET = 200001, 300001


@dataclass(frozen=True)
class Scenario:
    name: str
    requests: list[Request]  # one is picked at random per request
    script: ceiling.Script  # the same work as raw SQL
    target: Target
    replica_read: bool = False  # served by DATABASE_READ_URL when set (README: which reads go where)
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
            Target(ratio=0.5, p99_ms=50),
            orders=True,
        ),
        Scenario(
            "orders, one hot wallet",
            [Request("POST", "/orders", client(HOT_WALLET), order)],
            ceiling.order((HOT_WALLET, HOT_WALLET)),
            Target(ratio=0.9),
            orders=True,
        ),
        Scenario(
            f"balance reads, {WALLETS:,} wallets",
            [Request("GET", "/wallet/balance", client(c)) for c in spread],
            ceiling.balance(ids),
            Target(ratio=0.2),
        ),
        Scenario(
            "admin debits, one wallet",
            [Request("POST", "/admin/wallet/debit", admin, debit)],
            ceiling.debit(DEBIT_WALLET),
            Target(),
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
    database_url: str, provider_port: int, port: int, admin_key: str, client_auth: str
) -> dict[str, str]:
    """Production settings; anything else the caller's environment says about the service is dropped."""
    ours = {name.upper() for name in Settings.model_fields} | {"PROMETHEUS_MULTIPROC_DIR"}
    env = {name: value for name, value in os.environ.items() if name not in ours}
    env.update(
        APP_ENV="production",
        DATABASE_URL=database_url,
        ADMIN_API_KEY=admin_key,
        LEDGER_KEY=ceiling.LEDGER_KEY.secret.decode(),
        LEDGER_KEY_ID=ceiling.LEDGER_KEY.key_id,
        FULFILLMENT_API_URL=f"http://127.0.0.1:{provider_port}/fulfillments",
        CLIENT_AUTH=client_auth,
        RATE_LIMIT="off",
        LOG_LEVEL="warning",
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
    rows: list[Row]
    peak_rss: int
    processes: int
    outbox: outbox.OutboxCost


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


def measure_service(args: argparse.Namespace, kind: str, db: Database, workdir: Path) -> ServiceRun:
    """The service over `db.url`, reading from `db.read_url` (`--replica`) when there is one."""
    python = sys.executable
    provider_port, port = stack.free_port(), stack.free_port()
    admin_key = secrets.token_urlsafe(32)
    env = service_env(db.url, provider_port, port, admin_key, args.client_auth)
    simulator = [python, "-m", "wallet.cli", "simulator", "--port", str(provider_port)]
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
        return _measure(args, kind, db, workdir, env, simulator, provider_port, port, admin_key)


def compare_reads(args: argparse.Namespace, kind: str, db: Database, workdir: Path) -> list[paired.Paired]:
    """`--replica`, after the main run: the reads a replica serves through a service with and one
    without DATABASE_READ_URL, in alternating rounds (bench/replica.py). Direct connections."""
    assert db.read_url is not None
    read_url = db.read_url
    provider_port = stack.free_port()
    admin_key = secrets.token_urlsafe(32)
    client_ids = [
        *(str(c) for c in range(FIRST_WALLET, FIRST_WALLET + WALLETS)),
        str(HOT_WALLET),
        str(DEBIT_WALLET),
    ]
    keys = asyncio.run(seed.api_keys(db.url, client_ids)) if args.client_auth == "api_key" else {}
    reads = [(s.name, s.requests) for s in scenarios(keys, admin_key) if s.replica_read]

    def env_for(port: int, with_replica: bool) -> dict[str, str]:
        env = service_env(db.url, provider_port, port, admin_key, args.client_auth)
        if with_replica:
            env["DATABASE_READ_URL"] = read_url
        return env

    simulator = [sys.executable, "-m", "wallet.cli", "simulator", "--port", str(provider_port)]
    env = service_env(db.url, provider_port, 0, admin_key, args.client_auth)
    with stack.process("provider-compare", simulator, env=env, workdir=workdir) as provider:
        stack.wait_port(provider_port, provider)
        return replica.compare(
            reads, env_for, workdir, kind=kind, seconds=args.duration, connections=args.connections
        )


def _measure(
    args: argparse.Namespace,
    kind: str,
    db: Database,
    workdir: Path,
    env: dict[str, str],
    simulator: list[str],
    provider_port: int,
    port: int,
    admin_key: str,
) -> ServiceRun:
    url = db.url
    label = " (replica)" if db.read_url else ""
    python = sys.executable
    with stack.process("provider", simulator, env=env, workdir=workdir) as provider:
        stack.wait_port(provider_port, provider)
        serve = [python, "-m", "wallet.cli", "serve"]
        with (
            stack.process("service", serve, env=env, workdir=workdir) as service,
            stack.PeakRss(service.pid) as rss,
        ):
            stack.wait_http(f"http://127.0.0.1:{port}/ready", service, workdir / "service.log")
            client_ids = [str(c) for c in range(FIRST_WALLET, FIRST_WALLET + WALLETS)]
            client_ids += [str(HOT_WALLET), str(DEBIT_WALLET)]
            asyncio.run(seed.credit(f"http://127.0.0.1:{port}", admin_key, client_ids))
            keys = asyncio.run(seed.api_keys(url, client_ids)) if args.client_auth == "api_key" else {}
            rows = []
            for scenario in scenarios(keys, admin_key):
                requests = load.write_requests(
                    scenario.requests, f"127.0.0.1:{port}", workdir / "requests.bin"
                )
                measure = {"seconds": args.duration, "connections": args.connections}
                settle(url)
                if args.warmup:
                    load.run(kind, port, requests, seconds=args.warmup, connections=args.connections)
                served = load.run(kind, port, requests, **measure)
                settle(url)
                raw = ceiling.run_pgbench(
                    (db.read_url or url) if scenario.replica_read else url,
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
                )
                print(
                    f"bench: {row.scenario}: {served.rps:,.0f} req/s (p99 {served.p99_ms:.1f} ms, "
                    f"{served.errors} errors), pgbench {raw.tps:,.0f} tps, {row.ratio:.2f}x",
                    file=sys.stderr,
                )
                rows.append(row)
            rss.sample()
        orders = [(s.name, s.requests) for s in scenarios(keys, admin_key) if s.orders]
        cost = _outbox_cost(args, kind, db, workdir, env, orders)
    return ServiceRun(rows, rss.peak, rss.processes, cost)


def _outbox_cost(
    args: argparse.Namespace,
    kind: str,
    db: Database,
    workdir: Path,
    env: dict[str, str],
    orders: list[tuple[str, list[Request]]],
) -> outbox.OutboxCost:
    """The order scenarios through the service with and without its outbox, then the SQL alone
    (bench/outbox.py), over the wallets the main run credited."""

    def env_for(port: int) -> dict[str, str]:
        return {**env, "PORT": str(port)}

    service = outbox.measure_service(
        orders, env_for, workdir, kind=kind, seconds=args.duration, connections=args.connections
    )
    spread = (FIRST_WALLET, FIRST_WALLET + WALLETS - 1)
    with_events, without = outbox.measure_sql(
        db.url, spread, workdir, clients=args.connections, seconds=args.duration, settle=settle
    )
    cost = outbox.OutboxCost(service, with_events, without)
    print(f"bench: outbox cost {cost.cost:.1%} (the SQL alone {cost.sql_cost:.1%})", file=sys.stderr)
    return cost


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per measurement (10)")
    parser.add_argument("--connections", type=int, default=32, help="HTTP connections and pgbench clients")
    parser.add_argument("--warmup", type=int, default=1, help="seconds of unmeasured load first (1)")
    parser.add_argument("--load", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument(
        "--client-auth",
        choices=["api_key", "header"],
        default="api_key",
        help="how the service authenticates clients (api_key: the production default)",
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
            run = measure_service(args, kind, db, workdir)
            reads = compare_reads(args, kind, db, workdir) if db.read_url else []
            grown = []
            if args.large_ledger:
                grown = growth.measure(
                    db.url, args.large_ledger, workdir, clients=args.connections, seconds=args.duration
                )
    about = {
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": report.machine(),
        "command": "make bench" + (f' BENCH_ARGS="{" ".join(sys.argv[1:])}"' if sys.argv[1:] else ""),
        "PostgreSQL": f"{version}, {db.where}",
        "service": f"wallet serve, APP_ENV=production, {os.cpu_count()} workers (default), "
        f"CLIENT_AUTH={args.client_auth}, RATE_LIMIT=off"
        + (
            f", through PgBouncer 1.18 (pool_mode=transaction, default_pool_size={args.pooler_pool_size}),"
            " DB_POOLER=transaction"
            if args.pooler == "transaction"
            else ", direct to PostgreSQL"
        )
        + (", DATABASE_READ_URL=the replica" if args.replica else ""),
        "load": f"{kind}, {args.connections} keep-alive connections, {args.duration} s per measurement; "
        f"pgbench -M prepared -c {args.connections} -j 2",
    }
    markdown = report.render(
        run.rows,
        about=about,
        peak_rss=run.peak_rss,
        processes=run.processes,
        growth=grown,
        growth_size=args.large_ledger,
        sections=run.outbox.render(args.duration) + replica.render(reads, args.duration),
    )
    print(markdown)
    print(f"bench: written to {report.save(markdown)}", file=sys.stderr)


if __name__ == "__main__":
    main()
