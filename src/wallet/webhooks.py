"""Webhook endpoints: registration, enabling, secret rotation, removal, replay and the attempt log.

Secrets must be usable to sign every delivery, so unlike API keys they cannot be stored as a
hash. They are stored sealed (AES-256-GCM, the endpoint id as associated data, so a sealed
secret cannot be moved to another endpoint) with a key derived from LEDGER_KEY, which never
enters the database: a copy of the database alone cannot forge deliveries. A rotation keeps the
previous secret signing beside the new one for ROTATION_OVERLAP (receivers accept either of the
space-separated signatures), then drops it.

Client calls pass their client id as `owner` and see only their own endpoints (another client's
is a 404); the admin passes None and sees every endpoint, global ones (no client) included.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from wallet import ssrf
from wallet.chain import LedgerKey
from wallet.errors import ClientNotFound, Conflict, NotFound
from wallet.wire import iso

ROTATION_OVERLAP = timedelta(hours=24)
SECRET_PREFIX = "whsec_"  # noqa: S105 - the format's prefix, not a secret
ENDPOINT_ID_PATTERN = r"^we_[0-9a-f]{24}$"


class SecretBox:
    """Seals endpoint secrets with a key derived from the ledger key (and its old keys, so a
    LEDGER_KEY rotation leaves existing secrets readable)."""

    def __init__(self, key: LedgerKey) -> None:
        self._key_id = key.key_id
        self._keys = {key.key_id: self._derive(key.secret)}
        self._keys.update({kid: self._derive(s) for kid, s in key.old.items()})

    @staticmethod
    def _derive(secret: bytes) -> AESGCM:
        return AESGCM(hmac.digest(secret, b"wallet webhook endpoint secrets v1", hashlib.sha256))

    def seal(self, endpoint_id: str, secret: str) -> bytes:
        nonce = os.urandom(12)
        sealed = self._keys[self._key_id].encrypt(nonce, secret.encode(), endpoint_id.encode())
        return self._key_id.encode() + b":" + nonce + sealed

    def open(self, endpoint_id: str, blob: bytes) -> str:
        key_id, _, rest = bytes(blob).partition(b":")
        box = self._keys.get(key_id.decode())
        if box is None:
            raise LookupError(f"webhook secret sealed with unknown ledger key id {key_id!r}")
        try:
            return box.decrypt(rest[:12], rest[12:], endpoint_id.encode()).decode()
        except InvalidTag:
            raise LookupError("webhook secret does not open with its ledger key") from None


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()


_COLUMNS = """id, endpoint_id, client_id, url, event_types, description, enabled, disabled_reason,
    created_at, updated_at"""


def endpoint_json(row: Any, secret: str | None = None) -> dict[str, Any]:
    data = {
        "id": row.endpoint_id,
        "url": row.url,
        "clientId": row.client_id,
        "eventTypes": list(row.event_types) if row.event_types is not None else None,
        "description": row.description,
        "enabled": row.enabled,
        "disabledReason": row.disabled_reason,
        "createdAt": iso(row.created_at),
    }
    if secret is not None:
        data["secret"] = secret
    return data


def _owned(alias: str = "") -> str:
    """The endpoint asked for, if the caller owns it (owner None: the admin owns every one)."""
    return (
        f"{alias}endpoint_id = :endpoint_id AND (CAST(:owner AS text) IS NULL OR {alias}client_id = :owner)"
    )


_OWNED = _owned()
_CREATE = text(f"""
INSERT INTO webhook_endpoints (endpoint_id, client_id, url, event_types, description, secret)
SELECT :endpoint_id, CAST(:client_id AS text), :url, CAST(:event_types AS text[]), :description, :secret
WHERE CAST(:client_id AS text) IS NULL OR EXISTS (SELECT 1 FROM clients WHERE client_id = :client_id)
RETURNING {_COLUMNS}
""")
# Newest first, keyset-paged by id: webhook_endpoints_client_page or webhook_endpoints_page.
_LIST = {
    client: text(f"""
