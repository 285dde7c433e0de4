"""Two services measured against each other so that a shared machine's changing load does not
decide the answer: both are up for the whole comparison, and each scenario is driven through
one, then the other, round after round, so each pair of measurements sees about the same
background load. `--replica` (with and without DATABASE_READ_URL) and the outbox's cost (with
and without the events CTEs) are both such comparisons.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import load, stack
from bench.load import Load, Request

SERVE = [sys.executable, "-m", "wallet.cli", "serve"]


@dataclass(frozen=True)
class Side:
    """One service: its command and its environment for a port."""

    command: list[str]
    env_for: Callable[[int], dict[str, str]]


@dataclass(frozen=True)
class Paired:
    scenario: str
    loads: Mapping[str, list[Load]]  # side -> one Load per round, in round order

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

    def errors(self) -> int:
        return sum(one.errors for loads in self.loads.values() for one in loads)


@contextlib.contextmanager
def _service(name: str, side: Side, port: int, workdir: Path) -> Iterator[None]:
    with stack.process(name, side.command, env=side.env_for(port), workdir=workdir) as child:
        stack.wait_http(f"http://127.0.0.1:{port}/ready", child, workdir / f"{name}.log")
        yield


def compare(
    scenarios: Sequence[tuple[str, list[Request]]],
    sides: Mapping[str, Side],
    workdir: Path,
    *,
    kind: str,
    seconds: int,
    connections: int,
    rounds: int,
) -> list[Paired]:
    """`scenarios`: (name, requests) already seeded; every side serves the same database."""
    ports = {name: stack.free_port() for name in sides}
    with contextlib.ExitStack() as services:
        for name, side in sides.items():
            services.enter_context(_service(f"service-{name}", side, ports[name], workdir))
        results = []
        for scenario, requests in scenarios:
            loads: dict[str, list[Load]] = {name: [] for name in sides}
            for _ in range(rounds):
                for name, port in ports.items():
                    prepared = load.write_requests(requests, f"127.0.0.1:{port}", workdir / "requests.bin")
                    served = load.run(kind, port, prepared, seconds=seconds, connections=connections)
                    loads[name].append(served)
            paired = Paired(scenario, loads)
            figures = ", ".join(f"{name} {paired.rps(name):,.0f} req/s" for name in sides)
            print(f"bench: {scenario}: {figures} (medians of {rounds} alternating rounds)", file=sys.stderr)
            results.append(paired)
        return results
