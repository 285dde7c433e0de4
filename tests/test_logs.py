"""Log lines reach stderr whole and in order, however many requests and workers write them."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx

from tests.builders import Provider, production_env, scheduled_callbacks_ran, spawn_service
from wallet.logs import PassWriter


@contextlib.contextmanager
def piped_writer(atomic_bytes: int) -> Iterator[tuple[PassWriter, int]]:
    """A writer into a real pipe, and the pipe's read end (non-blocking)."""
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    stream = io.TextIOWrapper(open(write_end, "wb"), line_buffering=True)  # noqa: SIM115
    try:
        yield PassWriter(stream, atomic_bytes), read_end
    finally:
        stream.close()
        os.close(read_end)


def written(read_end: int) -> str:
    try:
        return os.read(read_end, 1 << 16).decode()
    except BlockingIOError:
        return ""


async def test_lines_logged_in_one_pass_are_written_when_it_ends_whole_and_in_order() -> None:
    with piped_writer(atomic_bytes=100) as (writer, read_end):
        lines = [f"line {n} " + "x" * 40 for n in range(5)] + ["long " + "y" * 300]
        for line in lines:
            writer.info(line)
        assert written(read_end) == ""  # still this pass
        await scheduled_callbacks_ran()  # the pass's flush
        assert written(read_end) == "".join(line + "\n" for line in lines)


def test_a_line_logged_outside_the_event_loop_is_written_at_once() -> None:
    with piped_writer(atomic_bytes=100) as (writer, read_end):
        writer.warning("starting")
        assert written(read_end) == "starting\n"


async def test_two_busy_workers_write_one_whole_stamped_access_line_per_request(
    database_url: str, provider: Provider
) -> None:
    """Workers share one stderr (here a pipe): each line must arrive whole, never cut into by
    another worker's, and every request must leave exactly one access line, stamped with its
    request id, its worker and the time it was written."""
    env = production_env(database_url, provider, workers=2)
    sent = [f"req-{uuid.uuid4().hex}-{'z' * 60}" for _ in range(600)]
    async with spawn_service(env) as server:
        await server.wait_for("Application startup complete", count=2)
        began = datetime.now(UTC)
        # 48 requests in flight at once: more would queue inside httpx's pool, whose wait for a
        # free connection is timed (5 s) and costs CPU per queued request on every release.
        in_flight = asyncio.Semaphore(48)
        async with httpx.AsyncClient(base_url=server.url, limits=httpx.Limits(max_connections=48)) as http:

            async def health(request_id: str) -> None:
                async with in_flight:
                    response = await http.get("/health", headers={"X-Request-ID": request_id})
                assert response.status_code == 200

            await asyncio.gather(*(health(request_id) for request_id in sent))
        await server.wait_for('"event":"request"', count=len(sent))
        ended = datetime.now(UTC)

    lines = [line for line in server.lines if line.strip()]
    parsed = [json.loads(line) for line in lines]  # every line is whole JSON
    access = [entry for entry in parsed if entry["event"] == "request"]
    assert Counter(entry["request_id"] for entry in access) == Counter(sent)
    assert {entry["client"] for entry in access} == {"127.0.0.1"}  # who asked
    assert len({entry["pid"] for entry in access}) == 2  # both workers wrote
    stamps = [datetime.fromisoformat(entry["timestamp"]) for entry in access]
    assert all(stamp.utcoffset() == timedelta(0) for stamp in stamps)
    assert began - timedelta(seconds=1) <= min(stamps) <= max(stamps) <= ended + timedelta(seconds=1)


async def test_a_graceful_stop_writes_every_workers_last_lines(database_url: str, provider: Provider) -> None:
    """Lines are written when their event-loop pass ends; a worker's last ones (uvicorn's shutdown
    lines) come after its loop's last pass, and spawned workers never run atexit."""
    async with spawn_service(production_env(database_url, provider, workers=2)) as server:
        await server.wait_for("Application startup complete", count=2)
        server.process.terminate()
        await server.ended()
        assert server.count("Application shutdown complete") == 2, "\n".join(server.lines[-12:])
        assert server.count("Finished server process") == 2
