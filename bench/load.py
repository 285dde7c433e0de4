"""HTTP load: wrk when the machine has it, else the Python generator in pyload.py.

Both replay the same prebuilt requests (one per wallet; one is picked at random per request)
over keep-alive connections for a fixed time, and report the same numbers. The load generator
runs in its own process so it never shares an event loop or a GIL with the bench.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

WRK_SCRIPT = Path(__file__).with_name("wrk.lua")
MARKER = "BENCH_JSON "


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: object | None = None

    def raw(self, host: str) -> bytes:
        body = b"" if self.body is None else orjson.dumps(self.body)
        head = [f"{self.method} {self.path} HTTP/1.1", f"Host: {host}"]
        head += [f"{name}: {value}" for name, value in self.headers.items()]
        if self.body is not None:
            head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        return ("\r\n".join(head) + "\r\n\r\n").encode() + body


@dataclass(frozen=True)
class Load:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    socket_errors: int
    statuses: dict[int, int]

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def errors(self) -> int:
        """Every request that did not end in a 2xx."""
        failed = sum(count for status, count in self.statuses.items() if not 200 <= status < 300)
        return failed + self.socket_errors


def write_requests(requests: Sequence[Request], host: str, path: Path) -> Path:
    """The file both generators read: "<length>\\n<raw request>" repeated."""
    with path.open("wb") as out:
        for request in requests:
            raw = request.raw(host)
            out.write(f"{len(raw)}\n".encode() + raw)
    return path


def generator(choice: str) -> str:
    """'wrk' or 'python' for --load auto|wrk|python."""
    if choice == "python":
        return "python"
    if shutil.which("wrk"):
        return "wrk"
    if choice == "wrk":
        raise SystemExit("bench: wrk not found; install it with: sudo apt-get install -y wrk")
    print(
        "bench: wrk not found, using the slower Python load generator "
        "(for the reference numbers: sudo apt-get install -y wrk)",
        file=sys.stderr,
    )
    return "python"


def _parse(stdout: str, what: str) -> Load:
    for line in stdout.splitlines():
        if line.startswith(MARKER):
            data = json.loads(line.removeprefix(MARKER))
            return Load(
                requests=int(data["requests"]),
                seconds=float(data["seconds"]),
                p50_ms=float(data["p50_ms"]),
                p99_ms=float(data["p99_ms"]),
                socket_errors=int(data["socket_errors"]),
                statuses={int(code): int(count) for code, count in data["statuses"].items()},
            )
    raise RuntimeError(f"{what} printed no result:\n{stdout[-2000:]}")


def run(kind: str, port: int, requests_file: Path, *, seconds: int, connections: int) -> Load:
    """One measurement of `seconds` at `connections` keep-alive connections to 127.0.0.1:port."""
    if kind == "wrk":
        cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s", "--latency"]
        cmd += ["-s", str(WRK_SCRIPT), f"http://127.0.0.1:{port}", "--", str(requests_file)]
    else:
        cmd = [sys.executable, "-m", "bench.pyload", str(port), str(requests_file)]
        cmd += [str(seconds), str(connections)]
    done = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=False,
        cwd=Path(__file__).parent.parent,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({done.returncode}): {done.stderr[-2000:]}")
    return _parse(done.stdout, cmd[0])
