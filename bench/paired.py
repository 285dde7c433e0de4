"""Two services measured against each other so that a shared machine's changing load does not
decide the answer: both are up for the whole comparison, and each scenario is driven through
one, then the other, round after round, so each pair of measurements sees about the same
background load. `--replica` (with and without DATABASE_READ_URL) is such a comparison. The
outbox's cost (with and without the events CTEs) goes further: one service switches between its
two arms before each round, so nothing about a process weighs on one arm only.
"""

from __future__ import annotations

import contextlib
import functools
import re
import statistics
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench import cpu, load, stack
from bench.load import Load, Request

SERVE = [sys.executable, "-m", "wallet.cli", "serve"]
WARM_UP_SECONDS = 3


@dataclass(frozen=True)
class Side:
    """One service: its command and its environment for a port."""

    command: list[str]
    env_for: Callable[[int], dict[str, str]]


@dataclass(frozen=True)
class Paired:
    scenario: str
    loads: Mapping[str, list[Load]]  # side -> one Load per round, in round order
    cpu_us: Mapping[str, list[float]] | None = None  # side -> CPU µs per request (service +
    # PostgreSQL) per round; None when the database's processes are not visible here
    batch_means: Mapping[str, Mapping[str, float]] = field(default_factory=dict)  # side -> batch
    # kind (batching.Batcher) -> calls per group-commit statement over the scenario's rounds

    @staticmethod
    def _median(loads: list[Load], figure: Callable[[Load], float]) -> float:
        return statistics.median(figure(one) for one in loads)

    def rps(self, side: str) -> float:
        return self._median(list(self.loads[side]), lambda one: one.rps)

    def p50_ms(self, side: str) -> float:
        return self._median(list(self.loads[side]), lambda one: one.p50_ms)

    def ratios(self, side: str, other: str) -> list[float]:
        """side / other req/s of each round."""
        pairs = zip(self.loads[side], self.loads[other], strict=True)
        return [a.rps / b.rps if b.rps else 0.0 for a, b in pairs]

    def cpu_per_request(self, side: str) -> float | None:
        """Median CPU µs per request: a steadier measure than req/s on a shared machine."""
        return statistics.median(self.cpu_us[side]) if self.cpu_us else None

    def errors(self) -> int:
        return sum(one.errors for loads in self.loads.values() for one in loads)


_BATCH_METRIC = re.compile(r'^wallet_batch_size_(sum|count)\{kind="([a-z_]+)"\} (\S+)$', re.MULTILINE)


def batch_totals(port: int) -> dict[str, tuple[float, float]]:
    """Per batch kind, the calls and the statements the service's group commit counted so far
    (its /metrics sums every worker)."""
    totals: dict[str, dict[str, float]] = {}
    for part, kind, value in _BATCH_METRIC.findall(
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    ):
        totals.setdefault(kind, {})[part] = float(value)
    return {kind: (t.get("sum", 0.0), t.get("count", 0.0)) for kind, t in totals.items()}


def _add(
    totals: dict[str, tuple[float, float]],
    before: dict[str, tuple[float, float]],
    after: dict[str, tuple[float, float]],
) -> None:
    """Add what a round counted (`after` - `before`) to an arm's `totals`."""
    for kind, (calls, statements) in after.items():
        earlier = before.get(kind, (0.0, 0.0))
        sums = totals.get(kind, (0.0, 0.0))
        totals[kind] = (sums[0] + calls - earlier[0], sums[1] + statements - earlier[1])


def _means(totals: dict[str, tuple[float, float]]) -> dict[str, float]:
    return {kind: calls / statements for kind, (calls, statements) in totals.items() if statements}


@contextlib.contextmanager
def _service(name: str, side: Side, port: int, workdir: Path) -> Iterator[cpu.Select]:
    """The service up and ready; yields the selector of its process tree."""
    with stack.process(name, side.command, env=side.env_for(port), workdir=workdir) as child:
        stack.wait_http(f"http://127.0.0.1:{port}/ready", child, workdir / f"{name}.log")
        yield functools.partial(cpu.tree, child.pid)


@dataclass(frozen=True)
class Arm:
    """What one side of a comparison is measured through: a running service (a key of the
    `sides` started), put into this arm's state by `enter` before each of its rounds. Two arms
    may share a service that switches between them, so that nothing about a process (its
    connections, where it runs) weighs on one arm only."""

    service: str
    enter: Callable[[], None] = lambda: None


def compare(
    scenarios: Sequence[tuple[str, list[Request]]],
    sides: Mapping[str, Side],
    workdir: Path,
    *,
    kind: str,
    seconds: int,
    connections: int,
    rounds: int,
    database: cpu.Select | None = None,
    arms: Mapping[str, Arm] | None = None,
) -> list[Paired]:
    """`scenarios`: (name, requests) already seeded; every side serves the same database, whose
    processes `database` selects (bench/cpu.py; None: no CPU figures). `arms`: what is compared,
    by name (default: each side as it is)."""
    arms = arms or {name: Arm(name) for name in sides}
    ports = {name: stack.free_port() for name in sides}
    with contextlib.ExitStack() as services:
        trees = {
            name: services.enter_context(_service(f"service-{name}", side, ports[name], workdir))
            for name, side in sides.items()
        }
        results = []
        for scenario, requests in scenarios:

            def switch_to(arm: Arm, requests: list[Request] = requests) -> tuple[int, Path]:
                """Enter the arm; its service's port and the requests prepared for it."""
                arm.enter()
                port = ports[arm.service]
                return port, load.write_requests(requests, f"127.0.0.1:{port}", workdir / "requests.bin")

            loads: dict[str, list[Load]] = {name: [] for name in arms}
            cpu_us: dict[str, list[float]] = {name: [] for name in arms}
            batches: dict[str, dict[str, tuple[float, float]]] = {name: {} for name in arms}
            for arm in arms.values():  # unmeasured: the first round of a scenario paid for cold
                # caches and pools, and it always fell on the same arm
                port, prepared = switch_to(arm)
                load.run(kind, port, prepared, seconds=min(WARM_UP_SECONDS, seconds), connections=connections)
            for round_no in range(rounds):
                # ABBA: the arms swap places every round, so a drift of the machine (or of the
                # database: a table that grows, an autovacuum one arm set off) falls on both.
                order = list(arms.items())
                for name, arm in order if round_no % 2 == 0 else reversed(order):
                    port, prepared = switch_to(arm)
                    before = batch_totals(port)
                    with cpu.Meter({"service": trees[arm.service], "database": database}) as meter:
                        served = load.run(kind, port, prepared, seconds=seconds, connections=connections)
                    _add(batches[name], before, batch_totals(port))
                    loads[name].append(served)
                    spent = meter.seconds.get("service", 0.0) + meter.seconds.get("database", 0.0)
                    cpu_us[name].append(spent / max(served.requests, 1) * 1e6)
            means = {name: _means(totals) for name, totals in batches.items()}
            paired = Paired(scenario, loads, cpu_us if database is not None else None, means)
            figures = ", ".join(f"{name} {paired.rps(name):,.0f} req/s" for name in arms)
            print(f"bench: {scenario}: {figures} (medians of {rounds} alternating rounds)", file=sys.stderr)
            results.append(paired)
        return results
