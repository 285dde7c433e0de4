"""Log lines: one per event on stderr (JSON in production), stamped with the time, the level, the
worker's pid and the request id, and written once per event-loop pass.

Every request writes an access line, so a line's cost is paid per request: measured in a
running service, about 55 µs of a 490 µs balance read (2026-11-27). Hence the lean stamping:
the request id is read from the one ContextVar the request sets (structlog's `merge_contextvars`
copies the whole context, and binding it cost a ContextVar set and reset per request), the
timestamp's seconds are formatted once a second, the pid once a process. And the lines logged
during one pass of the event loop are written together when it ends, in chunks of whole lines
of at most `PIPE_BUF` bytes: a write that size to a pipe is atomic, so workers sharing one
stderr never interleave inside a line (a longer line is written alone, as each line was
before). Outside a running loop (start-up, shutdown, threads) a line is written at once. The
stdlib's loggers (uvicorn, alembic) go through the same writer, so lines keep their order.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import json
import logging
import os
import select
import sys
import threading
import time
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson
import structlog
from structlog.types import EventDict

REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)

_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


def process_id() -> int:
    """os.getpid() without its system call: remembered, and refreshed in a forked child."""
    return _pid


def _add_request_id(_: object, __: str, event_dict: EventDict) -> EventDict:
    request_id = REQUEST_ID.get()
    if request_id is not None:
        event_dict.setdefault("request_id", request_id)  # as merge_contextvars did: a keyword wins
    return event_dict


_second: tuple[int, str] = (0, "")


def _stamp(_: object, __: str, event_dict: EventDict) -> EventDict:
    """ISO 8601 in UTC with microseconds, as structlog's TimeStamper writes it."""
    global _second
    now = time.time()
    second, text = _second
    if int(now) != second:
        second = int(now)
        text = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _second = (second, text)
    event_dict["timestamp"] = f"{text}.{int((now - second) * 1_000_000):06d}Z"
    return event_dict


def _add_pid(_: object, __: str, event_dict: EventDict) -> EventDict:
    """Which worker wrote the line, when WORKERS > 1."""
    event_dict["pid"] = _pid
    return event_dict


def _json_line(event_dict: Any, **_: Any) -> str:
    """A log line as JSON, by orjson: a third of an access line's cost went to the stdlib's
    encoder. What orjson refuses (an integer past 64 bits) falls back to the stdlib, so logging
    never fails a request."""
    try:
        return orjson.dumps(event_dict, default=repr, option=orjson.OPT_NON_STR_KEYS).decode()
    except orjson.JSONEncodeError:
        return json.dumps(event_dict, default=repr)


class PassWriter:
    """structlog's logger (every level is `msg`): a pass's lines, written when it ends."""

    def __init__(self, stream: TextIO, atomic_bytes: int = select.PIPE_BUF) -> None:
        self.stream = stream
        self.atomic_bytes = atomic_bytes
        self._lines: list[str] = []
        self._due = False  # a flush is scheduled on a running loop
        self._lock = threading.RLock()  # a signal handler that logs may interrupt a write
        self.through = False  # write each line at once: the process is about to end (`write_through`)

    def msg(self, message: str) -> None:
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        with self._lock:
            self._lines.append(message)
            if loop is not None and not self.through:
                if not self._due:
                    self._due = True
                    loop.call_soon(self.flush)
                return
        self.flush()

    log = debug = info = warn = warning = err = error = critical = exception = fatal = msg

    def flush(self) -> None:
        with self._lock:
            lines, self._lines, self._due = self._lines, [], False
            chunk: list[str] = []
            size = 0
            for line in lines:
                length = len(line.encode()) + 1
                if chunk and size + length > self.atomic_bytes:
                    self._write("".join(chunk))
                    chunk, size = [], 0
                chunk.append(line + "\n")
                size += length
            if chunk:
                self._write("".join(chunk))

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # stderr is gone (its reader quit): nowhere left to say so
            pass


@functools.cache
def _writer_for(stream: TextIO) -> PassWriter:
    """One writer per stream, however often logging is configured (an app per test)."""
    writer = PassWriter(stream)
    atexit.register(writer.flush)
    return writer


def write_through() -> None:
    """From now on every line is written when it is logged. Called as a worker's shutdown ends:
    its last lines (uvicorn's) come in the loop's last passes, and a spawned worker may then be
    ended by the SIGTERM uvicorn raises again, before a pass's flush runs or atexit could."""
    writer = _writer_for(sys.stderr)
    writer.flush()
    writer.through = True


class _ToWriter(logging.Handler):
    """The stdlib's records, rendered by structlog, into the same writer."""

    def __init__(self, writer: PassWriter) -> None:
        super().__init__()
        self.writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.writer.msg(self.format(record))
        except Exception:
            self.handleError(record)


def configure_logging(level: str, renderer: str) -> None:
    """structlog for our events; the stdlib loggers (uvicorn, alembic) go through the same
    renderer and writer, so every line on stderr has one format (JSON in production)."""
    shared: list[structlog.types.Processor] = [
        _add_request_id,
        structlog.processors.add_log_level,
        _stamp,
        _add_pid,
    ]
    render: structlog.types.Processor = (
        structlog.processors.JSONRenderer(serializer=_json_line)
        if renderer == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    writer = _writer_for(sys.stderr)
    writer.through = False  # a new app in this process (tests make many): passes again
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, render],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=lambda *_: writer,
        cache_logger_on_first_use=True,
    )
    handler = _ToWriter(writer)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, render],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper())
