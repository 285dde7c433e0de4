"""A fulfillment provider that answers like the real one, with faults on demand.

Used as the development default (mounted in the service itself) and, as a real HTTP server on
loopback, by the tests and the benchmark. It honours `Idempotency-Key`: the same key always gets
the same fulfillment id, so it shows whether an order was fulfilled more than once. Its status
endpoint (`GET …/{orderId}`) answers 200 with that id, or 404 for an order it never fulfilled.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


@dataclass
class Faults:
    latency_seconds: float = 0.0
    error_status: int | None = None  # answer this status instead of success...
    error_rate: float = 1.0  # ...on this fraction of calls
    fail_first: int | None = None  # ...or on exactly the first N calls
    hang: bool = False  # never answer
    gate: asyncio.Event | None = None  # hold every call until the event is set
    answer_late_seconds: float = 0.0  # fulfil at once, answer this much later
    success_status: int = 201
    success_body: bytes | None = None  # instead of {"id", "orderId"}: e.g. b"{}" or b"<html>"
    lookup_status: int | None = None  # the status endpoint answers this instead


@dataclass
class Call:
    order_id: str | None
    idempotency_key: str | None
    request_id: str | None
    status: int


@dataclass
class Simulator:
    faults: Faults = field(default_factory=Faults)
    calls: list[Call] = field(default_factory=list)
    fulfilled: dict[str, str] = field(default_factory=dict)
    by_order: dict[str, str] = field(default_factory=dict)
    lookups: list[str] = field(default_factory=list)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(101))
    _arrived: asyncio.Condition = field(
        default_factory=asyncio.Condition
    )  # a call arrived, or was carried out

    def attempts_for(self, order_id: str) -> int:
        return sum(1 for call in self.calls if call.order_id == order_id)

    async def wait_for_calls(self, count: int) -> None:
        """Until `count` calls have arrived (answered or not)."""
        async with self._arrived:
            await self._arrived.wait_for(lambda: len(self.calls) >= count)

    async def wait_for_fulfilled(self, order_id: str) -> None:
        """Until the order has been carried out (its answer may not be sent yet, or ever)."""
        async with self._arrived:
            await self._arrived.wait_for(lambda: order_id in self.by_order)

    async def _record(self, call: Call) -> None:
        self.calls.append(call)
        async with self._arrived:
            self._arrived.notify_all()

    async def handle(self, request: Request) -> Response:
        try:
            payload = await request.json()
            order_id = str(payload["orderId"])
        except (ValueError, KeyError, TypeError):
            return JSONResponse({"error": "orderId is required"}, status_code=400)
        key = request.headers.get("idempotency-key")
        request_id = request.headers.get("x-request-id")
        faults = self.faults
        if faults.fail_first is not None:
            failing = faults.error_status is not None and len(self.calls) < faults.fail_first
        else:
            failing = faults.error_status is not None and random.random() < faults.error_rate
        status = 0 if faults.hang else (faults.error_status or 500) if failing else 201
        await self._record(Call(order_id, key, request_id, status))
        if faults.gate is not None:
            await faults.gate.wait()
        if faults.latency_seconds:
            await asyncio.sleep(faults.latency_seconds)
        if faults.hang:
            await asyncio.Event().wait()
        if failing:
            return JSONResponse({"error": "simulated failure"}, status_code=status)
        dedup = key or order_id
        if dedup not in self.fulfilled:
            self.fulfilled[dedup] = str(next(self._ids))
            self.by_order[order_id] = self.fulfilled[dedup]
            async with self._arrived:
                self._arrived.notify_all()
        if faults.answer_late_seconds:
            await asyncio.sleep(faults.answer_late_seconds)
        if faults.success_body is not None:
            return Response(faults.success_body, status_code=faults.success_status)
        body = {"id": self.fulfilled[dedup], "orderId": order_id}
        return JSONResponse(body, status_code=faults.success_status)

    async def lookup(self, request: Request) -> Response:
        order_id = request.path_params["order_id"]
        self.lookups.append(order_id)
        if self.faults.lookup_status is not None:
            return JSONResponse({"error": "simulated failure"}, status_code=self.faults.lookup_status)
        if order_id not in self.by_order:
            return JSONResponse({"error": "no such order"}, status_code=404)
        return JSONResponse({"id": self.by_order[order_id], "orderId": order_id})

    def asgi(self, path: str = "/fulfillments") -> Starlette:
        return Starlette(
            routes=[
                Route(path, self.handle, methods=["POST"]),
                Route(path + "/{order_id}", self.lookup, methods=["GET"]),
            ]
        )
