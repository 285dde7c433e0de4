"""Idempotency-Key records, claimed and completed inside the caller's money transaction.

A record is claimed with INSERT ... ON CONFLICT in the same transaction that moves the money, and
what the request came to (the movement, or the order) is kept in that same transaction. So there
is no moment where money moved and the key is unrecorded, or the reverse: if the transaction
rolls back (validation, insufficient funds, crash), the claim disappears with it and the key is
free. A replay renders what was kept, with the code that rendered the first answer.

A concurrent request with the same key waits on the uncommitted claim's index entry, then sees
the committed record: a replay, 409 while an order is still being fulfilled, or 422 if its body
differs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import BaseModel
from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from wallet.errors import BadRequest, Conflict, IdempotencyMismatch

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"


ADMIN_SCOPE = "admin"
_CLIENT_PREFIX = "client:"


def client_scope(client_id: str) -> str:
    """A client's scope. The prefix keeps every client apart from the admin and from each other,
    whatever its id is (the database checks the shape too)."""
    return f"{_CLIENT_PREFIX}{client_id}"


@dataclass(frozen=True, slots=True)
class IdempotencyKey:
    caller: str  # ADMIN_SCOPE or client_scope(client_id)
    key: str
    fingerprint: bytes

    @property
    def tenant(self) -> str:
        """Where the record lives once tables are distributed by client (docs/scaling.md): with
        the client's wallet for a client's record; for the admin's, `admin:<key>`, so that its
        scope stays (admin, key) across clients. The database checks the same rule (0007)."""
        if self.caller.startswith(_CLIENT_PREFIX):
            return self.caller.removeprefix(_CLIENT_PREFIX)
        return f"{self.caller}:{self.key}"


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """What the key's first request left, for a replay to render: the domain value it came to
    (`result`), or for an order the order itself, whose current state a replay answers. Records
    written before migration 0013 hold the answer's bytes instead (`status`, `body`)."""

    result: dict[str, Any] | None
    order_id: str | None
    status: int | None = None
    body: bytes | None = None


def validate_key(raw: str | None) -> str | None:
    if raw is None:
        return None
    if not 1 <= len(raw) <= 255 or not raw.isascii() or not raw.isprintable():
        raise BadRequest(f"{HEADER} must be 1-255 printable ASCII characters", code="INVALID_IDEMPOTENCY_KEY")
    return raw


def fingerprint(route: str, request: BaseModel) -> bytes:
    """What makes two requests "the same": the route and what the validated request means, not
    how its JSON was spelled. Amounts are integer cents (`10`, `10.0`, `1e1` and `100e-1` are one
    request), keys are sorted, and an optional field sent as null is the same as one left out
    (both are None in the model); any other difference of amount, field or value is another
    request."""
    canonical = orjson.dumps(request.model_dump(), option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(route.encode() + b"\n" + canonical).digest()


def key_for(scope: str, raw: str | None, route: str, request: BaseModel) -> IdempotencyKey | None:
    """The request's key in `scope`, if it sent one (`raw`, checked here), with the fingerprint of
    what the request means."""
    key = validate_key(raw)
    if key is None:
        return None
    return IdempotencyKey(scope, key, fingerprint(route, request))


# Claim the key, or take over a record past its expiry: `idempotency_claim` (migration 0008),
# which the order batch (`ledger.place_orders`) claims with too. True when claimed.
_CLAIM = text(
    "SELECT idempotency_claim(:tenant, :caller, :key, :fingerprint, CAST(:ttl_hours AS double precision))"
)
_EXISTING = text("""
SELECT fingerprint, result, order_id, response_status, response_body FROM idempotency_keys
WHERE tenant = :tenant AND caller = :caller AND key = :key
""").columns(result=JSONB)
_FINISH = text("""
UPDATE idempotency_keys SET result = :result WHERE tenant = :tenant AND caller = :caller AND key = :key
""").bindparams(bindparam("result", type_=JSONB))
_ATTACH_ORDER = text("""
UPDATE idempotency_keys SET order_id = :order_id WHERE tenant = :tenant AND caller = :caller AND key = :key
""")
# By key, not by ctid: once the table is distributed the batch is picked across shards, and a
# ctid names a row only within one shard (docs/scaling.md). A record is finished once it holds a
# result, an order, or (written before migration 0013) an answer: only a claim still in its
# request's transaction has none of them, and that one is never past its expiry.
_PURGE = text("""
DELETE FROM idempotency_keys WHERE (tenant, caller, key) IN (
    SELECT tenant, caller, key FROM idempotency_keys
    WHERE expires_at < now() AND (result IS NOT NULL OR order_id IS NOT NULL OR response_status IS NOT NULL)
    LIMIT :batch)
""")


async def claim(conn: AsyncConnection, idem: IdempotencyKey, ttl_hours: float) -> StoredResponse | None:
    """Claim the key for this request, or return the response stored for it earlier."""
    params = {**_where(idem), "fingerprint": idem.fingerprint, "ttl_hours": ttl_hours}
    if await conn.scalar(_CLAIM, params):
        return None
    row = (await conn.execute(_EXISTING, _where(idem))).one()
    if row.fingerprint != idem.fingerprint:
        raise IdempotencyMismatch(f"{HEADER} was already used with a different request body or endpoint")
    if row.result is None and row.order_id is None and row.response_status is None:
        raise Conflict(f"A request with this {HEADER} is still being processed; retry later")
    return StoredResponse(row.result, row.order_id, row.response_status, row.response_body)


def _where(idem: IdempotencyKey) -> dict[str, str]:
    """The record's key, its tenant first (one shard once distributed)."""
    return {"tenant": idem.tenant, "caller": idem.caller, "key": idem.key}


async def finish(conn: AsyncConnection, idem: IdempotencyKey, result: dict[str, Any]) -> None:
    """The record is finished with `result`, the domain value replays render (JSON-shaped)."""
    await conn.execute(_FINISH, {**_where(idem), "result": result})


async def attach_order(conn: AsyncConnection, idem: IdempotencyKey, order_id: str) -> None:
    await conn.execute(_ATTACH_ORDER, {**_where(idem), "order_id": order_id})


async def purge_expired(engine: AsyncEngine, batch: int = 1000) -> int:
    """Delete finished records past their expiry, in small batches to keep locks short."""
    total = 0
    while True:
        async with engine.begin() as conn:
            deleted = (await conn.execute(_PURGE, {"batch": batch})).rowcount
        total += deleted
        if deleted < batch:
            return total
