"""Who is calling: the admin (bearer key) or a client (`client-id`, plus its API key when
CLIENT_AUTH=api_key). Secrets are compared as SHA-256 digests in constant time; client keys
are stored only as their digest. A key's owner comes from the process's KeyCache when it is live
and knows the key (keycache.py), from the database otherwise."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from wallet.batching import Batcher
from wallet.database import Statement, direct
from wallet.errors import BadRequest, ClientNotFound, Forbidden, NotFound, Unauthorized
from wallet.events import INSERT_EVENT, time_sql
from wallet.keycache import KeyCache
from wallet.settings import ClientAuth

CLIENT_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"  # the database checks the same (migration 0001)
CLIENT_ID = re.compile(CLIENT_ID_PATTERN)
CLIENT_ID_RULE = "1-64 characters: letters, digits, '_', '.', ':' or '-'"
KEY_PREFIX = "wk_"


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def valid_client_id(value: object, *, field: str = "client-id header") -> str:
    if not isinstance(value, str) or not CLIENT_ID.fullmatch(value):
        raise BadRequest(f"Invalid {field}: {CLIENT_ID_RULE}", code="INVALID_CLIENT_ID")
    return value


def check_admin(token: str | None, admin_key_digest: bytes) -> None:
    """`token`: the credentials of an `Authorization: Bearer` header, None if there is none."""
    if not token:
        raise Unauthorized("Admin authentication required: Authorization: Bearer <ADMIN_API_KEY>")
    if not hmac.compare_digest(digest(token), admin_key_digest):
        raise Forbidden("Invalid admin API key", code="INVALID_API_KEY")


# The keys a cache could not answer for, asked in one query per event-loop pass (batching.py).
_KEY_OWNERS = Statement.of(
    text(
        "SELECT key_hash, client_id FROM api_keys"
        " WHERE key_hash = ANY(CAST(:hashes AS bytea[])) AND revoked_at IS NULL"
    )
)
# Issuing and revoking write their event (never the secret) in the same statement; revoking
# again changes nothing, so it writes nothing. Revoking also tells every process's KeyCache, by
# the NOTIFY of api_keys' trigger (migration 0011), delivered when this transaction commits.
_CREATE_KEY = text(f"""
WITH created AS (
    INSERT INTO api_keys (key_id, client_id, key_hash)
    SELECT :key_id, client_id, :hash FROM clients WHERE client_id = :client_id
    RETURNING key_id, client_id, created_at
), emitted AS (
    {INSERT_EVENT}
    SELECT client_id, 'api_key.created',
           jsonb_build_object('keyId', key_id, 'clientId', client_id, 'createdAt', {time_sql("created_at")}),
           created_at
    FROM created
)
SELECT created_at FROM created
""")
_REVOKE_KEY = text(f"""
WITH revoked AS (
    UPDATE api_keys SET revoked_at = coalesce(revoked_at, now())
    WHERE key_id = :key_id AND client_id = :client_id
    RETURNING key_id, client_id, revoked_at, revoked_at = now() AS newly
), emitted AS (
    {INSERT_EVENT}
    SELECT client_id, 'api_key.revoked',
           jsonb_build_object('keyId', key_id, 'clientId', client_id, 'revokedAt', {time_sql("revoked_at")}),
           revoked_at
    FROM revoked WHERE newly
)
SELECT revoked_at FROM revoked
""")


@dataclass(frozen=True, slots=True)
class IssuedKey:
    key_id: str
    api_key: str
    created_at: datetime


class ClientAuthenticator:
    def __init__(self, engine: AsyncEngine, mode: ClientAuth, cache: KeyCache | None = None) -> None:
        self.engine = engine
        self.mode = mode
        self.cache = cache
        self._lookups = Batcher("api_key", self._owners)

    async def authenticate(self, client_id_header: str | None, token: str | None) -> str:
        """Who asks. With API keys, a request with no key is a 401 whatever else it lacks:
        credentials come before what the request says (its client-id, then its body)."""
        if self.mode is ClientAuth.API_KEY and not token:
            raise Unauthorized("Client authentication required: Authorization: Bearer <API key>")
        if client_id_header is None:
            raise BadRequest("Missing client-id header", code="MISSING_CLIENT_ID")
        client_id = valid_client_id(client_id_header)
        if self.mode is ClientAuth.HEADER:
            return client_id
        assert token is not None
        hashed = digest(token)
        lookup = self._lookups.submit
        owner = await (self.cache.owner(hashed, lookup) if self.cache else lookup(hashed))
        # The lookup is by digest, so timing says nothing about the key (nor does a cache hit:
        # a dict lookup by digest); the owner check is a comparison of public ids.
        if owner != client_id:
            raise Forbidden("API key is not valid for this client", code="INVALID_API_KEY")
        return client_id

    async def _owners(self, key_digests: Sequence[bytes]) -> list[str | None]:
        """For each digest, the client whose valid (unrevoked) key it is, if any."""
        async with direct(self.engine) as conn:
            rows = await conn.fetch(_KEY_OWNERS, {"hashes": list(set(key_digests))})
        owners = {bytes(row["key_hash"]): str(row["client_id"]) for row in rows}
        return [owners.get(key_digest) for key_digest in key_digests]

    async def issue(self, client_id: str) -> IssuedKey:
        key_id = f"key_{secrets.token_hex(8)}"
        api_key = KEY_PREFIX + secrets.token_urlsafe(32)
        params = {"key_id": key_id, "hash": digest(api_key), "client_id": client_id}
        async with self.engine.begin() as conn:
            created = (await conn.execute(_CREATE_KEY, params)).scalar()
        if created is None:
            raise ClientNotFound(f"Client {client_id} not found")
        return IssuedKey(key_id, api_key, created)

    async def revoke(self, client_id: str, key_id: str) -> datetime:
        async with self.engine.begin() as conn:
            revoked = (await conn.execute(_REVOKE_KEY, {"key_id": key_id, "client_id": client_id})).scalar()
        if self.cache is not None:
            # Committed: this process refuses the key from now on, before it hears the change.
            self.cache.clear()
        if not isinstance(revoked, datetime):
            raise NotFound("API key not found", code="API_KEY_NOT_FOUND")
        return revoked
