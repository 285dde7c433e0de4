"""The one table: each scenario through the service against its raw-SQL ceiling, with targets."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.ceiling import Ceiling
from bench.load import Load
from bench.outbox import OutboxCost

RESULTS = Path(__file__).with_name("results")


@dataclass(frozen=True)
class Target:
    ratio: float | None = None
    p99_ms: float | None = None  # zero errors is a target for every scenario


@dataclass(frozen=True)
class Cpu:
    """CPU seconds over one scenario's measurements (bench/cpu.py); None where unreadable."""

    service: float | None = None  # `wallet serve` and its workers, while the service was loaded
    database: float | None = None  # PostgreSQL's backends of the bench database, meanwhile
    ceiling_database: float | None = None  # the same backends while pgbench ran
    provider: float | None = None  # the fulfillment simulator, while the service was loaded


def _per(seconds: float | None, count: int) -> float | None:
    """Microseconds per request or transaction."""
    return None if seconds is None or not count else seconds * 1e6 / count


@dataclass(frozen=True)
class Row:
    scenario: str
    service: Load
    ceiling: Ceiling
    target: Target
    auth: str = ""  # the service's CLIENT_AUTH, or "admin key" for admin routes
    cpu: Cpu = Cpu()

    @property
    def ratio(self) -> float:
        return self.service.rps / self.ceiling.tps if self.ceiling.tps else 0.0

    @property
    def service_us(self) -> float | None:
        return _per(self.cpu.service, self.service.requests)

    @property
    def database_us(self) -> float | None:
        return _per(self.cpu.database, self.service.requests)

    @property
    def provider_us(self) -> float | None:
        return _per(self.cpu.provider, self.service.requests)

    @property
    def ceiling_database_us(self) -> float | None:
        return _per(self.cpu.ceiling_database, self.ceiling.transactions)

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
    header = [
        *("scenario", "auth", "service req/s", "p50 ms", "p99 ms", "errors", "pgbench tps", "ratio"),
        *(
            "service CPU µs/req",
            "PostgreSQL CPU µs/req",
            "provider CPU µs/req",
            "pgbench: PostgreSQL CPU µs/tx",
            "target",
        ),
    ]
    body = [
        [
            row.scenario,
            row.auth,
            f"{row.service.rps:,.0f}",
            f"{row.service.p50_ms:.1f}",
            f"{row.service.p99_ms:.1f}",
            str(row.service.errors),
            f"{row.ceiling.tps:,.0f}" + (f" ({row.ceiling.failed} failed)" if row.ceiling.failed else ""),
            f"{row.ratio:.2f}x",
            _micros(row.service_us),
            _micros(row.database_us),
            _micros(row.provider_us),
            _micros(row.ceiling_database_us),
            row.verdict(),
        ]
        for row in rows
    ]
    lines += _table(header, body)
    if rows:
        lines += ["", CPU_NOTE]
    if any(row.cpu.database is None or row.cpu.ceiling_database is None for row in rows):
        lines += [
            "",
            "PostgreSQL's processes are not visible from here (another host or namespace): no figure.",
        ]
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


CPU_NOTE = (
    "CPU per request: user + system time read from /proc over the measurement, divided by the"
    " requests it served (bench/cpu.py). Service: `wallet serve` and all its workers. PostgreSQL:"
    " the server's processes serving the bench database (its backends and autovacuum workers; not"
    " the WAL writer, checkpointer or other databases' backends). pgbench: the same, per"
    " transaction of the raw-SQL ceiling."
)


def _micros(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _figure(value: float) -> str:
    """Counts (entries, buffers) without decimals: "1,010,541", not "1,010,541.00"."""
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.2f}"


def _ratio(row: GrowthRow) -> float:
    return row.large / row.small if row.small else 0.0


def data(
    rows: Sequence[Row], *, about: dict[str, str], outbox: OutboxCost | None = None
) -> dict[str, object]:
    """The table as JSON (`bench/results/latest.json`), for comparing runs without parsing it."""
    return {
        "about": about,
        "rows": [
            {
                "scenario": row.scenario,
                "auth": row.auth,
                "service": {
                    **dataclasses.asdict(row.service),
                    "rps": row.service.rps,
                    "errors": row.service.errors,
                },
                "ceiling": dataclasses.asdict(row.ceiling),
                "ratio": row.ratio,
                "cpu_seconds": dataclasses.asdict(row.cpu),
                "cpu_us": {
                    "service_per_request": row.service_us,
                    "database_per_request": row.database_us,
                    "provider_per_request": row.provider_us,
                    "database_per_pgbench_transaction": row.ceiling_database_us,
                },
                "target": dataclasses.asdict(row.target),
                "verdict": row.verdict(),
            }
            for row in rows
        ],
        "outbox": None if outbox is None else outbox.data(),
    }


def save(markdown: str, figures: dict[str, object] | None = None) -> Path:
    """`latest.md`, and `latest.json` beside it when given the figures."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "latest.md"
    path.write_text(markdown)
    if figures is not None:
        (RESULTS / "latest.json").write_text(json.dumps(figures, indent=2, ensure_ascii=False) + "\n")
    return path
