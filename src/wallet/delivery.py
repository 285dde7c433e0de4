"""Webhook delivery: at least once, signed per Standard Webhooks, in every server process.

Each pass (`Deliverer.run`, a background job like the order resolver):

1. fan-out: queued events (`event_queue`, filled by a statement trigger in the event's own transaction)
   become one delivery row per matching endpoint registered before the event, in one statement
   (older events reach a new endpoint only by replay). A disabled endpoint's is FAILED at once,
   so that replaying "since" after re-enabling it sends what it missed; the endpoints are read
   FOR KEY SHARE, so one deleted meanwhile is skipped rather than failing the whole batch;
2. claim: due deliveries are taken with FOR UPDATE SKIP LOCKED and their due time moved past a
   lease (`Settings.webhook_lease_seconds`, times the delivery's turn among its endpoint's),
   committed at once: no lock is held during a call. Each endpoint's deliveries are then a task
   of their own, and the endpoints this process is calling are not claimed again meanwhile, so a
   slow receiver holds up only its own events;
3. call: POST the event (`webhook_send.send`: no redirects, WEBHOOK_TIMEOUT_SECONDS, the target
   checked against SSRF again), `webhook-id` = the event id so receivers de-duplicate;
4. record, in one transaction: the attempt in the log, then delivered (2xx), a retry after the
   next delay of WEBHOOK_RETRY_SCHEDULE (at least the `Retry-After` of a 429/503), or failed once
   the schedule is exhausted. 410 Gone disables the endpoint; so does a delivery that exhausted
   its schedule while the endpoint failed everything since its first attempt (days of failure).
   Either writes `webhook_endpoint.disabled`: to the endpoint's client, or for a global endpoint
   to the operators' stream (`events.OPERATOR_STREAM`: the admin's feed and global endpoints).

A process killed mid-call leaves its claim to expire: another pass delivers again with the same
webhook-id, so a receiver sees at most a duplicate.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson
import structlog
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from wallet import observability
from wallet.events import INSERT_EVENT, OPERATOR_STREAM, event_json
from wallet.settings import Settings
from wallet.webhook_send import Attempt, refused, send
from wallet.webhooks import SecretBox, endpoint_json

log = structlog.get_logger(__name__)

_BATCH = 50
_MAX_RETRY_AFTER = 86400.0  # a receiver asking for longer gets its next attempt after a day

_FAN_OUT = text("""
WITH taken AS (
    DELETE FROM event_queue q
    USING (SELECT client_id, event_no FROM event_queue ORDER BY event_no LIMIT :batch
           FOR UPDATE SKIP LOCKED) t
    WHERE q.client_id = t.client_id AND q.event_no = t.event_no
    RETURNING q.client_id, q.event_no
), made AS (
    INSERT INTO webhook_deliveries (client_id, endpoint_id, event_no, status, next_attempt_at, last_error)
    SELECT e.client_id, w.endpoint_id, e.id,
           CASE WHEN w.enabled THEN 'PENDING' ELSE 'FAILED' END,
           CASE WHEN w.enabled THEN statement_timestamp() END,
           CASE WHEN w.enabled THEN NULL ELSE 'endpoint disabled' END
    FROM taken t
    JOIN events e ON e.client_id = t.client_id AND e.id = t.event_no
    JOIN webhook_endpoints w ON (w.client_id IS NULL OR w.client_id = e.client_id)
        AND (w.event_types IS NULL OR e.type = ANY (w.event_types)) AND w.created_at <= e.created_at
        -- an endpoint is not told of its own disabling: the one receiver known not to answer
        AND NOT (e.type = 'webhook_endpoint.disabled' AND e.data ->> 'id' = w.endpoint_id)
    ORDER BY e.id
    FOR KEY SHARE OF w
    RETURNING 1
)
SELECT (SELECT count(*) FROM taken) AS taken, (SELECT count(*) FROM made) AS made
""")
# Due deliveries of endpoints this process is not already calling, each leased for as long as
# its turn may take: an endpoint's deliveries go out one after another, so the n-th of them is
# the lease n times over (one lease each would expire while it waits, and another process
# would send it in parallel).
_CLAIM = text("""
WITH due AS (
    SELECT client_id, id, endpoint_id FROM webhook_deliveries
    WHERE status = 'PENDING' AND next_attempt_at <= statement_timestamp()
      AND endpoint_id <> ALL (CAST(:busy AS text[]))
    ORDER BY next_attempt_at LIMIT :batch FOR UPDATE SKIP LOCKED
), turns AS (
    SELECT client_id, id, row_number() OVER (PARTITION BY endpoint_id ORDER BY id) AS turn FROM due
), claimed AS (
    UPDATE webhook_deliveries d
    SET next_attempt_at = statement_timestamp() + make_interval(secs => :lease * turns.turn),
        attempts = d.attempts + 1, updated_at = statement_timestamp()
    FROM turns
    WHERE d.client_id = turns.client_id AND d.id = turns.id
    RETURNING d.client_id, d.id, d.endpoint_id, d.event_no, d.attempts
)
SELECT c.client_id, c.id, c.endpoint_id, c.attempts, e.id AS event_no, e.event_id, e.type, e.data,
       e.created_at, w.url, w.enabled, w.secret,
       CASE WHEN w.previous_until > now() THEN w.previous_secret END AS previous_secret