SELECT {_COLUMNS} FROM webhook_endpoints
WHERE {"client_id = :client_id AND " if client else ""}(CAST(:key AS bigint) IS NULL OR id < :key)
ORDER BY id DESC LIMIT :limit
""")
    for client in (False, True)
}
_GET = text(f"SELECT {_COLUMNS} FROM webhook_endpoints WHERE {_OWNED}")
_DELETE = text(f"DELETE FROM webhook_endpoints WHERE {_OWNED} RETURNING endpoint_id")
_ENABLE = text(f"""
UPDATE webhook_endpoints
SET enabled = :enabled, disabled_reason = CASE WHEN :enabled THEN NULL ELSE 'disabled by a user' END,
    failing_since = CASE WHEN :enabled THEN NULL ELSE failing_since END, updated_at = now()
WHERE {_OWNED}
RETURNING {_COLUMNS}
""")
_ROTATE = text(f"""
UPDATE webhook_endpoints
SET previous_secret = secret, previous_until = now() + make_interval(secs => :overlap),
    secret = :secret, updated_at = now()
WHERE {_OWNED}
RETURNING {_COLUMNS}
""")
_REPLAY_EVENT = text(f"""
INSERT INTO webhook_deliveries (client_id, endpoint_id, event_no)
SELECT e.client_id, w.endpoint_id, e.id
FROM webhook_endpoints w JOIN events e ON e.event_id = :event_id
    AND (w.client_id IS NULL OR w.client_id = e.client_id)
    AND (w.event_types IS NULL OR e.type = ANY (w.event_types))
WHERE {_owned("w.")}
RETURNING id
""")
_REPLAY_FAILED = text(f"""
INSERT INTO webhook_deliveries (client_id, endpoint_id, event_no)
SELECT DISTINCT d.client_id, d.endpoint_id, d.event_no
FROM webhook_endpoints w JOIN webhook_deliveries d ON d.endpoint_id = w.endpoint_id
WHERE {_owned("w.")} AND d.status = 'FAILED' AND d.updated_at >= :since
  AND NOT EXISTS (
      SELECT 1 FROM webhook_deliveries later
      WHERE later.endpoint_id = d.endpoint_id AND later.client_id = d.client_id
        AND later.event_no = d.event_no AND later.status <> 'FAILED')
