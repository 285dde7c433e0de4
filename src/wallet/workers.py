"""How `wallet serve` runs several workers on one port: each listens on a socket of its own.

uvicorn's workers share the parent's one listening socket, and whichever worker wakes first
accepts; uvloop then accepts every connection waiting. So one worker can end up with all of a
client's keep-alive connections while the other idles. Measured here with 2 workers and 32 wrk
connections, six runs: 21/11, 4/28, 32/0, 2/30, 23/9, 22/10, and throughput halved at 32/0.

Here every worker binds its own socket to the address with SO_REUSEPORT, and the kernel spreads
new connections over those sockets by a hash of each connection's addresses and ports. The
parent binds the address the same way (after `check_free`), so that a port in use fails once at
start, but never listens on it: the kernel hands connections to listening sockets only. What the parent gives
uvicorn's supervisor is a `WorkerSocket`, which multiprocessing pickles into each spawned worker,
a restarted one included, as "bind a socket of your own to this address".

The trade-off: connections waiting in a worker's own queue when that worker stops (a restart, a
shutdown) are reset instead of being taken by another worker. Clients retry; order requests
carry idempotency keys, so a retry is safe.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

import uvicorn
from prometheus_client import multiprocess
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess

log = logging.getLogger("uvicorn.error")


class WorkerSocket(socket.socket):
    """A socket bound with SO_REUSEPORT that, pickled into a worker, is bound there anew."""

    def __reduce__(self) -> tuple[Any, ...]:
        return bind, (self.family, self.getsockname())


def bind(family: int, address: tuple[Any, ...]) -> WorkerSocket:
    sock = WorkerSocket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


class Supervisor(Multiprocess):
    """uvicorn's supervisor, which also retires the metrics of a worker it replaced: the samples
    of a gauge each worker keeps live (pool sizes, queue ages) stay in the shared directory after
    the worker dies, and were summed with its replacement's for good (pools 60 instead of 40)."""

    def keep_subprocess_alive(self) -> None:
        before = {process.pid for process in self.processes}
        super().keep_subprocess_alive()
        _retire(before - {process.pid for process in self.processes})

    def restart_all(self) -> None:
        before = {process.pid for process in self.processes}
        super().restart_all()
        _retire(before - {process.pid for process in self.processes})


def _retire(pids: set[int | None]) -> None:
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        return
    for pid in pids:
        if pid is not None:
            multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def check_free(host: str, port: int) -> None:
    """Raises OSError unless HOST:PORT can be listened on by this service alone. The workers bind
    with SO_REUSEPORT, which another process of the same user may share: a second `wallet serve`
    started on a port in use would silently take half of its connections. A bind without the
    option fails if any socket holds the address, so it is tried first, then given back."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(address)


def run(config: uvicorn.Config) -> None:
    """Serve `config` with `config.workers` processes under uvicorn's supervisor (it restarts a
    worker that dies and stops them all on SIGTERM), each accepting on its own socket."""
    ipv6 = ":" in config.host
    try:
        reserved = bind(socket.AF_INET6 if ipv6 else socket.AF_INET, (config.host, config.port))
    except OSError as exc:  # as uvicorn answers an address it cannot bind
        log.error(exc)
        raise SystemExit(STARTUP_FAILURE) from None
    host = f"[{config.host}]" if ipv6 else config.host
    log.info(
        "Uvicorn running on http://%s:%d (%d workers, each on its own socket)",
        host,
        reserved.getsockname()[1],
        config.workers,
    )
    try:
        Supervisor(config, sockets=[reserved]).run()
    finally:
        reserved.close()
