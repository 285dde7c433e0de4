"""`--replica`: what reading from a streaming replica costs: the reads a replica serves (history
pages, statements) through a service with DATABASE_READ_URL and one without, alternating
(bench/paired.py); the report gives each side's median and the median of the per-round ratios.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

from bench import paired
from bench.load import Request
from bench.paired import Paired, Side

ROUNDS = 5


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
    environment."""
    sides = {
        "replica": Side(paired.SERVE, lambda port: env_for(port, True)),
        "primary": Side(paired.SERVE, lambda port: env_for(port, False)),
    }
    return paired.compare(
        reads, sides, workdir, kind=kind, seconds=seconds, connections=connections, rounds=ROUNDS
    )


def render(pairs: Sequence[Paired], seconds: int) -> list[str]:
    if not pairs:
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
    for one in pairs:
        ratios = one.ratios("replica", "primary")
        lines.append(
            f"| {one.scenario} | {one.rps('replica'):,.0f} | {one.rps('primary'):,.0f} | "
            f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) | "
            f"{one.p50_ms('replica'):.1f} / {one.p50_ms('primary'):.1f} | {one.errors()} |"
        )
    return lines
