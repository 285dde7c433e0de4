"""CPU time per request, read from /proc: where a request's time goes, in the service and in
PostgreSQL, next to what PostgreSQL spends on the same statements under pgbench.

What is counted (user + system time, /proc/<pid>/stat utime + stime):
- the service: `wallet serve` and every process under it (uvicorn's supervisor and workers).
  Not the fulfillment simulator: it stands in for the provider, which is someone else's CPU.
- PostgreSQL: the postmaster's children whose process title names the bench's database, that is
  the backends serving it (the service's pools, or pgbench's clients) and autovacuum workers on
  it. The postmaster is found as the parent of our own `pg_backend_pid()`, so this works for the
  embedded server, DATABASE_URL's server and a replica alike, if the server runs on this machine
  (else the figures are left out and the report says so). Left out on purpose: backends of other
  databases and the server's shared background processes (WAL writer, checkpointer, background
  writer). On DATABASE_URL's server they also work for whoever else uses it, and with
  `synchronous_commit=on` each committing backend writes and flushes its own WAL, so most of what
  a request costs the server is in its backend.

How: a thread reads every selected process's counters every INTERVAL. A process's CPU in the
window is its last reading minus its first: one there when the window opened counts from that
reading, one born inside it from zero (its start-up included). Reading only at the start and the
end would miss pgbench's backends entirely (they are born and exit with pgbench); sampling loses
only what a process spent between its last reading and its exit, at most INTERVAL of a
busy process: 0.5 % at 10 s per measurement. The kernel adds an exited child's time to its
parent's (the postmaster's cutime), but it does so for every database's backends alike.
Counters tick CLOCK_TICKS times a second, so each process's figure is good to 1/CLOCK_TICKS s.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType

import asyncpg

from wallet.database import plain_url

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
INTERVAL = 0.05  # seconds between readings

Select = Callable[[], Iterable[int]]  # the pids to read now


@dataclass(frozen=True)
class Stat:
    ppid: int
    started: int  # clock ticks after boot: tells a reused pid from the process it replaced
    ticks: int  # utime + stime


def _read(path: str) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        return os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)


def stat(pid: int) -> Stat | None:
    """The process's counters, or None when it is gone."""
    data = _read(f"/proc/{pid}/stat")
    if not data:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ")".
    fields = data[data.rindex(b")") + 2 :].split()
    # fields[0] is field 3 of proc(5): ppid is 4, utime 14, stime 15, starttime 22.
    return Stat(ppid=int(fields[1]), started=int(fields[19]), ticks=int(fields[11]) + int(fields[12]))


def children(pid: int) -> list[int]:
    """Direct children, from every thread's `children` list."""
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    found: list[int] = []
    for tid in threads:
        data = _read(f"/proc/{pid}/task/{tid}/children")
        if data:
            found += [int(child) for child in data.split()]
    return found


def tree(pid: int) -> list[int]:
    """`pid` and all its descendants."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children(current)
    return found


def title(pid: int) -> str:
    """The process title (`ps` shows it): PostgreSQL rewrites its argv to say what it does."""
    data = _read(f"/proc/{pid}/cmdline") or b""
    return data.replace(b"\0", b" ").decode(errors="replace").strip()


def serves_database(process_title: str, database: str, cluster_name: str = "") -> bool | None:
    """Whether a postmaster child works for `database`: True or False once its title says so,
    None while it does not yet (a backend still starting, or an autovacuum worker between
    databases). Titles: "postgres: [cluster: ]user database host(port) state" for a backend,
    "postgres: [cluster: ]autovacuum worker database" for a worker."""
    if not process_title.startswith("postgres: "):
        return None  # still the postmaster's command line: forked, not yet told what it serves
    rest = process_title.removeprefix("postgres: ")
    if cluster_name:
        rest = rest.removeprefix(f"{cluster_name}: ")
    words = rest.split()
    if words[:2] == ["autovacuum", "worker"]:
        return words[2] == database if len(words) > 2 else None
    return len(words) >= 3 and words[1] == database


class Backends:
    """The pids of the postmaster's children serving `database`. A title is read until it says
    which database the process serves, then remembered for as long as the pid is a child (pids
    are handed out in sequence, so one is not reused within a reading or two)."""

    def __init__(self, postmaster: int, database: str, cluster_name: str = "") -> None:
        self.postmaster = postmaster
        self.database = database
        self.cluster_name = cluster_name
        self._known: dict[int, bool] = {}

    def __call__(self) -> list[int]:
        current = set(children(self.postmaster))
        known = {pid: ours for pid, ours in self._known.items() if pid in current}
        for pid in current:
            if pid not in known:
                ours = serves_database(title(pid), self.database, self.cluster_name)
                if ours is not None:
                    known[pid] = ours
        self._known = known
        return [pid for pid, ours in known.items() if ours]


async def backends(url: str) -> Backends | None:
    """The selector for `url`'s database, or None when its server's processes are not visible
    here (another host, another pid namespace)."""
    conn = await asyncpg.connect(plain_url(url))
    try:
        row = await conn.fetchrow(
            "SELECT pg_backend_pid() AS pid, current_database() AS db, "
            "current_setting('cluster_name') AS cluster"
        )
        assert row is not None
        pid, database, cluster_name = int(row["pid"]), str(row["db"]), str(row["cluster"])
        ours = stat(pid)  # read while our backend is alive, i.e. before the connection closes
        if ours is None or serves_database(title(pid), database, cluster_name) is not True:
            return None
        return Backends(ours.ppid, database, cluster_name)
    finally:
        await conn.close()


def combined(*selects: Select | None) -> Select | None:
    """Several servers' selectors as one (`--replica`: the primary and the replica); None when
    any is unreadable, so a figure never silently counts one server of two."""
    present = [select for select in selects if select is not None]
    if len(present) < len(selects):
        return None

    def select() -> list[int]:
        return [pid for one in present for pid in one()]

    return select


class Meter:
    """CPU seconds spent by each named set of processes between entering and leaving the block.

    with Meter({"service": lambda: tree(pid)}) as meter:
        ...
    meter.seconds["service"]
    """

    def __init__(self, selects: Mapping[str, Select | None], interval: float = INTERVAL) -> None:
        """A set given as None (unreadable) gets no figure in `.seconds`."""
        self.selects = {name: select for name, select in selects.items() if select is not None}
        self.interval = interval
        self.seconds: dict[str, float] = {}
        self.own_seconds = 0.0  # the sampling thread's own CPU: what measuring cost
        self.wall_seconds = 0.0
        self._first: dict[str, dict[tuple[int, int], int]] = {name: {} for name in self.selects}
        self._last: dict[str, dict[tuple[int, int], int]] = {name: {} for name in self.selects}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-meter", daemon=True)
        self._started = 0.0

    def _sample(self, *, opening: bool) -> None:
        for name, select in self.selects.items():
            first, last = self._first[name], self._last[name]
            for pid in select():
                current = stat(pid)
                if current is None:
                    continue
                key = (pid, current.started)
                first.setdefault(key, current.ticks if opening else 0)
                last[key] = current.ticks

    def _run(self) -> None:
        started = time.thread_time()
        while not self._stop.wait(self.interval):
            self._sample(opening=False)
        self._sample(opening=False)
        self.own_seconds = time.thread_time() - started

    def __enter__(self) -> Meter:
        self._started = time.monotonic()
        self._sample(opening=True)
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()
        self.wall_seconds = time.monotonic() - self._started
        for name in self.selects:
            first, last = self._first[name], self._last[name]
            self.seconds[name] = sum(last[key] - first[key] for key in last) / CLOCK_TICKS
