"""Console sessions, CSRF tokens and the login limit.

Sessions live in PostgreSQL (`console_sessions`), not in a signed cookie: logout and revocation
then hold at once on every worker and host, and an expired or stolen cookie can be refused
without a deny-list. The cookie carries a random 256-bit secret; the table only its SHA-256, so
a copy of the table opens no session.

A form's CSRF token is HMAC-SHA256(admin key digest, "csrf" || session secret): bound to the
session, unknown to any other site (the cookie is HttpOnly and SameSite=Strict as well), and it
needs no storage. Login attempts count per client IP with the API's rate limiter
(`ratelimit.SlidingWindow`, keys of their own), in the same store: Redis when REDIS_URL is set,
else PostgreSQL when several workers serve, so the limit holds across workers.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from wallet.auth import digest
from wallet.ratelimit import REDIS_TIMEOUT_SECONDS, SlidingWindow

log = structlog.get_logger(__name__)

COOKIE = "wallet_console"

_CREATE = text("""
INSERT INTO console_sessions (id_hash, expires_at) VALUES (:id_hash, now() + :ttl)
RETURNING expires_at
""")
_PURGE = text("DELETE FROM console_sessions WHERE expires_at < now() - interval '1 day'")
_FIND = text("""
SELECT created_at, expires_at FROM console_sessions
WHERE id_hash = :id_hash AND revoked_at IS NULL AND expires_at > now()
""")
_REVOKE = text(
    "UPDATE console_sessions SET revoked_at = now() WHERE id_hash = :id_hash AND revoked_at IS NULL"
)


@dataclass(frozen=True, slots=True)
class Session:
    secret: str
    created_at: datetime
    expires_at: datetime


class Sessions:
    def __init__(
        self,
        engine: AsyncEngine,
        *,
        admin_key_digest: bytes,
        ttl_hours: float,
        login_limit: SlidingWindow | None,
    ) -> None:
        self.single = engine.execution_options(isolation_level="AUTOCOMMIT")
        self.admin_key_digest = admin_key_digest
        self.ttl = timedelta(hours=ttl_hours)
        self.login_limit = login_limit

    async def login_allowed(self, ip: str) -> bool:
        """Counts this attempt; False past the limit. A store that fails or does not answer in
        time lets the attempt through, loudly, as the API's limit does: the admin key is what
        keeps the console shut, and an operator must be able to log in while Redis is down."""
        if self.login_limit is None:
            return True
        try:
            async with asyncio.timeout(REDIS_TIMEOUT_SECONDS):
                return (await self.login_limit.hit(f"console-login:{ip}")).allowed
        except Exception as exc:
            log.error("login limiter unavailable; attempt allowed", error=str(exc) or type(exc).__name__)
            return True

    def key_matches(self, key: str) -> bool:
        return hmac.compare_digest(digest(key.strip()), self.admin_key_digest)

    async def open(self) -> Session:
        secret = secrets.token_urlsafe(32)
        async with self.single.connect() as conn:
            await conn.execute(_PURGE)
            expires = (await conn.execute(_CREATE, {"id_hash": digest(secret), "ttl": self.ttl})).scalar_one()
        return Session(secret, expires - self.ttl, expires)

    async def find(self, secret: str | None) -> Session | None:
        if not secret or len(secret) > 128:
            return None
        async with self.single.connect() as conn:
            row = (await conn.execute(_FIND, {"id_hash": digest(secret)})).first()
        return None if row is None else Session(secret, row.created_at, row.expires_at)

    async def close(self, secret: str) -> None:
        async with self.single.connect() as conn:
            await conn.execute(_REVOKE, {"id_hash": digest(secret)})

    def csrf_token(self, session: Session) -> str:
        return hmac.new(self.admin_key_digest, b"csrf|" + session.secret.encode(), hashlib.sha256).hexdigest()

    def csrf_ok(self, session: Session, sent: object) -> bool:
        return isinstance(sent, str) and hmac.compare_digest(self.csrf_token(session), sent)
