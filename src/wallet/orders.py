"""The order flow (SPEC §4): pay, ask the provider, settle by what its answer proved.

    1. one transaction: take the money, insert the order PENDING (due back to the resolver when
       the request's own attempts are over), write ORDER_DEDUCTION, claim the Idempotency-Key;
    2. no transaction, no lock: call the provider, with retries (`fulfillment`);
    3. settle: fulfilled -> COMPLETED; refused -> FAILED + ORDER_REFUND in one transaction;
       unknown -> still PENDING, money held, next attempt stored on the order (or refunded
       like a refusal with FULFILLMENT_ON_UNKNOWN=refund).

The resolver (`resolve_due`, in every process) claims due PENDING orders with FOR UPDATE SKIP
LOCKED (a crashed request's orders, and orders whose outcome is unknown), asks again with the
same key and settles them the same way; an order still unknown after FULFILLMENT_RESOLVE_HOURS
is flagged for an operator, who finishes it with `resolve`. Whoever settles first wins: every
settling statement requires `status = 'PENDING'`.

Every answer given once the money moved names the order and tells its true state.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, get_args

import structlog
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from wallet import idempotency, ledger, observability
from wallet.batching import Batcher
from wallet.database import (
    APPLICATION_NAME,
    Backend,
    Lost,
    Statement,
    Unreachable,
    direct,
    gave_up,
    is_unavailable,
    sending,
    single,
)
from wallet.errors import Conflict, NotFound, ServiceUnavailable, WalletError
from wallet.events import INSERT_EVENT, order_data_sql, settled_order_events_sql
from wallet.fulfillment import Failure, Kind, Outcome, Provider
from wallet.money import from_cents
from wallet.reads import ORDER_COLUMNS, SETTLE_TARGET, OrderRow, settling
from wallet.settings import OnUnknown, Settings
from wallet.wire import iso

log = structlog.get_logger(__name__)

OrderStatus = Literal["PENDING", "COMPLETED", "FAILED"]
PENDING, COMPLETED, FAILED = get_args(OrderStatus)
ORDER_ID_PATTERN = r"^ORD-[0-9]{13}-[0-9a-f]{8}$"
ACCEPTED_MESSAGE = "Order accepted; fulfillment pending"


def new_order_id() -> str:
    return f"ORD-{time.time_ns() // 1_000_000:013d}-{secrets.token_hex(4)}"


def location(order_id: str) -> dict[str, str]:
    return {"Location": f"/orders/{order_id}"}


def order_json(order: OrderRow, *, updated: bool = False) -> dict[str, Any]:
    """The client's view of an order."""
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


def admin_order_json(order: OrderRow) -> dict[str, Any]:
    """The operator's view: the client's, plus who owns it, how it is going and who decided."""
    resolution = None
    if order.resolved_at is not None:
        resolution = {
            "outcome": "fulfilled" if order.status == COMPLETED else "failed",
            "by": order.resolved_by,
            "at": iso(order.resolved_at),
            "note": order.resolution_note,
        }
    return {
        **order_json(order, updated=True),
        "clientId": order.client_id,
        "failure": order.failure,
        "attempts": order.attempts,
        "resolverAttempts": order.resolver_attempts,
        "nextAttemptAt": iso(order.next_attempt_at) if order.next_attempt_at else None,
        "lastError": order.last_error,
        "needsReview": order.needs_review,
        "flaggedAt": iso(order.flagged_at) if order.flagged_at else None,
        "resolution": resolution,
    }


@dataclass(frozen=True, slots=True)
class Placed:
    """What placing (or resolving) an order came to: the order as it stands, and whether this is
    a replay of an earlier request with the same Idempotency-Key."""

    order: OrderRow
    replayed: bool = False


