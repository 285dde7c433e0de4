"""What the events outbox costs the order path, measured twice:

- the service: the orders scenario served by `wallet serve` as it is, and by the same service
  whose statements have every events CTE taken out (`app_without_outbox`, a worker factory only
  the bench uses). This is the issue's measure: what an order costs a client, group commit and
  all;
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

import os
import re
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI
from sqlalchemy import TextClause, text

from bench import ceiling, cpu, paired
from bench.load import Request
from bench.paired import Paired, Side
from wallet.events import INSERT_EVENT

TARGET = 0.10  # issue 12: the outbox costs the order path under 10%
SERVICE_ROUNDS = 5  # of each service, alternating
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


def strip_outbox() -> int:
    """Take the events CTEs out of every statement the service's modules hold; the number changed.
    A statement that is nothing but an event insert (an endpoint disabled) is not on the order
    path and stays."""
    import wallet.http.app  # noqa: F401 - every module the service runs is imported from here

    changed = 0
    for name, module in list(sys.modules.items()):
        if not name.startswith("wallet."):
            continue
        for attr, value in list(vars(module).items()):
            if isinstance(value, TextClause) and _EVENTS_CTE.search(value.text):
                setattr(module, attr, text(without_outbox(value.text)))
                changed += 1
    return changed


def app_without_outbox() -> FastAPI:
    """The service's worker factory with the outbox taken out: for `measure_service` only."""
    if not strip_outbox():
        raise RuntimeError("no events CTE found in the service's statements: update bench/outbox.py")
    from wallet.http.app import app_from_env

    return app_from_env()


SERVE_WITHOUT_OUTBOX = "import wallet.cli; wallet.cli.serve('bench.outbox:app_without_outbox')"


WITH, WITHOUT = "with events", "without events"


def _ratio_median(one: Paired) -> float:
    return statistics.median(one.ratios(WITH, WITHOUT))


def cpu_cost(one: Paired) -> float | None:
    """The outbox's share of the CPU an order takes (service + PostgreSQL, medians per side)."""
    with_events, without = one.cpu_per_request(WITH), one.cpu_per_request(WITHOUT)
    return 1 - without / with_events if with_events and without is not None else None


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


@dataclass(frozen=True)
class OutboxCost:
    service: list[Paired]  # the order scenarios through the service, WITH and WITHOUT
    with_events: list[ceiling.Ceiling]  # the database alone: pgbench, single-order statements
    without: list[ceiling.Ceiling]

    @staticmethod
    def _tps(runs: list[ceiling.Ceiling]) -> float:
        return sum(r.tps for r in runs) / len(runs) if runs else 0.0

    @property
    def tps_with(self) -> float:
        return self._tps(self.with_events)

    @property
    def tps_without(self) -> float:
        return self._tps(self.without)

    @property
    def sql_cost(self) -> float:
        """The share of the raw order statements' throughput the outbox takes (negative: noise)."""
        return 1 - self.tps_with / self.tps_without if self.tps_without else 0.0

    @property
    def cost(self) -> float:
        """The issue's measure: the outbox's share of the service's order throughput, the worst
        order scenario's median of per-round ratios (negative: noise)."""
        return max((1 - _ratio_median(one) for one in self.service), default=0.0)

    @property
    def errors(self) -> list[str]:
        failed = [r.error for r in (*self.with_events, *self.without) if r.error]
        return failed + [f"{one.scenario}: {one.errors()} errors" for one in self.service if one.errors()]

    def verdict(self) -> str:
        missed = not self.service or self.cost >= TARGET or self.errors
        return f"< {TARGET:.0%}, 0 errors: " + ("MISSED" if missed else "met")

    def data(self) -> dict[str, object]:
        """The figures for `latest.json`."""
        return {
            "cost": self.cost,
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
            "sql": {"tps_with": self.tps_with, "tps_without": self.tps_without, "cost": self.sql_cost},
        }

    def render(self, seconds: int) -> list[str]:
        lines = [
            "",
            "## Outbox cost",
            "",
            f"The service's order scenarios through `wallet serve` as it is and through the same service"
            f" with its events CTEs taken out (bench/outbox.py), {SERVICE_ROUNDS} alternating rounds of"
            f" {seconds} s, medians; outbox cost = 1 - with / without (median of the rounds' ratios)."
            " The CPU columns are the service's and PostgreSQL's CPU per order (bench/cpu.py), medians:"
            " steadier than req/s on a shared machine, and the same share when the box is CPU-bound.",
            "",
            "| order path | with events req/s | without events req/s | outbox cost (range) "
            "| CPU µs/order with / without | CPU share | target |",
            "|---|---|---|---|---|---|---|",
        ]
        for one in self.service:
            costs = [1 - r for r in one.ratios(WITH, WITHOUT)]
            lines.append(
                f"| {one.scenario} | {one.rps(WITH):,.0f} | {one.rps(WITHOUT):,.0f} | "
                f"{1 - _ratio_median(one):.1%} ({min(costs):.1%} to {max(costs):.1%}) | "
                f"{_us(one.cpu_per_request(WITH))} / {_us(one.cpu_per_request(WITHOUT))} | "
                f"{_share(cpu_cost(one))} | {self.verdict()} |"
            )
        lines += [
            f"| the SQL alone (pgbench: single-order place + complete, mean of {len(self.with_events)}) | "
            f"{self.tps_with:,.0f} tps | {self.tps_without:,.0f} tps | {self.sql_cost:.1%} | | | "
            "(no target: nothing amortised) |",
            *(f"- {error}" for error in self.errors),
        ]
        return lines


def measure_sql(
    url: str,
    client_ids: tuple[int, int],
    workdir: Path,
    *,
    clients: int,
    seconds: int,
    settle: Callable[[str], None],
) -> tuple[list[ceiling.Ceiling], list[ceiling.Ceiling]]:
    """pgbench on the single-order statements with and without their events CTEs, alternating."""
    script = ceiling.order(client_ids)
    bare = ceiling.Script(f"{script.name} without outbox", without_outbox(script.text), script.defines)
    runs: dict[str, list[ceiling.Ceiling]] = {script.name: [], bare.name: []}
    for _ in range(SQL_ROUNDS):
        for variant in (script, bare):
            settle(url)
            runs[variant.name].append(
                ceiling.run_pgbench(url, variant, workdir, clients=clients, threads=2, seconds=seconds)
            )
    return runs[script.name], runs[bare.name]


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
    """`orders`: (scenario, requests) already seeded; both services serve the same database,
    whose processes `database` selects (None: no CPU figures)."""
    here = str(Path(__file__).resolve().parent.parent)

    def bare_env(port: int) -> dict[str, str]:
        env = env_for(port)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
        return env

    sides = {
        WITH: Side(paired.SERVE, env_for),
        WITHOUT: Side([sys.executable, "-c", SERVE_WITHOUT_OUTBOX], bare_env),
    }
    return paired.compare(
        orders,
        sides,
        workdir,
        kind=kind,
        seconds=seconds,
        connections=connections,
        rounds=SERVICE_ROUNDS,
        database=database,
    )
