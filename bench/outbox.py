"""What the events outbox costs the order path, measured twice:

- the service: the order scenarios served by one `wallet serve` whose workers switch, round by
  round, between their statements as they are and the same statements with every events CTE
  taken out (`app_switching_outbox`, a worker factory only the bench uses). This is the issue's
  measure: what an order costs a client, group commit and all;
- the database alone: the ceiling's order script (the service's single-order place and complete
  statements) run by pgbench as it is and without its events CTEs: what the outbox adds to one
  order's SQL with nothing amortised, the figure to watch when the events schema changes.

Both variants are derived from the same statements, not written a second time: `without_outbox`
drops each CTE whose body is `events.INSERT_EVENT …` (with it the trigger that queues the event
for delivery never fires), so whatever the order statements become, the runs differ by the
outbox alone. Runs alternate, each after a vacuum and checkpoint, to spread the machine's drift
over both.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import signal
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from sqlalchemy import TextClause, text
from starlette.types import ASGIApp, Receive, Scope, Send

from bench import ceiling, cpu, paired
from bench.load import Request
from bench.paired import Paired, Side
from wallet import database
from wallet.events import INSERT_EVENT

TARGET = 0.10  # issue 12: the outbox costs the order path under 10%
SERVICE_ROUNDS = 6  # of each service, in ABBA order (bench/paired.py)
SQL_ROUNDS = 2  # of each pgbench variant, alternating
_EVENTS_CTE = re.compile(r",\s*\w+\s+AS\s*\(\s*" + re.escape(INSERT_EVENT))


def _closing(sql: str, start: int) -> int:
    """The index of the parenthesis closing the one at `start`, skipping quoted text."""
    depth, i = 0, start
    while i < len(sql):
        char = sql[i]
        if char == "'":
            i = sql.index("'", i + 1)
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise ValueError("unbalanced parentheses in a bench statement")


def without_outbox(sql: str) -> str:
    """`sql` with every `, name AS (INSERT INTO events …)` CTE removed."""
    while (found := _EVENTS_CTE.search(sql)) is not None:
        end = _closing(sql, sql.index("(", found.start()))
        sql = sql[: found.start()] + sql[end + 1 :]
    if INSERT_EVENT in sql:
        raise ValueError("an events insert the bench cannot take out: update bench/outbox.py")
    return sql


WITH, WITHOUT = "with events", "without events"
ACKS_ENV = "BENCH_OUTBOX_ACKS"  # a directory where each worker of the switching service says its arm
SWITCH_SIGNALS = {WITH: signal.SIGUSR2, WITHOUT: signal.SIGUSR1}


@dataclass(frozen=True)
class Statement:
    """A statement of the service's that writes events, as it is and without its events CTEs."""

    module: ModuleType
    name: str
    with_events: TextClause | database.Statement
    without: TextClause | database.Statement

    def use(self, arm: str) -> None:
        setattr(self.module, self.name, self.with_events if arm == WITH else self.without)


def outbox_statements() -> list[Statement]:
    """Every statement the service's modules hold with an events CTE. A statement that is nothing
    but an event insert (an endpoint disabled) is not on the order path and is left out."""
    import wallet.http.app  # noqa: F401 - every module the service runs is imported from here

    found = []
    for name, module in list(sys.modules.items()):
        if not name.startswith("wallet."):
            continue
        for attr, value in list(vars(module).items()):
            if isinstance(value, TextClause | database.Statement) and _EVENTS_CTE.search(value.text):
                without = text(without_outbox(value.text))
                bare = database.Statement.of(without) if isinstance(value, database.Statement) else without
                found.append(Statement(module, attr, value, bare))
    if not found:
        raise RuntimeError("no events CTE found in the service's statements: update bench/outbox.py")
    return found