def _complete_sql(args: str, match: str) -> str:
    """Completion in one statement, for the orders (order_id, fulfillment_id, attempts,
    resolved_by, note) of `args`, found by `match`."""
    returning = ", ".join("orders." + c.strip() for c in ORDER_COLUMNS.split(","))
    return f"""
WITH args AS ({args}),
{settling(f"args JOIN orders ON {match}", carrying="args.*")},
done AS (
    UPDATE orders
    SET status = 'COMPLETED', fulfillment_id = target.fulfillment_id, next_attempt_at = NULL,
        needs_review = false, attempts = orders.attempts + target.attempts, last_error = NULL,
        resolved_by = target.resolved_by,
        resolved_at = CASE WHEN target.resolved_by IS NULL THEN NULL ELSE clock_timestamp() END,
        resolution_note = target.note, updated_at = clock_timestamp()
    FROM target
    WHERE {SETTLE_TARGET}
    RETURNING {returning}
), emitted AS (
    {INSERT_EVENT}
    {settled_order_events_sql("done", "order.completed")}
)
SELECT {ORDER_COLUMNS} FROM done
"""


_COMPLETE = text(
    _complete_sql(
        "SELECT CAST(:order_id AS text) AS order_id, CAST(:fulfillment_id AS text) AS fulfillment_id,"
        " CAST(:attempts AS integer) AS attempts,"
        " CAST(:resolved_by AS text) AS resolved_by, CAST(:note AS text) AS note",
        "orders.order_id = args.order_id",
    )
)
# The completions of one event-loop pass (`Orders._complete_batch`): one UPDATE for all. Joined on
# the unique (client_id, order_id): joined on the id alone, a table never analyzed yet (a new
# database filling up) looked to the planner as if each id matched dozens of rows, and it
# hashed every order in the table for each batch.
_COMPLETE_MANY = Statement.of(
    text(
        _complete_sql(
            "SELECT a.*, NULL::text AS resolved_by, NULL::text AS note"
            " FROM unnest(CAST(:client_ids AS text[]), CAST(:order_ids AS text[]),"
            " CAST(:fulfillment_ids AS text[]), CAST(:attempts AS integer[]))"
            " AS a(client_id, order_id, fulfillment_id, attempts)",
            "orders.client_id = args.client_id AND orders.order_id = args.order_id",
        )
    )
)
# Outcome unknown: the next attempt is due after `delay`; past the review window it is flagged.
# Every call of this attempt has ended, so the last could reach the provider by now at the latest
# (`sent_by`, shortening the lease the request or the claim reserved), or, if it sent nothing, by
# when the calls before it could.
# Events: order.pending when the request answers 202 (`announce`), order.needs_review once; each
# stamped now, when it is written (a reschedule leaves the order's updated_at as it was), so a
# client polling `GET /events?after=` sees it.
_RESCHEDULE = text(f"""
WITH {settling("orders WHERE orders.order_id = :order_id")}, kept AS (
UPDATE orders
SET next_attempt_at = clock_timestamp() + make_interval(secs => :delay),
    sent_by = least(orders.sent_by, coalesce(CAST(:sent_by AS timestamptz), clock_timestamp())),
    attempts = attempts + :attempts, resolver_attempts = resolver_attempts + :resolver_attempt,
    last_error = :detail,
    flagged_at = CASE
        WHEN NOT needs_review AND created_at < clock_timestamp() - make_interval(secs => :review_after)
        THEN statement_timestamp() ELSE flagged_at END,
    needs_review = needs_review OR created_at < clock_timestamp() - make_interval(secs => :review_after)
FROM target
WHERE {SETTLE_TARGET}
RETURNING {ORDER_COLUMNS}, flagged_at = statement_timestamp() AS newly_flagged
), emitted AS (
    {INSERT_EVENT}
    SELECT client_id, 'order.pending', {order_data_sql("kept")}, statement_timestamp() FROM kept
    WHERE CAST(:announce AS boolean)
    UNION ALL
    SELECT client_id, 'order.needs_review', {order_data_sql("kept")}, flagged_at FROM kept
    WHERE kept.newly_flagged
)
SELECT * FROM kept
""")
_GET = text(f"SELECT {ORDER_COLUMNS} FROM orders WHERE order_id = :order_id")
# COMMITs (asyncpg's) that our sessions started before :since and that still run. One whose
# connection we lost may still commit: the server notices a vanished client only when it next
# reads or writes, after its COMMIT. `since` is the first look's own start.
_STILL_RUNNING = text("""
SELECT coalesce(CAST(:since AS timestamptz), statement_timestamp()) AS since, count(*) FILTER (
    WHERE a.query_start < coalesce(CAST(:since AS timestamptz), statement_timestamp())
) AS running
FROM pg_stat_activity a
WHERE a.datname = current_database() AND a.application_name = :application
  AND a.state = 'active' AND a.query = 'COMMIT;' AND a.pid <> pg_backend_pid()
""")
# pg_terminate_backend waits for the exit, and answers false (with a warning) past the wait.
_END_BACKEND = text("""
SELECT pg_terminate_backend(pid, :wait_ms) AS ended
FROM pg_stat_activity WHERE pid = :pid AND backend_start = :started
""")
STILL_RUNNING_WAIT = 5.0  # seconds a lost placement may take to end before its fate is unknown
_GET_OWN = text(f"SELECT {ORDER_COLUMNS} FROM orders WHERE order_id = :order_id AND client_id = :client_id")
# Orders due at the start of this pass, claimed for one resolver attempt. The attempt may POST,
# so `sent_by` moves past its lease; the lookup it makes first is judged by the value before.
_CLAIM_DUE = text(f"""
UPDATE orders
SET next_attempt_at = clock_timestamp() + make_interval(secs => :lease),
    sent_by = greatest(orders.sent_by, clock_timestamp() + make_interval(secs => :lease))
FROM (
    SELECT id, sent_by FROM orders
    WHERE status = 'PENDING' AND next_attempt_at <= :due
    ORDER BY next_attempt_at
    LIMIT :batch
    FOR UPDATE SKIP LOCKED) AS due
WHERE orders.id = due.id
RETURNING {", ".join("orders." + c.strip() for c in ORDER_COLUMNS.split(","))}, orders.request_id,
          due.sent_by AS sent_before
""")
_PENDING_STATS = text("""
SELECT count(*) FILTER (WHERE needs_review) AS review, min(created_at) AS oldest
FROM orders WHERE status = 'PENDING'
""")


