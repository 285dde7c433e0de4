"""The order flow: pay, fulfil, finish; and recovery of orders a dead process left behind.

    1. one transaction: take the money, insert the order PENDING with a processing lease,
       write ORDER_DEDUCTION (and claim the Idempotency-Key);
    2. no transaction, no lock: call the provider, with retries;
    3. one transaction: COMPLETED, or FAILED + ORDER_REFUND (and store the final response).

If the process dies between 1 and 3, the lease expires and `recover_expired` (running in every
process) claims the order with FOR UPDATE SKIP LOCKED, calls the provider again with the same
Idempotency-Key, and finishes it as in step 3.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable
from dataclasses import replace
from typing import Any

import structlog
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from wallet import idempotency, ledger, observability
from wallet.errors import NotFound
from wallet.fulfillment import Failure, Outcome, Provider
from wallet.ledger import LedgerKey, OrderRow
from wallet.money import from_cents
from wallet.wire import Reply, dumps, iso, ok

log = structlog.get_logger(__name__)

PENDING, COMPLETED, FAILED = "PENDING", "COMPLETED", "FAILED"


def new_order_id() -> str:
    return f"ORD-{time.time_ns() // 1_000_000:013d}-{secrets.token_hex(4)}"


def order_json(order: OrderRow, *, updated: bool = False) -> dict[str, Any]:
    data: dict[str, Any] = {
        "orderId": order.order_id,
        "amount": from_cents(order.amount),
        "status": order.status,
        "fulfillmentId": order.fulfillment_id,
        "createdAt": iso(order.created_at),
    }
    if updated:
        data["updatedAt"] = iso(order.updated_at)
    return data


def final_reply(order: OrderRow) -> Reply:
    """The response an order's creation ends with, whoever finished it."""
    if order.status == COMPLETED:
        return Reply(201, dumps(ok(order_json(order), "Order created successfully")))
    unreachable = order.failure == Failure.UNREACHABLE
    body = {
        "success": False,
        "error": "Fulfillment provider could not be reached; the order failed and was refunded"
        if unreachable
        else "Fulfillment provider rejected the order; the order failed and was refunded",
        "code": "FULFILLMENT_FAILED",
        "data": order_json(order),
    }
    return Reply(503 if unreachable else 502, dumps(body))


# Completion and the stored Idempotency-Key response in one statement (one round trip): the
# reply is known before the UPDATE, and it is stored only if this statement finished the order.
_COMPLETE = text("""
WITH done AS (
    UPDATE orders
    SET status = 'COMPLETED', fulfillment_id = :fulfillment_id, next_attempt_at = NULL,
        attempts = attempts + :attempts, updated_at = now()
    WHERE order_id = :order_id AND status = 'PENDING'
    RETURNING order_id
), stored AS (
    UPDATE idempotency_keys SET response_status = 201, response_body = :body
    WHERE order_id = :order_id AND response_status IS NULL AND EXISTS (SELECT 1 FROM done)
)
SELECT order_id FROM done
""")
_GET = text("""
SELECT order_id, amount, status, fulfillment_id, failure, created_at, updated_at
FROM orders WHERE order_id = :order_id
""")
_GET_OWN = text("""
SELECT order_id, amount, status, fulfillment_id, failure, created_at, updated_at
FROM orders WHERE order_id = :order_id AND client_id = :client_id
""")
_CLAIM_EXPIRED = text("""
UPDATE orders SET next_attempt_at = now() + make_interval(secs => :lease_seconds)
WHERE id IN (
    SELECT id FROM orders
    WHERE status = 'PENDING' AND next_attempt_at < now()
    ORDER BY next_attempt_at
    LIMIT :batch
    FOR UPDATE SKIP LOCKED)
RETURNING order_id, client_id, amount, request_id, created_at, updated_at
""")


async def _decided_elsewhere(conn: AsyncConnection, order_id: str) -> Reply:
    """Another process (crash recovery) finished the order first: answer with what it decided."""
    return final_reply(OrderRow.of((await conn.execute(_GET, {"order_id": order_id})).one()))