RETURNING id
""")
_ATTEMPTS = text("""
SELECT id, delivery_id, event_id, attempted_at, status_code, latency_ms, error, response_body
FROM webhook_attempts
WHERE endpoint_id = :endpoint_id AND (CAST(:key AS bigint) IS NULL OR id < :key)
ORDER BY id DESC LIMIT :limit
""")


def _attempt_json(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "deliveryId": row.delivery_id,
        "eventId": row.event_id,
        "attemptedAt": iso(row.attempted_at),
        "statusCode": row.status_code,
        "latencyMs": row.latency_ms,
        "error": row.error,
        "responseBody": row.response_body,
    }


Page = tuple[list[dict[str, Any]], int | None]


def _paged(items: list[dict[str, Any]], rows: Sequence[Any], limit: int) -> Page:
    """A page of `limit` from `limit + 1` rows fetched, and the key after it (None: the last)."""
    return items[:limit], (rows[limit - 1].id if len(rows) > limit else None)


def _not_found() -> NotFound:
    return NotFound("Webhook endpoint not found", code="WEBHOOK_ENDPOINT_NOT_FOUND")


class Webhooks:
    def __init__(self, engine: AsyncEngine, box: SecretBox, *, allow_private: bool) -> None:
        self.single = engine.execution_options(isolation_level="AUTOCOMMIT")
        self.box = box
        self.allow_private = allow_private

    async def create(
        self, client_id: str | None, url: str, event_types: list[str] | None, description: str | None
    ) -> dict[str, Any]:
        """The secret is in this answer only."""
        await ssrf.validate_registration(url, allow_private=self.allow_private)
        endpoint_id = f"we_{secrets.token_hex(12)}"
        secret = new_secret()
        params = {
            "endpoint_id": endpoint_id,
            "client_id": client_id,
            "url": url,
            "event_types": sorted(set(event_types)) if event_types else None,
            "description": description,
            "secret": self.box.seal(endpoint_id, secret),
        }
        async with self.single.connect() as conn:
            row = (await conn.execute(_CREATE, params)).first()
        if row is None:
            raise ClientNotFound(f"Client {client_id} not found")
        return endpoint_json(row, secret)

    async def page(self, client_id: str | None, limit: int, key: int | None) -> Page:
        """One client's endpoints, or (None) every endpoint, global ones included."""
        params = {"client_id": client_id, "key": key, "limit": limit + 1}
        async with self.single.connect() as conn:
            rows = (await conn.execute(_LIST[client_id is not None], params)).all()
        return _paged([endpoint_json(r) for r in rows], rows, limit)

    async def get(self, endpoint_id: str, owner: str | None) -> dict[str, Any]:
        async with self.single.connect() as conn:
            row = (await conn.execute(_GET, {"endpoint_id": endpoint_id, "owner": owner})).first()
        if row is None:
            raise _not_found()
        return endpoint_json(row)

    async def delete(self, endpoint_id: str, owner: str | None) -> None:
        async with self.single.connect() as conn:
            if (await conn.execute(_DELETE, {"endpoint_id": endpoint_id, "owner": owner})).first() is None:
                raise _not_found()

    async def set_enabled(self, endpoint_id: str, owner: str | None, enabled: bool) -> dict[str, Any]:
        params = {"endpoint_id": endpoint_id, "owner": owner, "enabled": enabled}
        async with self.single.connect() as conn:
            row = (await conn.execute(_ENABLE, params)).first()
        if row is None:
            raise _not_found()
        return endpoint_json(row)

    async def rotate(self, endpoint_id: str, owner: str | None) -> dict[str, Any]:
        secret = new_secret()
        params = {
            "endpoint_id": endpoint_id,
            "owner": owner,
            "secret": self.box.seal(endpoint_id, secret),
            "overlap": ROTATION_OVERLAP.total_seconds(),
        }
        async with self.single.connect() as conn:
            row = (await conn.execute(_ROTATE, params)).first()
        if row is None:
            raise _not_found()
        return endpoint_json(row, secret)

    async def replay(
        self, endpoint_id: str, owner: str | None, *, event_id: str | None, since: datetime | None
    ) -> int:
        """New deliveries (due now) of one event, or of every event whose delivery failed since
        `since` and was not delivered or retried after."""
        current = await self.get(endpoint_id, owner)
        if not current["enabled"]:
            raise Conflict("Webhook endpoint is disabled; enable it first", code="WEBHOOK_ENDPOINT_DISABLED")
        params: dict[str, Any] = {"endpoint_id": endpoint_id, "owner": owner}
        async with self.single.connect() as conn:
            if event_id is not None:
                rows = (await conn.execute(_REPLAY_EVENT, {**params, "event_id": event_id})).all()
                if not rows:
                    raise NotFound("Event not found for this endpoint", code="EVENT_NOT_FOUND")
            else:
                rows = (await conn.execute(_REPLAY_FAILED, {**params, "since": since})).all()
        return len(rows)

    async def attempts(self, endpoint_id: str, owner: str | None, limit: int, key: int | None) -> Page:
        """The delivery log, newest first, keyset paged by attempt id."""
        await self.get(endpoint_id, owner)
        params = {"endpoint_id": endpoint_id, "key": key, "limit": limit + 1}
        async with self.single.connect() as conn:
            rows = (await conn.execute(_ATTEMPTS, params)).all()
        return _paged([_attempt_json(r) for r in rows], rows, limit)
