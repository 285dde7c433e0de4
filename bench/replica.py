"""`--replica`: what reading from a streaming replica costs, measured so that a shared machine's
changing load does not decide the answer.

Two services run over the same primary and replica, one with DATABASE_READ_URL and one without.
The reads a replica serves (history pages, statements) are driven through each in turn, round
after round, so each pair of measurements sees about the same background load; the report gives
each side's median and the median of the per-round ratios.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import load, stack
from bench.load import Load, Request

ROUNDS = 5
SIDES = ("replica", "primary")


@dataclass(frozen=True)
class Paired:
    scenario: str
    replica: list[Load]
    primary: list[Load]

    @staticmethod
    def _median(loads: list[Load], figure: Callable[[Load], float]) -> float:
        return statistics.median(figure(one) for one in loads)

    def rps(self, side: str) -> float:
        return self._median(getattr(self, side), lambda one: one.rps)

    def p50_ms(self, side: str) -> float:
        return self._median(getattr(self, side), lambda one: one.p50_ms)

    def ratios(self) -> list[float]:
        """replica / primary req/s of each round."""
        return [r.rps / p.rps if p.rps else 0.0 for r, p in zip(self.replica, self.primary, strict=True)]

    def errors(self) -> int:
        return sum(one.errors for one in self.replica + self.primary)


@contextlib.contextmanager
def _service(name: str, env: dict[str, str], port: int, workdir: Path) -> Iterator[None]:
    serve = [sys.executable, "-m", "wallet.cli", "serve"]
    with stack.process(name, serve, env=env, workdir=workdir) as child:
        stack.wait_http(f"http://127.0.0.1:{port}/ready", child, workdir / f"{name}.log")
        yield


def compare(
    reads: Sequence[tuple[str, list[Request]]],
    env_for: Callable[[int, bool], dict[str, str]],
    workdir: Path,
    *,
    kind: str,
    seconds: int,
    connections: int,
) -> list[Paired]:
    """`reads`: (scenario, requests) already seeded; `env_for(port, with_replica)`: a service's
    environment. Both services are up for the whole comparison, idle while the other is driven."""
    ports = {side: stack.free_port() for side in SIDES}
    with contextlib.ExitStack() as services:
        for side, port in ports.items():
            services.enter_context(
                _service(f"service-{side}", env_for(port, side == "replica"), port, workdir)
            )
        results = []
        for scenario, requests in reads:
            loads: dict[str, list[Load]] = {side: [] for side in SIDES}
            for _ in range(ROUNDS):
                for side, port in ports.items():
                    prepared = load.write_requests(requests, f"127.0.0.1:{port}", workdir / "requests.bin")
                    loads[side].append(
                        load.run(kind, port, prepared, seconds=seconds, connections=connections)
                    )
            paired = Paired(scenario, loads["replica"], loads["primary"])
            print(
                f"bench: {scenario}: replica {paired.rps('replica'):,.0f} req/s, primary "
                f"{paired.rps('primary'):,.0f} req/s (medians of {ROUNDS} alternating rounds)",
                file=sys.stderr,
            )
            results.append(paired)
        return results


def render(paired: Sequence[Paired], seconds: int) -> list[str]:
    if not paired:
        return []
    lines = [
        "",
        "## Reads from the replica vs from the primary",
        "",
        f"The same reads through two services over the same primary and replica, {ROUNDS} alternating "
        f"rounds of {seconds} s each, medians (req/s, p50) and the median of the per-round ratios.",
        "",
        "| reads | replica req/s | primary req/s | replica / primary (range) | p50 ms replica / primary "
        "| errors |",
        "|---|---|---|---|---|---|",
    ]
    for one in paired:
        ratios = one.ratios()
        lines.append(
            f"| {one.scenario} | {one.rps('replica'):,.0f} | {one.rps('primary'):,.0f} | "
            f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) | "
            f"{one.p50_ms('replica'):.1f} / {one.p50_ms('primary'):.1f} | {one.errors()} |"
        )
    return lines