FROM claimed c
JOIN events e ON e.client_id = c.client_id AND e.id = c.event_no
JOIN webhook_endpoints w ON w.endpoint_id = c.endpoint_id
ORDER BY e.id
""")
# An endpoint deleted while its delivery was at the receiver took the delivery with it (ON DELETE
# CASCADE): its attempt is not logged either.
_LOG_ATTEMPT = text("""
INSERT INTO webhook_attempts (client_id, delivery_id, endpoint_id, event_id, attempted_at,
                              status_code, latency_ms, error, response_body)
SELECT :client_id, :delivery_id, :endpoint_id, :event_id, :attempted_at, :status_code,
       :latency_ms, :error, :response_body
WHERE EXISTS (SELECT 1 FROM webhook_endpoints WHERE endpoint_id = :endpoint_id)
""")
# Guarded by the attempt number: a claim that expired and was taken again is not overwritten.
# The delivery is found by its key alone and locked, and its status tested on the locked row:
# `AND status = 'PENDING'` in the scan let the planner walk every PENDING delivery instead of
# the key when the statistics said few were (docs/benchmarks.md, "A planner trap in the settle statements").
_SETTLE = text("""
WITH target AS (
    SELECT client_id, id, status AS target_status, attempts AS target_attempts
    FROM webhook_deliveries
    WHERE client_id = :client_id AND id = :delivery_id
    FOR NO KEY UPDATE
)
UPDATE webhook_deliveries d
SET status = :status,
    next_attempt_at = CASE WHEN :status = 'PENDING'
                           THEN statement_timestamp() + make_interval(secs => :delay) END,
    last_status = :status_code, last_error = :error, updated_at = statement_timestamp()
FROM target
WHERE d.client_id = target.client_id AND d.id = target.id
  AND target.target_status = 'PENDING' AND target.target_attempts = :attempt
""")
_HEALTH = text("""
UPDATE webhook_endpoints
SET failing_since = CASE WHEN :ok THEN NULL ELSE coalesce(failing_since, :attempted_at) END
WHERE endpoint_id = :endpoint_id AND (failing_since IS NULL) = NOT CAST(:ok AS boolean)
""")
_DISABLE = text("""
UPDATE webhook_endpoints
SET enabled = false, disabled_reason = :reason, updated_at = now()
WHERE endpoint_id = :endpoint_id AND enabled
  AND (CAST(:gone AS boolean) OR failing_since <= (
        SELECT min(attempted_at) FROM webhook_attempts
        WHERE client_id = :client_id AND delivery_id = :delivery_id))
RETURNING endpoint_id, client_id, url, event_types, description, enabled, disabled_reason,
          created_at, updated_at
""")
_FAIL_PENDING = text("""
UPDATE webhook_deliveries
SET status = 'FAILED', next_attempt_at = NULL, last_error = 'endpoint disabled',
    updated_at = statement_timestamp()
WHERE endpoint_id = :endpoint_id AND status = 'PENDING'
""")
_DISABLED_EVENT = text(f"""
{INSERT_EVENT}
VALUES (:client_id, 'webhook_endpoint.disabled', CAST(:data AS jsonb), statement_timestamp())
""")
_STATS = text("""
SELECT (SELECT count(*) FROM event_queue) + (SELECT count(*) FROM webhook_deliveries
                                              WHERE status = 'PENDING') AS depth,
       least((SELECT min(e.created_at) FROM event_queue q
              JOIN events e ON e.client_id = q.client_id AND e.id = q.event_no),
             (SELECT min(created_at) FROM webhook_deliveries WHERE status = 'PENDING')) AS oldest
