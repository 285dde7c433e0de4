"""The fallback load generator when wrk is missing: keep-alive HTTP/1.1 on raw asyncio streams.

    python -m bench.pyload PORT REQUESTS_FILE SECONDS CONNECTIONS

Closed loop like wrk: each connection sends a request, reads the whole response, sends the
next, until the time is up. Prints one `BENCH_JSON {...}` line, the same as bench/wrk.lua.
It costs more CPU per request than wrk, so on a small machine it takes some from the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

TIMEOUT_SECONDS = 5.0


def read_requests(path: Path) -> list[bytes]:
    data = path.read_bytes()
    requests, pos = [], 0
    while pos < len(data):
        newline = data.index(b"\n", pos)
        length = int(data[pos:newline])
        requests.append(data[newline + 1 : newline + 1 + length])
        pos = newline + 1 + length
    return requests


@dataclass
class Stats:
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    socket_errors: int = 0


async def read_response(reader: asyncio.StreamReader) -> int:
    """The status of one response, after consuming its body (Content-Length or chunked)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            await reader.readexactly(size + 2)
        await reader.readuntil(b"\r\n")
    return status


async def connection(port: int, requests: list[bytes], deadline: float, stats: Stats) -> None:
    writer: asyncio.StreamWriter | None = None
    while time.perf_counter() < deadline:
        try:
            async with asyncio.timeout(TIMEOUT_SECONDS):
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                start = time.perf_counter()
                writer.write(random.choice(requests))
                status = await read_response(reader)
            stats.latencies.append(time.perf_counter() - start)
            stats.statuses[status] += 1
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError, IndexError):
            stats.socket_errors += 1
            if writer is not None:
                writer.close()
            writer = None
    if writer is not None:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(fraction * len(sorted_values)))]


async def main(port: int, path: Path, seconds: int, connections: int) -> None:
    requests = read_requests(path)
    stats = Stats()
    start = time.perf_counter()
    deadline = start + seconds
    await asyncio.gather(*(connection(port, requests, deadline, stats) for _ in range(connections)))
    elapsed = time.perf_counter() - start
    latencies = sorted(stats.latencies)
    result = {
        "requests": len(latencies),
        "seconds": elapsed,
        "p50_ms": percentile(latencies, 0.50) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "socket_errors": stats.socket_errors,
        "statuses": {str(code): count for code, count in stats.statuses.items()},
    }
    print("BENCH_JSON " + json.dumps(result), flush=True)


if __name__ == "__main__":
    import uvloop

    port_arg, path_arg, seconds_arg, connections_arg = sys.argv[1:5]
    uvloop.run(main(int(port_arg), Path(path_arg), int(seconds_arg), int(connections_arg)))
