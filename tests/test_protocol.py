"""The HTTP protocol (http/protocol.py): request heads are bounded while they are read, and every
refusal of the HTTP layer is the JSON envelope, over a raw socket as a client would send it."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import httpx
import pytest

from tests.builders import Api, Provider, RawAnswer, raw_exchange, scheduled_callbacks_ran, start_service
from wallet.http.protocol import MAX_HEAD_BYTES, MAX_HEADERS, MAX_LINE_BYTES, PassTransport


def request(*headers: bytes, target: bytes = b"/health") -> bytes:
    lines = [b"GET " + target + b" HTTP/1.1", b"Host: test", b"Connection: close", *headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def header(name: str, line_length: int) -> bytes:
    """A header line `name: xxx...` of exactly `line_length` bytes."""
    return f"{name}: ".encode() + b"x" * (line_length - len(name) - 2)


def assert_refused(answer: RawAnswer, status: int, code: str) -> None:
    assert answer.status == status, answer
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers["connection"] == "close"
    assert re.fullmatch(r"[0-9a-f]{32}", answer.headers["x-request-id"])
    error = answer.json()
    assert error["success"] is False
    assert error["code"] == code
    assert error["error"]


async def assert_still_serving(api: Api) -> None:
    assert (await api.http.get("/health")).status_code == 200


@pytest.fixture
async def api(database_url: str, provider: Provider) -> Any:
    async with start_service(database_url, provider.url) as running:
        yield running


async def test_a_one_megabyte_header_is_431(api: Api) -> None:
    answer = await raw_exchange(api, request(header("X-Big", 1024 * 1024)))
    assert_refused(answer, 431, "REQUEST_HEADER_FIELDS_TOO_LARGE")
    await assert_still_serving(api)


async def test_the_parsers_refusals_carry_the_callers_rate_limit(
    database_url: str, provider: Provider, redis_url: str | None
) -> None:
    """Every answer carries the RateLimit headers (SPEC §6), those the app never sees too; the
    refusal itself is not counted, as a probe is not. (Counted in Redis when there is one.)"""
    limited = {"rate_limit": "5/minute", "redis_url": redis_url}
    async with start_service(database_url, provider.url, **limited) as api:
        remaining = set()
        for refused in (
            await raw_exchange(api, request(header("X-Big", 1024 * 1024))),
            await raw_exchange(api, request(target=b"/" + b"x" * (MAX_LINE_BYTES + 1))),
            await raw_exchange(api, request(b"X-Bad: a\x00b")),
        ):
            assert refused.status in (400, 414, 431), refused
            assert refused.headers["ratelimit-limit"] == "5"
            assert int(refused.headers["ratelimit-reset"]) > 0
            remaining.add(refused.headers["ratelimit-remaining"])
        assert len(remaining) == 1  # none of them was counted


async def test_an_oversized_head_is_refused_before_it_ends(api: Api) -> None:
    """The server stops reading at the bound: it answers a head that is still arriving (here
    never finished), so it never buffers more than the bound of one."""
    url = httpx.URL(str(api.http.base_url))
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(b"GET /health HTTP/1.1\r\nHost: test\r\nX-Big: " + b"x" * (MAX_HEAD_BYTES + 1))
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), timeout=30)  # a bound on failure, not a wait
    finally:
        writer.close()
        await writer.wait_closed()
    assert answer.startswith(b"HTTP/1.1 431 ")
    await assert_still_serving(api)


async def test_a_header_line_is_bounded(api: Api) -> None:
    fits = await raw_exchange(api, request(header("X-Line", MAX_LINE_BYTES)))
    assert fits.status == 200, fits
    over = await raw_exchange(api, request(header("X-Line", MAX_LINE_BYTES + 1)))
    assert_refused(over, 431, "REQUEST_HEADER_FIELDS_TOO_LARGE")
    await assert_still_serving(api)


async def test_the_number_of_headers_is_bounded(api: Api) -> None:
    # `request` writes Host and Connection itself.
    fits = await raw_exchange(api, request(*(f"X-N{n}: v".encode() for n in range(MAX_HEADERS - 2))))
    assert fits.status == 200, fits
    over = await raw_exchange(api, request(*(f"X-N{n}: v".encode() for n in range(MAX_HEADERS - 1))))
    assert_refused(over, 431, "REQUEST_HEADER_FIELDS_TOO_LARGE")
    many = await raw_exchange(api, request(*(f"X-N{n}: v".encode() for n in range(10_000))))
    assert_refused(many, 431, "REQUEST_HEADER_FIELDS_TOO_LARGE")
    await assert_still_serving(api)


async def test_the_whole_head_is_bounded(api: Api) -> None:
    line = MAX_LINE_BYTES - 100
    fits = await raw_exchange(api, request(*(header(f"X-H{n}", line) for n in range(3))))
    assert fits.status == 200, fits
    lines = MAX_HEAD_BYTES // line + 1  # each line fits, all of them do not
    over = await raw_exchange(api, request(*(header(f"X-H{n}", line) for n in range(lines))))
    assert_refused(over, 431, "REQUEST_HEADER_FIELDS_TOO_LARGE")
    await assert_still_serving(api)


async def test_a_head_trickled_in_many_writes_is_bounded_the_same(api: Api) -> None:
    def pieces(data: bytes, size: int) -> list[bytes]:
        return [data[i : i + size] for i in range(0, len(data), size)]

    huge = request(header("X-Big", 1024 * 1024))
    assert_refused(await raw_exchange(api, *pieces(huge, 1024)), 431, "REQUEST_HEADER_FIELDS_TOO_LARGE")
    long_line = request(header("X-Line", MAX_LINE_BYTES + 1))
    assert_refused(await raw_exchange(api, *pieces(long_line, 7)), 431, "REQUEST_HEADER_FIELDS_TOO_LARGE")
    normal = await raw_exchange(api, *pieces(request(header("X-Line", 2000)), 1))
    assert normal.status == 200, normal
    assert normal.json() == {"success": True, "data": {"status": "ok"}}
    await assert_still_serving(api)


async def test_a_long_request_target_is_414(api: Api) -> None:
    query = b"/health?q="
    fits = await raw_exchange(api, request(target=query + b"a" * (MAX_LINE_BYTES - len(query))))
    assert fits.status == 200, fits
    over = await raw_exchange(api, request(target=query + b"a" * (MAX_LINE_BYTES - len(query) + 1)))
    assert_refused(over, 414, "URI_TOO_LONG")
    huge = await raw_exchange(api, request(target=b"/" + b"a" * (1024 * 1024)))
    assert_refused(huge, 414, "URI_TOO_LONG")
    await assert_still_serving(api)


async def test_a_keep_alive_connection_is_bounded_per_request(api: Api) -> None:
    """Each request of a connection gets the whole budget; the refusal ends the connection."""
    keep = b"GET /health HTTP/1.1\r\nHost: test\r\n" + header("X-Pad", MAX_LINE_BYTES) + b"\r\n\r\n"
    url = httpx.URL(str(api.http.base_url))
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        for _ in range(MAX_HEAD_BYTES // MAX_LINE_BYTES + 2):  # more than one head's budget in all
            writer.write(keep)
            await writer.drain()
            status_line = await reader.readline()
            assert status_line.startswith(b"HTTP/1.1 200"), status_line
            length = 0
            while (line := await reader.readline()) != b"\r\n":
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
        writer.write(request(header("X-Big", 1024 * 1024)))
        await writer.drain()
        answer = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    assert answer.startswith(b"HTTP/1.1 431 ")
    assert b'"code":"REQUEST_HEADER_FIELDS_TOO_LARGE"' in answer


async def test_the_limits_are_in_the_openapi_document(api: Api) -> None:
    doc = (await api.http.get("/openapi.json")).json()
    for operations in doc["paths"].values():
        for operation in operations.values():
            assert {"414", "431"} <= set(operation["responses"])


class Wire(asyncio.Transport):
    """What PassTransport hands on, in order: the bytes of each write, and b"<eof>" / b"<close>"."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "written after close"
        self.sent.append(bytes(data))

    def write_eof(self) -> None:
        self.sent.append(b"<eof>")

    def close(self) -> None:
        self.sent.append(b"<close>")
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


