"""What the events outbox costs the order path: the ceiling's order script (the service's own
place and complete statements) run by pgbench as it is, and again with every events CTE taken out.

The variant is derived from the same statements, not written a second time: `without_outbox`
drops each CTE whose body is `events.INSERT_EVENT …` (with it the trigger that queues the event
for delivery never fires), so whatever the order statements become, the two runs differ by the
outbox alone. Runs alternate, each after a vacuum and checkpoint, to spread the machine's drift
over both.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench import ceiling
from wallet.events import INSERT_EVENT

TARGET = 0.10  # issue 12: the outbox costs the order path under 10%
ROUNDS = 2  # of each variant, alternating
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


@dataclass(frozen=True)
class OutboxCost:
    with_events: list[ceiling.Ceiling]
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
    def cost(self) -> float:
        """The share of the order path's throughput the outbox takes (negative: noise)."""
        return 1 - self.tps_with / self.tps_without if self.tps_without else 0.0

    @property
    def errors(self) -> list[str]:
        return [r.error for r in (*self.with_events, *self.without) if r.error]

    def verdict(self) -> str:
        missed = self.cost >= TARGET or self.errors
        return f"< {TARGET:.0%}, 0 errors: " + ("MISSED" if missed else "met")


def measure(
    url: str,
    client_ids: tuple[int, int],
    workdir: Path,
    *,
    clients: int,
    seconds: int,
    settle: Callable[[str], None],
) -> OutboxCost:
    script = ceiling.order(client_ids)
    bare = ceiling.Script(f"{script.name} without outbox", without_outbox(script.text), script.defines)
    runs: dict[str, list[ceiling.Ceiling]] = {script.name: [], bare.name: []}
    for _ in range(ROUNDS):
        for variant in (script, bare):
            settle(url)
            runs[variant.name].append(
                ceiling.run_pgbench(url, variant, workdir, clients=clients, threads=2, seconds=seconds)
            )
    return OutboxCost(runs[script.name], runs[bare.name])