class Orders:
    def __init__(self, engine: AsyncEngine, provider: Provider, settings: Settings) -> None:
        self.engine = engine
        self.key = settings.chain_key
        # Single statements are atomic on their own: no BEGIN/COMMIT round trips for them.
        self.single = single(engine)
        self.provider = provider
        self.settings = settings
        # Group commit (batching.py): the placements and completions of one event-loop pass.
        self._payments = Batcher("placement", self._pay_batch)
        self._completions = Batcher("completion", self._complete_batch)

    # --- placing -------------------------------------------------------------------------

    async def place(
        self,
        client_id: str,
        amount: int,
        idem: idempotency.IdempotencyKey | None,
        request_id: str | None,
    ) -> Placed:
        order_id = new_order_id()
        try:
            placed = await self._pay(ledger.OrderPayment(client_id, order_id, amount, request_id, idem))
        except Unreachable as exc:  # no statement was sent
            raise _nothing_moved(exc) from exc
        except Exception as exc:
            if not is_unavailable(exc):
                raise
            placed = await self._placed_despite(exc, order_id)
        if isinstance(placed, Placed):  # a replay
            return placed
        log.info("order placed; money held", order_id=order_id, amount=amount)
        try:
            outcome = await self.provider.fulfill(order_id, client_id, amount, request_id)
        except Exception as exc:  # a bug, not an answer: nothing is proved, so nothing is undone
            log.exception("calling the provider failed", order_id=order_id)
            outcome = Outcome(Kind.UNKNOWN, 0, f"calling the provider failed: {type(exc).__name__}")
        return Placed(await self._settle(placed, outcome, path="request"))

    async def _pay(self, payment: ledger.OrderPayment) -> OrderRow | Placed:
        """Step 1, in this pass's batch. A payment the batch did not try (its key was taken, or
        the batch failed and rolled back) takes the single path, which claims or replays."""
        paid = await self._payments.submit(payment)
        if isinstance(paid, OrderRow):
            return paid
        if isinstance(paid, WalletError):
            raise paid
        return await self._pay_alone(payment)

    async def _pay_batch(
        self, payments: Sequence[ledger.OrderPayment]
    ) -> list[OrderRow | WalletError | None]:
        """One statement for the batch. If it fails for any reason but the database's
        unavailability, nothing committed: every payment is tried again alone. If the database
        became unavailable the batch may have committed: each caller looks for its order."""
        try:
            async with direct(self.engine) as conn:
                return await ledger.place_orders(
                    conn,
                    payments,
                    lease_seconds=self.settings.order_lease_seconds,
                    idempotency_ttl_hours=self.settings.idempotency_ttl_hours,
                    key=self.key,
                )
        except Exception as exc:
            _batch_failed("placement", len(payments), exc)
            return [None] * len(payments)

    async def _pay_alone(self, payment: ledger.OrderPayment) -> OrderRow | Placed:
        """Step 1 on its own: one statement, or with an Idempotency-Key one transaction."""
        idem = payment.idem
        params: dict[str, Any] = {
            "client_id": payment.client_id,
            "order_id": payment.order_id,
            "amount": payment.amount,
            "lease_seconds": self.settings.order_lease_seconds,
            "request_id": payment.request_id,
            "key": self.key,
        }
        if idem is None:
            async with sending(self.single.connect()) as conn:
                return await ledger.place_order(conn, **params)
        async with sending(self.engine.begin()) as conn:
            stored = await idempotency.claim(conn, idem, self.settings.idempotency_ttl_hours)
            if stored is not None:
                return await self._replay(conn, stored)
            order = await ledger.place_order(conn, **params)
            await idempotency.attach_order(conn, idem, payment.order_id)
            return order

    async def _placed_despite(self, exc: Exception, order_id: str) -> OrderRow:
        """The database failed while the order was being paid for: the money may or may not
        have moved (a lost COMMIT answer), and the statement may even still be on its way or
        running. End it first, then look: a 5xx that names no order must mean that no money
        moved."""
        log.warning("database failed while placing an order", order_id=order_id, error=str(exc))
        backend = exc.backend if isinstance(exc, Lost) else None
        for attempt in range(3):
            try:
                ended = await (self._ended(backend) if backend else self._lost_statements_ended())
                if not ended:
                    break
                async with self.single.connect() as conn:
                    row = (await conn.execute(_GET, {"order_id": order_id})).first()
            except Exception as again:
                if not is_unavailable(again):
                    raise
                await asyncio.sleep(0.1 * 2**attempt)
                continue
            if row is None:
                raise _nothing_moved(exc) from exc
            return OrderRow.of(row)
        raise ServiceUnavailable(
            "The database failed while the order was being placed; it may have been placed."
            f" GET /orders/{order_id} will tell",
            code="ORDER_OUTCOME_UNKNOWN",
            details={"orderId": order_id},
            headers=location(order_id),
        ) from exc

    async def _ended(self, backend: Backend) -> bool:
        """Terminate the server process the placement was sent to, and wait (up to
        STILL_RUNNING_WAIT) until it has exited: whatever it received, even bytes it had not yet
        read, has then committed or never will. A process already gone is ended."""
        params = {"pid": backend.pid, "started": backend.started, "wait_ms": int(STILL_RUNNING_WAIT * 1000)}
        async with self.single.connect() as conn:
            row = (await conn.execute(_END_BACKEND, params)).first()
        return row is None or bool(row.ended)

    async def _lost_statements_ended(self) -> bool:
        """Behind a transaction pooler, where the server process cannot be named: every statement
        runs between BEGIN and COMMIT there, so only a lost COMMIT can still commit. Whether every
        COMMIT of our sessions that was running when we looked first has ended, within
        STILL_RUNNING_WAIT: only then does an order's absence prove that no money moved. Each look
        is a transaction of its own, since one transaction sees one snapshot of pg_stat_activity.
        Other sessions' COMMITs count too: a lost one cannot be told from them, and they are short."""
        params: dict[str, Any] = {"since": None, "application": APPLICATION_NAME}
        deadline = time.monotonic() + STILL_RUNNING_WAIT
        while True:
            async with self.single.connect() as conn:
                looked = (await conn.execute(_STILL_RUNNING, params)).one()
            if looked.running == 0:
                return True
            if time.monotonic() >= deadline:
                return False
            params["since"] = looked.since
            await asyncio.sleep(0.01)

    async def _replay(self, conn: AsyncConnection, stored: idempotency.StoredResponse) -> Placed:
        """The key's order as it stands now, so a client retrying a 202 learns the outcome; 409
        while the request that placed it is still making its own attempts (it has recorded none
        yet, and its lease has not run out)."""
        assert stored.order_id is not None  # attached in the placement's own transaction
        order = OrderRow.of((await conn.execute(_GET, {"order_id": stored.order_id})).one())
        request_running = (
            order.status == PENDING
            and order.attempts == 0
            and order.next_attempt_at is not None
            and order.next_attempt_at > datetime.now(UTC)
        )
        if request_running:
            raise Conflict(f"A request with this {idempotency.HEADER} is still being processed; retry later")
        return Placed(order, replayed=True)

    # --- settling ------------------------------------------------------------------------

    async def _settle(self, order: OrderRow, outcome: Outcome, *, path: str) -> OrderRow:
        """Step 3. Whatever fails here, the money already moved: the answer is the order as it
        stands (PENDING, its money held, the resolver to finish it), never an anonymous 5xx."""
        observability.ORDER_OUTCOMES.labels(outcome.kind.value, path).inc()
        try:
            if outcome.kind is Kind.FULFILLED:
                assert outcome.fulfillment_id is not None
                return await self._complete(order, outcome.fulfillment_id, outcome.attempts)
            refund = self.settings.fulfillment_on_unknown is OnUnknown.REFUND and outcome.failure is not None
            if outcome.kind is Kind.REFUSED or refund:
                return await self._refund(order, outcome)
            return await self._reschedule(order, outcome, resolver=path == "resolver")
        except Exception:
            log.exception("could not settle an order; it stays PENDING", order_id=order.order_id)
            return order

    async def _complete(self, order: OrderRow, fulfillment_id: str, attempts: int) -> OrderRow:
        finished = await self._completions.submit(
            _Completion(order.client_id, order.order_id, fulfillment_id, attempts)
        )
        if finished is None:
            async with self.single.connect() as conn:
                return await self._settled_elsewhere(conn, order.order_id)
        _log_finished(finished, f"provider gave fulfillment id {fulfillment_id}")
        return finished

    async def _complete_batch(self, batch: Sequence[_Completion]) -> list[OrderRow | None]:
        """One UPDATE for the batch; None for an order no longer PENDING (settled elsewhere).
        An order twice in one batch (the request and a resolver), or a batch that failed,
        completes one statement at a time, so there is still exactly one winner."""
        first = {c.order_id: i for i, c in reversed(list(enumerate(batch)))}
        together = [c for i, c in enumerate(batch) if first[c.order_id] == i]
        params = {
            "client_ids": [c.client_id for c in together],
            "order_ids": [c.order_id for c in together],
            "fulfillment_ids": [c.fulfillment_id for c in together],
            "attempts": [c.attempts for c in together],
        }
        batched = True
        try:
            async with direct(self.engine) as conn:
                rows = await conn.fetch(_COMPLETE_MANY, params)
        except Exception as exc:
            _batch_failed("completion", len(batch), exc)
            batched, rows = False, []
        finished = {row["order_id"]: OrderRow.of(row) for row in rows}
        answers: list[OrderRow | None] = []
        for i, c in enumerate(batch):
            if batched and first[c.order_id] == i:
                answers.append(finished.get(c.order_id))
                continue
            one = {
                "order_id": c.order_id,
                "fulfillment_id": c.fulfillment_id,
                "attempts": c.attempts,
                "resolved_by": None,
                "note": None,
            }
            async with self.single.connect() as conn:
                row = (await conn.execute(_COMPLETE, one)).first()
            answers.append(None if row is None else OrderRow.of(row))
        return answers

    async def _refund(self, order: OrderRow, outcome: Outcome) -> OrderRow:
        failure = outcome.failure or Failure.PROVIDER_ERROR
        async with self.engine.begin() as conn:
            failed = await ledger.refund_order(
                conn,
                order.order_id,
                failure=failure.value,
                attempts=outcome.attempts,
                key=self.key,
                detail=outcome.detail,
            )
            if failed is None:
                return await self._settled_elsewhere(conn, order.order_id)
        _log_finished(failed, outcome.detail)
        return failed

    async def _reschedule(self, order: OrderRow, outcome: Outcome, *, resolver: bool) -> OrderRow:
        tries = order.resolver_attempts + (1 if resolver else 0)
        base = self.settings.fulfillment_backoff_seconds * 2 ** min(tries, 30)
        delay = min(base * random.uniform(0.5, 1.5), self.settings.fulfillment_retry_max_seconds)
        if outcome.sent_by is not None:  # not before the provider's "no record" would prove it
            proof_at = outcome.sent_by + timedelta(seconds=self.settings.fulfillment_timeout_seconds)
            delay = max(delay, (proof_at - datetime.now(UTC)).total_seconds())
        params = {
            "order_id": order.order_id,
            "delay": delay,
            "sent_by": outcome.sent_by,
            "attempts": min(outcome.attempts, 1) if resolver else outcome.attempts,
            "resolver_attempt": 1 if resolver else 0,
            "detail": outcome.detail,
            "review_after": self.settings.fulfillment_resolve_hours * 3600,
            "announce": not resolver,
        }
        async with self.single.connect() as conn:
            row = (await conn.execute(_RESCHEDULE, params)).first()
            if row is None:
                return await self._settled_elsewhere(conn, order.order_id)
        log.warning(
            "order outcome unknown; money held",
            order_id=order.order_id,
            reason=outcome.detail,
            next_attempt_in=round(delay, 3),
        )
        if row.newly_flagged:
            observability.ORDERS_FLAGGED.inc()
            log.error("order flagged for review", order_id=order.order_id, reason=outcome.detail)
        return OrderRow.of(row)

    async def _settled_elsewhere(self, conn: AsyncConnection, order_id: str) -> OrderRow:
        """Another process, or an operator, settled the order first: answer with that."""
        return OrderRow.of((await conn.execute(_GET, {"order_id": order_id})).one())

    # --- reading -------------------------------------------------------------------------

    async def get(self, client_id: str, order_id: str) -> OrderRow:
        """Another client's order is indistinguishable from one that does not exist."""
        async with self.single.connect() as conn:
            row = (await conn.execute(_GET_OWN, {"order_id": order_id, "client_id": client_id})).first()
        if row is None:
            raise NotFound("Order not found", code="ORDER_NOT_FOUND")
        return OrderRow.of(row)

    async def get_any(self, order_id: str) -> OrderRow:
        async with self.single.connect() as conn:
            row = (await conn.execute(_GET, {"order_id": order_id})).first()
        if row is None:
            raise NotFound("Order not found", code="ORDER_NOT_FOUND")
        return OrderRow.of(row)

    # --- the resolver --------------------------------------------------------------------

    async def resolve_due(self, batch: int | None = None) -> int:
        """Ask again about every order due now, a batch at a time, so a backlog drains in one
        pass; orders rescheduled during the pass wait for the next one. A batch settles with at
        most a quarter of the pool, so a backlog of thousands never starves new requests."""
        batch = batch or max(1, self.settings.db_pool_size // 4)
        total = 0
        due = datetime.now(UTC)
        while True:
            async with self.engine.begin() as conn:
                params = {"lease": self.settings.resolver_lease_seconds, "batch": batch, "due": due}
                claimed = (await conn.execute(_CLAIM_DUE, params)).all()
            await asyncio.gather(*(self._resolve_one(row) for row in claimed))
            total += len(claimed)
            if len(claimed) < batch:
                break
        await self._measure_pending()
        return total

    async def _resolve_one(self, row: Any) -> None:
        """The claim moved the due time past this attempt: no other resolver asks meanwhile,
        and no lock is held while the provider is called."""
        order = OrderRow.of(row)
        try:
            outcome = await self.provider.ask_again(
                order.order_id, order.client_id, order.amount, row.request_id, quiet_since=row.sent_before
            )
            observability.RESOLVER_ATTEMPTS.labels(outcome.kind.value).inc()
            await self._settle(order, outcome, path="resolver")
        except Exception:
            log.exception("resolver attempt failed; the order will be claimed again", order_id=order.order_id)

    async def _measure_pending(self) -> None:
        async with self.single.connect() as conn:
            stats = (await conn.execute(_PENDING_STATS)).one()
        observability.REVIEW_QUEUE.set(stats.review)
        oldest = (datetime.now(UTC) - stats.oldest).total_seconds() if stats.oldest else 0.0
        observability.OLDEST_PENDING_SECONDS.set(max(oldest, 0.0))

    # --- an operator's decision ----------------------------------------------------------

    async def resolve(
        self,
        order_id: str,
        *,
        fulfillment_id: str | None,
        note: str,
        by: str,
        idem: idempotency.IdempotencyKey | None,
    ) -> Placed:
        """Finish a PENDING order by hand: fulfilled (with the provider's id) or failed (money
        back). Exactly one of this and the resolver wins; a final order answers 409. A replay
        answers with the order, final since the first request and so unchanged (the key's
        fingerprint names the order)."""
        async with self.engine.begin() as conn:
            if idem is not None:
                stored = await idempotency.claim(conn, idem, self.settings.idempotency_ttl_hours)
                if stored is not None:
                    return Placed(OrderRow.of((await conn.execute(_GET, {"order_id": order_id})).one()), True)
            if fulfillment_id is not None:
                params = {
                    "order_id": order_id,
                    "fulfillment_id": fulfillment_id,
                    "attempts": 0,
                    "resolved_by": by,
                    "note": note,
                }
                row = (await conn.execute(_COMPLETE, params)).first()
                finished = None if row is None else OrderRow.of(row)
            else:
                finished = await ledger.refund_order(
                    conn,
                    order_id,
                    failure=Failure.RESOLVED_FAILED.value,
                    attempts=0,
                    key=self.key,
                    resolved_by=by,
                    note=note,
                )
            if finished is None:
                current = (await conn.execute(_GET, {"order_id": order_id})).first()
                if current is None:
                    raise NotFound("Order not found", code="ORDER_NOT_FOUND")
                final = OrderRow.of(current)
                raise Conflict(
                    f"Order {order_id} is already {final.status}",
                    code="ORDER_ALREADY_FINAL",
                    data=admin_order_json(final),
                )
            if idem is not None:
                await idempotency.finish(conn, idem, {"order_id": order_id})
        observability.ORDERS_RESOLVED.labels("fulfilled" if fulfillment_id else "failed").inc()
        _log_finished(finished, f"resolved by {by}: {note}")
        return Placed(finished)


@dataclass(frozen=True, slots=True)
class _Completion:
    """A fulfilled order to complete."""

    client_id: str
    order_id: str
    fulfillment_id: str
    attempts: int


def _nothing_moved(exc: Exception) -> ServiceUnavailable:
    """The 5xx that names no order: the database failed and the order is known not to exist."""
    log.warning("database unavailable; order not placed", error=str(exc))
    return ServiceUnavailable("Service temporarily unavailable; no money moved")


def _batch_failed(kind: str, size: int, exc: Exception) -> None:
    """A batch's statement failed. If the database became unavailable the batch may have
    committed, so its callers must look before answering: raise. Otherwise it rolled back whole
    (an error, or a lock the server gave up waiting for: one wallet row held elsewhere must not
    fail the other wallets' orders): the caller retries its items one by one."""
    if is_unavailable(exc) and not gave_up(exc):
        raise exc
    log.warning(
        "batch failed; retrying one by one", kind=kind, size=size, error=str(getattr(exc, "orig", exc))
    )
    observability.BATCH_FALLBACKS.labels(kind).inc()


def _log_finished(order: OrderRow, reason: str) -> None:
    observability.ORDERS_FINISHED.labels(order.status).inc()
    log.info(
        "order finished", order_id=order.order_id, status=order.status, failure=order.failure, reason=reason
    )