""")


class Deliverer:
    def __init__(
        self, engine: AsyncEngine, settings: Settings, box: SecretBox, http: aiohttp.ClientSession
    ) -> None:
        self.single = engine.execution_options(isolation_level="AUTOCOMMIT")
        self.engine = engine
        self.settings = settings
        self.box = box
        self.http = http
        # Endpoints this process is calling: each its own task, so a slow or hanging receiver
        # holds up its own deliveries only, never the pass nor other endpoints'.
        self._busy: dict[str, asyncio.Task[None]] = {}

    async def run(self) -> int:
        """One pass: fan out every queued event, then start delivering whatever is due, a batch
        at a time, to the endpoints this process is not calling yet; returns the number claimed."""
        async with self.single.connect() as conn:
            while (await conn.execute(_FAN_OUT, {"batch": 500})).one().taken == 500:
                pass
        total = 0
        while True:
            params = {"lease": self.settings.webhook_lease_seconds, "batch": _BATCH, "busy": list(self._busy)}
            async with self.single.connect() as conn:
                claimed = (await conn.execute(_CLAIM, params)).all()
            by_endpoint: dict[str, list[Any]] = {}
            for row in claimed:
                by_endpoint.setdefault(row.endpoint_id, []).append(row)
            for endpoint_id, rows in by_endpoint.items():
                self._busy[endpoint_id] = asyncio.create_task(self._deliver_in_order(endpoint_id, rows))
            total += len(claimed)
            if len(claimed) < _BATCH:
                break
        await self._measure()
        return total

    async def close(self) -> None:
        """Stop the calls in progress (shutdown): their claims expire and another pass sends
        them again under the same webhook-id."""
        for task in list(self._busy.values()):
            task.cancel()
        await asyncio.gather(*self._busy.values(), return_exceptions=True)

    async def _deliver_in_order(self, endpoint_id: str, rows: list[Any]) -> None:
        """One endpoint's deliveries one after another, oldest event first: a receiver sees a
        client's events in the order they happened (retries aside; `createdAt` orders them)."""
        try:
            for row in rows:
                try:
                    if not await self._record(row, await self._call(row)):
                        return  # the endpoint was just disabled: the rest were failed with it
                except Exception:
                    log.exception("webhook delivery failed; it will be claimed again", delivery_id=row.id)
        finally:
            self._busy.pop(endpoint_id, None)

    async def _call(self, row: Any) -> Attempt:
        if not row.enabled:
            return refused("endpoint disabled")
        secrets = [self.box.open(row.endpoint_id, row.secret)]
        if row.previous_secret is not None:
            secrets.append(self.box.open(row.endpoint_id, row.previous_secret))
        body = orjson.dumps(event_json(row)).decode()
        return await send(
            self.http, self.settings, url=row.url, event_id=row.event_id, body=body, secrets=secrets
        )

    async def _record(self, row: Any, attempt: Attempt) -> bool:
        """Log the attempt and settle the delivery; False if the endpoint is now disabled."""
        ok, status, error = attempt.ok, attempt.status, attempt.error
        gone = status == 410
        schedule = self.settings.webhook_retry_schedule
        exhausted = row.attempts > len(schedule) or not row.enabled
        outcome = "delivered" if ok else "gone" if gone else "failed" if exhausted else "retry"
        delay = 0.0
        if outcome == "retry":
            delay = max(schedule[row.attempts - 1], min(attempt.retry_after or 0.0, _MAX_RETRY_AFTER))
        keys = {"client_id": row.client_id, "delivery_id": row.id, "endpoint_id": row.endpoint_id}
        async with self.engine.begin() as conn:
            logged = {**keys, "event_id": row.event_id, "attempted_at": attempt.attempted_at}
            logged |= {"status_code": status, "latency_ms": attempt.latency_ms, "error": error}
            await conn.execute(_LOG_ATTEMPT, {**logged, "response_body": attempt.body})
            settled = {"PENDING": "retry", "DELIVERED": "delivered"}
            new_status = next((s for s, o in settled.items() if o == outcome), "FAILED")
            await conn.execute(
                _SETTLE,
                {**keys, "status": new_status, "delay": delay, "status_code": status, "error": error}
                | {"attempt": row.attempts},
            )
            if not row.enabled:  # disabled since the fan-out: nothing was sent
                return False
            await conn.execute(
                _HEALTH, {"endpoint_id": row.endpoint_id, "ok": ok, "attempted_at": attempt.attempted_at}
            )
            still_enabled = True
            if gone or exhausted:
                reason = "answered 410 Gone" if gone else "failed every delivery for the whole retry schedule"
                still_enabled = not await self._disable(conn, keys, gone=gone, reason=reason)
        observability.WEBHOOK_DELIVERIES.labels(outcome if row.enabled else "refused").inc()
        log.info(
            "webhook attempt",
            event_id=row.event_id,
            endpoint_id=row.endpoint_id,
            status=status,
            outcome=outcome,
            error=error,
        )
        return still_enabled

    async def _disable(self, conn: AsyncConnection, keys: dict[str, Any], *, gone: bool, reason: str) -> bool:
        row = (await conn.execute(_DISABLE, {**keys, "gone": gone, "reason": reason})).first()
        if row is None:
            return False
        await conn.execute(_FAIL_PENDING, {"endpoint_id": row.endpoint_id})
        log.error("webhook endpoint disabled", endpoint_id=row.endpoint_id, reason=reason)
        # A global endpoint belongs to no client: its event goes to the operators' stream.
        stream = OPERATOR_STREAM if row.client_id is None else row.client_id
        data = orjson.dumps(endpoint_json(row)).decode()
        await conn.execute(_DISABLED_EVENT, {"client_id": stream, "data": data})
        return True

    async def _measure(self) -> None:
        async with self.single.connect() as conn:
            stats = (await conn.execute(_STATS)).one()
        observability.WEBHOOK_QUEUE_DEPTH.set(stats.depth)
        oldest = (datetime.now(UTC) - stats.oldest).total_seconds() if stats.oldest else 0.0
        observability.WEBHOOK_OLDEST_SECONDS.set(max(oldest, 0.0))
