"""Group commit: the calls one process makes during one event-loop pass, run as one batch.

A request that needs the database hands its part to a `Batcher` and waits for its own answer.
The first call of a pass schedules the batch; every call made before the loop comes round joins
it (up to `limit`). One batch is in flight per batcher; calls made meanwhile gather into the
next one, which starts as soon as the running one ends. So under load one statement (one round
trip, one WAL flush) serves dozens of requests, and alone a request waits no extra round trip.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from wallet import observability

T = TypeVar("T")
R = TypeVar("R")

BATCH_LIMIT = 64  # calls per batch: beyond this a statement's arrays stop paying back


class Batcher(Generic[T, R]):
    """`await submit(item)` returns `run`'s answer for that item. `run` answers every item of a
    batch, in order; if it raises, every caller of that batch gets the exception."""

    def __init__(
        self, kind: str, run: Callable[[Sequence[T]], Awaitable[Sequence[R]]], *, limit: int = BATCH_LIMIT
    ) -> None:
        self._size = observability.BATCH_SIZE.labels(kind)
        self._run = run
        self._limit = limit
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []
        self._worker: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        await asyncio.sleep(0)  # let the rest of this pass's calls join
        while self._waiting:
            batch = [(item, future) for item, future in self._waiting[: self._limit] if not future.done()]
            del self._waiting[: self._limit]
            if not batch:
                continue
            self._size.observe(len(batch))
            try:
                answers = await self._run([item for item, _ in batch])
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            except BaseException:  # cancelled (shutdown): the callers must not wait forever
                for _, future in batch:
                    future.cancel()
                raise
            for (_, future), answer in zip(batch, answers, strict=True):
                if not future.done():
                    future.set_result(answer)