async def test_the_writes_of_one_pass_leave_as_one_when_it_ends() -> None:
    """uvicorn writes a response's head and body separately: one system call and segment each."""
    wire = Wire()
    transport = PassTransport(wire, asyncio.get_running_loop())
    transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    transport.write(b"{}")
    assert wire.sent == []
    await scheduled_callbacks_ran()  # the flush the first write scheduled
    assert wire.sent == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]
    transport.write(b"next")
    await scheduled_callbacks_ran()
    assert wire.sent[1:] == [b"next"]


async def test_held_bytes_are_written_before_a_close_or_half_close_in_the_same_pass() -> None:
    closing, half_closing = Wire(), Wire()
    loop = asyncio.get_running_loop()
    for wire, end in ((closing, PassTransport.close), (half_closing, PassTransport.write_eof)):
        transport = PassTransport(wire, loop)
        transport.write(b"head")
        transport.write(b"body")
        end(transport)
    await scheduled_callbacks_ran()  # that flush finds nothing left to write
    assert closing.sent == [b"headbody", b"<close>"]
    assert half_closing.sent == [b"headbody", b"<eof>"]


async def test_bytes_held_for_a_connection_already_gone_are_dropped() -> None:
    wire = Wire()
    transport = PassTransport(wire, asyncio.get_running_loop())
    transport.write(b"answer")
    wire.close()  # the peer went away in the same pass
    await scheduled_callbacks_ran()
    assert wire.sent == [b"<close>"]