class Orders:
    def __init__(
        self,
        engine: AsyncEngine,
        provider: Provider,
        *,
        key: LedgerKey,
        lease_seconds: float,
        idempotency_ttl_hours: float,
    ) -> None:
        self.engine = engine
        self.key = key
        # Single statements are atomic on their own: no BEGIN/COMMIT round trips for them.
        self.single = engine.execution_options(isolation_level="AUTOCOMMIT")
        self.provider = provider
        self.lease_seconds = lease_seconds
        self.idempotency_ttl_hours = idempotency_ttl_hours

    async def place(
        self,
        client_id: str,
        amount: int,
        idem: idempotency.IdempotencyKey | None,
        request_id: str | None,
    ) -> Reply:
        order_id = new_order_id()

        def deduct(conn: AsyncConnection) -> Awaitable[OrderRow]:
            return ledger.place_order(
                conn,
                client_id=client_id,
                order_id=order_id,
                amount=amount,
                lease_seconds=self.lease_seconds,
                request_id=request_id,
                key=self.key,
            )

        if idem is None:
            async with self.single.connect() as conn:
                order = await deduct(conn)
        else:
            async with self.engine.begin() as conn:
                stored = await idempotency.claim(conn, idem, self.idempotency_ttl_hours)
                if stored is not None:
                    return Reply(stored.status, stored.body, replayed=True)
                order = await deduct(conn)
                await idempotency.attach_order(conn, idem, order_id)
        outcome = await self.provider.fulfill(order_id, client_id, amount, request_id)
        return await self.finish(order, outcome)

    async def finish(self, order: OrderRow, outcome: Outcome) -> Reply:
        """Step 3 for a PENDING order. If another process finished it first, answer with that."""
        if outcome.fulfillment_id is not None:
            completed = replace(order, status=COMPLETED, fulfillment_id=outcome.fulfillment_id)
            reply = final_reply(completed)
            params = {
                "order_id": order.order_id,
                "fulfillment_id": outcome.fulfillment_id,
                "attempts": outcome.attempts,
                "body": reply.body,
            }
            async with self.single.connect() as conn:
                if (await conn.execute(_COMPLETE, params)).first() is not None:
                    observability.ORDERS_FINISHED.labels(COMPLETED).inc()
                    return reply
                return await _decided_elsewhere(conn, order.order_id)
        failure = (outcome.failure or Failure.UNREACHABLE).value
        async with self.engine.begin() as conn:
            failed = await ledger.refund_order(
                conn, order.order_id, failure=failure, attempts=outcome.attempts, key=self.key
            )
            if failed is None:
                return await _decided_elsewhere(conn, order.order_id)
            reply = final_reply(failed)
            await idempotency.complete_order(conn, order.order_id, reply.status, reply.body)
        observability.ORDERS_FINISHED.labels(FAILED).inc()
        log.warning(
            "order failed and refunded", order_id=order.order_id, failure=failure, detail=outcome.detail
        )
        return reply

    async def get(self, client_id: str, order_id: str) -> OrderRow:
        """Another client's order is indistinguishable from one that does not exist."""
        async with self.single.connect() as conn:
            row = (await conn.execute(_GET_OWN, {"order_id": order_id, "client_id": client_id})).first()
        if row is None:
            raise NotFound("Order not found", code="ORDER_NOT_FOUND")
        return OrderRow.of(row)

    async def recover_expired(self, batch: int = 20) -> int:
        """Finish orders whose owner stopped renewing their lease (it crashed or hung): a batch at
        a time until none is left, so a backlog is drained in one pass, not a batch per tick."""
        total = 0
        while True:
            async with self.engine.begin() as conn:
                params = {"lease_seconds": self.lease_seconds, "batch": batch}
                claimed = (await conn.execute(_CLAIM_EXPIRED, params)).all()
            await asyncio.gather(*(self._recover(row) for row in claimed))
            total += len(claimed)
            if len(claimed) < batch:
                return total

    async def _recover(self, row: Any) -> None:
        """The claim renewed the lease: this process alone asks the provider, with the same key."""
        log.info("recovering order", order_id=row.order_id)
        pending = OrderRow(row.order_id, row.amount, PENDING, None, row.created_at, row.updated_at)
        outcome = await self.provider.fulfill(row.order_id, row.client_id, row.amount, row.request_id)
        reply = await self.finish(pending, outcome)
        status = COMPLETED if reply.status == 201 else FAILED
        observability.ORDERS_RECOVERED.labels(status).inc()
        log.info("recovered order", order_id=row.order_id, status=status)