def app_switching_outbox() -> ASGIApp:
    """The service's worker factory, for `measure_service` only: the worker serves its statements
    as they are until SIGUSR1 takes their events CTEs out (SIGUSR2 puts them back), and writes the
    arm it is in to a file named by its pid under $BENCH_OUTBOX_ACKS, so the bench knows when
    every worker has switched. The functions that run the statements read them from their
    modules at each call, so a switch takes effect from the next statement on."""
    statements = outbox_statements()
    from wallet.http.app import app_from_env

    app = app_from_env()
    ack = Path(os.environ[ACKS_ENV]) / str(os.getpid())

    def switch(arm: str) -> None:
        for statement in statements:
            statement.use(arm)
        ack.write_text(arm)

    async def switching(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":  # once, at start, in the worker's event loop
            loop = asyncio.get_running_loop()
            for arm, signum in SWITCH_SIGNALS.items():
                loop.add_signal_handler(signum, switch, arm)
            switch(WITH)  # says the worker is ready to be switched
        await app(scope, receive, send)

    return switching


SERVE_SWITCHING = "import wallet.cli; wallet.cli.serve('bench.outbox:app_switching_outbox')"


@dataclass(frozen=True)
class Switch:
    """Puts every worker of the switching service into one arm, and waits until each says so."""

    acks: Path
    workers: int
    timeout: float = 30.0

    def arms(self) -> list[str]:
        """The arm each worker last said it is in."""
        return [ack.read_text() for ack in sorted(self.acks.iterdir())]

    def _wait(self, done: Callable[[list[str]], bool], what: str) -> None:
        deadline = time.monotonic() + self.timeout
        while not done(self.arms()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the service's workers did not {what} within {self.timeout:.0f} s")
            time.sleep(0.01)

    def __call__(self, arm: str) -> None:
        self._wait(lambda arms: len(arms) == self.workers, "all start")
        for ack in self.acks.iterdir():
            os.kill(int(ack.name), SWITCH_SIGNALS[arm])
        self._wait(lambda arms: arms == [arm] * self.workers, f"switch to {arm}")


BATCH = 16  # orders per statement in the SQL measure of group commit, when the service's is unknown


def _ratio_median(one: Paired) -> float:
    return statistics.median(one.ratios(WITH, WITHOUT))


def cpu_cost(one: Paired) -> float | None:
    """The outbox's share of the CPU an order takes (service + PostgreSQL, medians per side)."""
    with_events, without = one.cpu_per_request(WITH), one.cpu_per_request(WITHOUT)
    return 1 - without / with_events if with_events and without is not None else None


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _batch(one: Paired, side: str) -> str:
    mean = one.batch_means.get(side, {}).get("placement")
    return "-" if mean is None else f"{mean:.1f}"


@dataclass(frozen=True)
class SqlRun:
    """One pgbench run of an order script, and PostgreSQL's CPU seconds over it (None: the
    database's processes are not visible here)."""

    pgbench: ceiling.Ceiling
    orders_per_tx: int
    database_seconds: float | None = None

    @property
    def orders_per_s(self) -> float:
        return self.pgbench.tps * self.orders_per_tx

    @property
    def cpu_us(self) -> float | None:
        """PostgreSQL's CPU per order."""
        orders = self.pgbench.transactions * self.orders_per_tx
        return None if self.database_seconds is None or not orders else self.database_seconds / orders * 1e6


@dataclass(frozen=True)
class SqlPair:
    """An order script run by pgbench as it is and without its events CTEs, alternating."""

    script: str
    with_events: list[SqlRun]
    without: list[SqlRun]

    @staticmethod
    def _mean(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return sum(known) / len(known) if known and len(known) == len(values) else None

    def orders_per_s(self, side: str) -> float:
        runs = self.with_events if side == WITH else self.without
        return sum(r.orders_per_s for r in runs) / len(runs) if runs else 0.0

    def cpu_us(self, side: str) -> float | None:
        return self._mean([r.cpu_us for r in (self.with_events if side == WITH else self.without)])

    @property
    def cost(self) -> float:
        """The share of the statements' throughput the outbox takes (negative: noise)."""
        without = self.orders_per_s(WITHOUT)
        return 1 - self.orders_per_s(WITH) / without if without else 0.0

    @property
    def added_us(self) -> float | None:
        """PostgreSQL CPU the events add to an order."""
        with_events, without = self.cpu_us(WITH), self.cpu_us(WITHOUT)
        return None if with_events is None or without is None else with_events - without

    @property
    def errors(self) -> list[str]:
        return [r.pgbench.error for r in (*self.with_events, *self.without) if r.pgbench.error]


@dataclass(frozen=True)
class OutboxCost:
    service: list[Paired]  # the order scenarios through the service, WITH and WITHOUT
    sql: list[SqlPair]  # the database alone: single orders, then group-committed batches

    @property
    def as_served(self) -> SqlPair | None:
        """The SQL run at the batch size the service formed (the last pair measured)."""
        return self.sql[-1] if self.sql else None

    @property
    def share(self) -> float | None:
        """What the events' own SQL accounts for: the PostgreSQL CPU they add to an order in
        statements of the size the service's group commit formed, over the CPU (service +
        PostgreSQL) an order takes on the service path with its events, in the cheapest order
        scenario (the largest share). Steady, but blind to whatever else the events cost a
        running service (autovacuum of the table, contention): a floor, not the verdict."""
        added = self.as_served.added_us if self.as_served else None
        spent = [one.cpu_per_request(WITH) for one in self.service]
        known = [s for s in spent if s]
        if added is None or not known or len(known) != len(spent):
            return None
        return max(0.0, added) / min(known)

    @property
    def cost(self) -> float:
        """The issue's measure, what a client feels: the worst order scenario's median of the
        per-round ratios of req/s with and without events (negative: noise)."""
        return max((1 - _ratio_median(one) for one in self.service), default=0.0)

    @property
    def errors(self) -> list[str]:
        failed = [error for pair in self.sql for error in pair.errors]
        return failed + [f"{one.scenario}: {one.errors()} errors" for one in self.service if one.errors()]

    def verdict(self) -> str:
        missed = not self.service or self.cost >= TARGET or self.errors
        return f"< {TARGET:.0%}, 0 errors: " + ("MISSED" if missed else "met")

    def data(self) -> dict[str, object]:
        """The figures for `latest.json`."""
        return {
            "cost": self.cost,
            "sql_share": self.share,
            "verdict": self.verdict(),
            "service": [
                {
                    "scenario": one.scenario,
                    "rps_with": one.rps(WITH),
                    "rps_without": one.rps(WITHOUT),
                    "ratios": one.ratios(WITH, WITHOUT),
                    "cpu_us_with": one.cpu_per_request(WITH),
                    "cpu_us_without": one.cpu_per_request(WITHOUT),
                    "cpu_cost": cpu_cost(one),
                }
                for one in self.service
            ],
            "sql": [
                {
                    "script": pair.script,
                    "orders_per_s_with": pair.orders_per_s(WITH),
                    "orders_per_s_without": pair.orders_per_s(WITHOUT),
                    "cost": pair.cost,
                    "database_us_with": pair.cpu_us(WITH),
                    "database_us_without": pair.cpu_us(WITHOUT),
                }
                for pair in self.sql
            ],
        }

    def render(self, seconds: int) -> list[str]:
        served = self.as_served
        lines = [
            "",
            "## Outbox cost",
            "",
            f"**The outbox's cost to the order path: {percent(self.cost)}** ({self.verdict()}): the worse"
            " order scenario's throughput with events against without, below. "
            + (
                f"The events' own SQL accounts for {percent(self.share)} of an order's CPU: the PostgreSQL"
                f" CPU they add to an order in statements of {served.with_events[0].orders_per_tx} orders,"
                " the size the service's group commit formed (the smallest mean of its order scenarios;"
                f" {_us(served.added_us)} µs, the SQL alone below), over the CPU an order takes on the"
                " service path with its events (the cheapest scenario, service + PostgreSQL). That figure"
                " is steady but a floor: it leaves out what the events cost a running service beyond"
                " their statements (autovacuum of the table, contention). A round of req/s moves by"
                " ±20 % on this machine: read the throughput cost across runs."
                if self.share is not None and served is not None
                else ""
            ),
            "",
            f"The service's order scenarios through `wallet serve` as it is and through the same service"
            f" with its events CTEs taken out (bench/outbox.py), {SERVICE_ROUNDS} rounds of {seconds} s in"
            " ABBA order, medians; outbox cost = 1 - with / without (median of the rounds' ratios)."
            " The CPU columns are the service's and PostgreSQL's CPU per order (bench/cpu.py), medians.",
            "",
            "| order path | with events req/s | without events req/s | outbox cost (range) "
            "| CPU µs/order with / without | CPU share | placements per statement with / without |",
            "|---|---|---|---|---|---|---|",
        ]
        for one in self.service:
            costs = [1 - r for r in one.ratios(WITH, WITHOUT)]
            lines.append(
                f"| {one.scenario} | {one.rps(WITH):,.0f} | {one.rps(WITHOUT):,.0f} | "
                f"{1 - _ratio_median(one):.1%} ({min(costs):.1%} to {max(costs):.1%}) | "
                f"{_us(one.cpu_per_request(WITH))} / {_us(one.cpu_per_request(WITHOUT))} | "
                f"{percent(cpu_cost(one))} | {_batch(one, WITH)} / {_batch(one, WITHOUT)} |"
            )
        lines += [
            "",
            f"The SQL alone: pgbench on the service's order statements as they are and without their"
            f" events CTEs, {SQL_ROUNDS} alternating runs each of {seconds} s, means.",
            "",
            "| statements | with events orders/s | without events orders/s | throughput cost "
            "| PostgreSQL CPU µs/order with / without | added by the events |",
            "|---|---|---|---|---|---|",
        ]
        for pair in self.sql:
            lines.append(
                f"| {pair.script} | {pair.orders_per_s(WITH):,.0f} | {pair.orders_per_s(WITHOUT):,.0f} | "
                f"{pair.cost:.1%} | {_us(pair.cpu_us(WITH))} / {_us(pair.cpu_us(WITHOUT))} | "
                f"{_us(pair.added_us)} µs |"
            )
        lines += [f"- {error}" for error in self.errors]
        return lines


def formed_batch(service: Sequence[Paired]) -> int:
    """The placements per statement the service with events formed in its order scenarios: the
    smallest mean (the least amortised), or BATCH when /metrics did not say."""
    means = [one.batch_means.get(WITH, {}).get("placement") for one in service]
    known = [m for m in means if m]
    return max(1, int(min(known))) if known else BATCH


def measure_sql(
    url: str,
    client_ids: tuple[int, int],
    workdir: Path,
    *,
    clients: int,
    seconds: int,
    settle: Callable[[str], None],
    database: cpu.Select | None,
    batch: int = BATCH,
) -> list[SqlPair]:
    """pgbench on the single-order statements, then on batches of `batch` as group commit runs
    them, each with and without its events CTEs, alternating; PostgreSQL's CPU metered."""
    pairs = []
    scripts = [(ceiling.order(client_ids), 1)]
    if batch > 1:
        scripts.append((ceiling.batch_order(client_ids, batch), batch))
    for script, per_tx in scripts:
        bare = ceiling.Script(f"{script.name} without outbox", without_outbox(script.text), script.defines)
        runs: dict[str, list[SqlRun]] = {WITH: [], WITHOUT: []}
        for _ in range(SQL_ROUNDS):
            for side, variant in ((WITH, script), (WITHOUT, bare)):
                settle(url)
                with cpu.Meter({"database": database}) as meter:
                    run = ceiling.run_pgbench(
                        url, variant, workdir, clients=clients, threads=2, seconds=seconds
                    )
                runs[side].append(SqlRun(run, per_tx, meter.seconds.get("database")))
        name = (
            "single orders: place + complete"
            if per_tx == 1
            else f"group commit: {per_tx} placed + {per_tx} completed"
        )
        pairs.append(SqlPair(name, runs[WITH], runs[WITHOUT]))
    return pairs


def measure_service(
    orders: Sequence[tuple[str, list[Request]]],
    env_for: Callable[[int], dict[str, str]],
    workdir: Path,
    *,
    kind: str,
    seconds: int,
    connections: int,
    database: cpu.Select | None,
) -> list[Paired]:
    """`orders`: (scenario, requests) already seeded. One service serves both arms, switched
    between them before each round (`app_switching_outbox`): two services started alike still
    differed by up to 12 % for a whole run here, which is more than the cost being measured."""
    here = str(Path(__file__).resolve().parent.parent)
    acks = workdir / "outbox-acks"
    acks.mkdir()
    workers = os.cpu_count() or 1  # the production default, said explicitly so the switch knows

    def switching_env(port: int) -> dict[str, str]:
        env = env_for(port)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
        env.update({ACKS_ENV: str(acks), "WORKERS": str(workers)})
        return env

    switch = Switch(acks, workers)
    return paired.compare(
        orders,
        {"service": Side([sys.executable, "-c", SERVE_SWITCHING], switching_env)},
        workdir,
        kind=kind,
        seconds=seconds,
        connections=connections,
        rounds=SERVICE_ROUNDS,
        database=database,
        arms={arm: paired.Arm("service", functools.partial(switch, arm)) for arm in (WITH, WITHOUT)},
    )
