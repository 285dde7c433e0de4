"""The one table: each scenario through the service against its raw-SQL ceiling, with targets."""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.ceiling import Ceiling
from bench.load import Load

RESULTS = Path(__file__).with_name("results")


@dataclass(frozen=True)
class Target:
    ratio: float | None = None
    p99_ms: float | None = None  # zero errors is a target for every scenario


@dataclass(frozen=True)
class Row:
    scenario: str
    service: Load
    ceiling: Ceiling
    target: Target

    @property
    def ratio(self) -> float:
        return self.service.rps / self.ceiling.tps if self.ceiling.tps else 0.0

    def verdict(self) -> str:
        wanted, missed = [], []
        if self.target.ratio is not None:
            wanted.append(f"≥ {self.target.ratio:g}x")
            if self.ratio < self.target.ratio:
                missed.append("ratio")
        if self.target.p99_ms is not None:
            wanted.append(f"p99 < {self.target.p99_ms:g} ms")
            if self.service.p99_ms >= self.target.p99_ms:
                missed.append("p99")
        wanted.append("0 errors")
        if self.service.errors or self.ceiling.failed:
            missed.append("errors")
        return ", ".join(wanted) + (f": MISSED {'+'.join(missed)}" if missed else ": met")


@dataclass(frozen=True)
class GrowthRow:
    measure: str
    small: float
    large: float


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} CPUs, {memory:.1f} GiB, {platform.system()} {platform.release()}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def render(
    rows: Sequence[Row],
    *,
    about: dict[str, str],
    peak_rss: int,
    processes: int,
    growth: Sequence[GrowthRow] = (),
    growth_size: int = 0,
    sections: Sequence[str] = (),
) -> str:
    """`sections`: lines of further sections, appended as they are (bench/outbox.py's,
    bench/replica.py's)."""
    lines = ["# Wallet service benchmark", ""]
    lines += [f"- {name}: {value}" for name, value in about.items()]
    lines += [f"- service peak memory: {peak_rss / 2**20:.0f} MiB RSS summed over {processes} processes", ""]
    header = ["scenario", "service req/s", "p50 ms", "p99 ms", "errors", "pgbench tps", "ratio", "target"]
    body = [
        [
            row.scenario,
            f"{row.service.rps:,.0f}",
            f"{row.service.p50_ms:.1f}",
            f"{row.service.p99_ms:.1f}",
            str(row.service.errors),
            f"{row.ceiling.tps:,.0f}" + (f" ({row.ceiling.failed} failed)" if row.ceiling.failed else ""),
            f"{row.ratio:.2f}x",
            row.verdict(),
        ]
        for row in rows
    ]
    lines += _table(header, body)
    problems = [f"- {row.scenario}: pgbench: {row.ceiling.error}" for row in rows if row.ceiling.error]
    problems += [
        f"- {row.scenario}: service statuses {dict(sorted(row.service.statuses.items()))}, "
        f"socket errors {row.service.socket_errors}"
        for row in rows
        if row.service.errors
    ]
    if problems:
        lines += ["", "Errors:", *problems]
    if growth:
        lines += ["", f"## Cost growth: a wallet with 10 ledger entries vs {growth_size:,}", ""]
        lines += _table(
            ["measure", "10 entries", f"{growth_size:,} entries", "large / small"],
            [[g.measure, _figure(g.small), _figure(g.large), f"{_ratio(g):.2f}"] for g in growth],
        )
        lines += [
            "",
            "Reads, orders and pages: pgbench running the service's SQL on the wallet. `wallet verify`:"
            " `verify_ledger` over the whole bench database (every wallet, order and entry the run"
            " wrote, in one snapshot) once the growth wallet has 10 entries and once it has"
            f" {growth_size:,}; clean both times, or the bench stops.",
        ]
    lines += sections
    return "\n".join(lines) + "\n"


def _figure(value: float) -> str:
    """Counts (entries, buffers) without decimals: "1,010,541", not "1,010,541.00"."""
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.2f}"


def _ratio(row: GrowthRow) -> float:
    return row.large / row.small if row.small else 0.0


def save(markdown: str) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "latest.md"
    path.write_text(markdown)
    return path
