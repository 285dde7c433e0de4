"""All configuration, read once from the environment (and `.env`), refused early when unsafe."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import secrets
import tempfile
from enum import StrEnum
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from limits import RateLimitItem, parse, parse_many
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from wallet.chain import KEY_ID_PATTERN, LedgerKey
from wallet.database import Pooler

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_ZERO_PERIOD = re.compile(r"(/|per)\s*0+\s*[a-z]", re.IGNORECASE)  # '5/0 minute'
_TOKEN = re.compile(r"[\x21-\x7e]+")  # a header value with no space: what a bearer token can be


class AppEnv(StrEnum):
    DEVELOPMENT = "development"
    PRODUCTION = "production"


class OnUnknown(StrEnum):
    HOLD = "hold"  # keep the money held until the provider's answer is known (the default)
    REFUND = "refund"  # for providers that guarantee an unanswered request was not carried out


class ClientAuth(StrEnum):
    HEADER = "header"
    API_KEY = "api_key"


class Settings(BaseSettings):
    # inf and nan are never a setting: IDEMPOTENCY_TTL_HOURS=inf started, then every keyed request failed
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", frozen=True, allow_inf_nan=False)

    app_env: AppEnv = AppEnv.DEVELOPMENT
    database_url: str | None = None
    # A replica for reads that may lag: history pages, statements, admin reads (README: which go where).
    database_read_url: str | None = None
    # `transaction` when DATABASE_URL (and DATABASE_READ_URL) is a transaction-pooling PgBouncer.
    db_pooler: Pooler = Pooler.NONE
    # A session on the primary for LISTEN (the API-key cache's invalidations): PostgreSQL itself or
    # a session-pooling PgBouncer. Unset: DATABASE_URL, except behind a transaction pooler.
    database_listen_url: str | None = None
    data_dir: Path = Path("./.wallet-data")
    host: str = "127.0.0.1"
    port: int = Field(3000, ge=0, le=65535)
    workers: int | None = Field(None, ge=1, le=64)

    admin_api_key: str | None = None
    client_auth: ClientAuth | None = None
    api_key_cache_size: int = Field(10_000, ge=0, le=1_000_000)  # verified keys per process; 0: none

    # The ledger chain's HMAC key (SPEC §6), never stored in the database. Rotation: a new
    # LEDGER_KEY under a new LEDGER_KEY_ID, the previous one moved to LEDGER_OLD_KEYS
    # ("id:key,id:key") so the entries it signed still verify.
    ledger_key: str | None = Field(None, repr=False)
    ledger_key_id: str = Field("k1", pattern=KEY_ID_PATTERN)
    ledger_old_keys: Annotated[tuple[tuple[str, str], ...], NoDecode] = Field((), repr=False)

    fulfillment_api_url: str | None = None
    fulfillment_timeout_seconds: float = Field(5.0, gt=0, le=120)
    fulfillment_max_attempts: int = Field(3, ge=1, le=10)
    fulfillment_backoff_seconds: float = Field(0.5, ge=0, le=60)
    fulfillment_retry_max_seconds: float = Field(300.0, gt=0, le=86400)
    fulfillment_resolve_hours: float = Field(24.0, gt=0, le=24 * 365)
    fulfillment_on_unknown: OnUnknown = OnUnknown.HOLD
    fulfillment_status_url: str | None = None

    rate_limit: str = "100/minute"
    redis_url: str | None = None
    trusted_proxies: Annotated[tuple[IpNetwork, ...], NoDecode] = ()

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "console"] | None = None

    simulator: bool = False  # mount the built-in fulfillment simulator (development only)

    max_body_bytes: int = Field(64 * 1024, ge=1024, le=10 * 1024 * 1024)
    db_pool_size: int = Field(20, ge=1, le=200)  # per worker, and again for the replica if any
    # How long a statement of the service waits for a row or table lock another session holds
    # before PostgreSQL gives up on it: the request is answered 503 and nothing it was to do
    # happened. Without it, one wallet row held by a stuck session would stall every batch of
    # orders that includes it, and with them every order of that worker.
    db_lock_timeout_seconds: float = Field(5.0, ge=0.001, le=600)  # PostgreSQL counts milliseconds; 0 is none
    recovery_interval_seconds: float = Field(5.0, gt=0, le=3600)
    idempotency_ttl_hours: float = Field(24.0, ge=24)

    # The operator console (/console): how long a login lasts, and login attempts per client IP
    # (counted in REDIS_URL's store when set, so every worker and host shares the count).
    console_session_hours: float = Field(8.0, gt=0, le=24 * 7)
    console_login_rate: str = "10/minute"

    event_retention_days: int = Field(30, ge=1, le=3650)
    # http and loopback/private endpoint addresses: unset means allowed in development only.
    webhook_allow_private: bool | None = None
    # Seconds before each retry after a failed delivery attempt (Standard Webhooks-like, ~3 days).
    webhook_retry_schedule: Annotated[tuple[float, ...], NoDecode] = (
        5,
        300,
        1800,
        7200,
        18000,
        36000,
        36000,
        86400,
        86400,
    )
    webhook_timeout_seconds: float = Field(15.0, gt=0, le=60)
    webhook_interval_seconds: float = Field(1.0, gt=0, le=3600)

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _split_proxies(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(ipaddress.ip_network(p.strip(), strict=False) for p in value.split(",") if p.strip())
        return value

    @field_validator("webhook_retry_schedule", mode="before")
    @classmethod
    def _split_schedule(cls, value: object) -> object:
        if isinstance(value, str):
            try:
                delays = tuple(float(p) for p in value.replace(",", " ").split())
            except ValueError:
                raise ValueError("must be seconds separated by commas, e.g. 5,300,1800") from None
            value = delays
        if isinstance(value, tuple | list) and (
            not value or len(value) > 50 or any(not 0 <= d <= 7 * 86400 for d in value)
        ):
            raise ValueError("must be 1-50 delays of 0 to 604800 seconds")
        return value

    @field_validator("ledger_old_keys", mode="before")
    @classmethod
    def _split_old_keys(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        pairs = []
        for item in (p.strip() for p in value.split(",")):
            key_id, sep, secret = item.partition(":")
            if not item:
                continue
            if not sep or not secret or not re.fullmatch(KEY_ID_PATTERN, key_id):
                raise ValueError("must be id:key pairs separated by commas (ids: 1-32 of A-Z a-z 0-9 _ . -)")
            pairs.append((key_id, secret))
        return tuple(pairs)

    @field_validator("database_url", "database_read_url", "database_listen_url")
    @classmethod
    def _postgres_only(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(
            ("postgresql://", "postgres://", "postgresql+asyncpg://")
        ):
            raise ValueError("must be a postgresql:// URL")
        if value is not None and not urlsplit(value).path.strip("/"):
            # libpq would pick the OS user's database: the service would migrate whatever that is
            raise ValueError("must name its database: postgresql://user@host:5432/dbname")
        return value or None

    @field_validator("redis_url")
    @classmethod
    def _redis_only(cls, value: str | None) -> str | None:
        if value and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return value or None

    @field_validator("rate_limit", "console_login_rate")
    @classmethod
    def _parse_rate_limit(cls, value: str) -> str:
        """One limit of at least one request per period: `limits` would take '0/minute' (every
        request refused), read '5/0 minute' as 5 a minute and keep only the first of several."""
        if value.strip().lower() != "off":
            try:
                items = parse_many(value)
            except ValueError as exc:
                raise ValueError("must look like '100/minute' or be 'off'") from exc
            if len(items) != 1 or items[0].amount < 1 or _ZERO_PERIOD.search(value):
                raise ValueError("must be one limit of at least 1 request per period, like '100/minute'")
        return value.strip()

    @model_validator(mode="after")
    def _safe_for_production(self) -> Settings:
        if self.admin_api_key is not None and not _TOKEN.fullmatch(self.admin_api_key):
            # Sent as `Authorization: Bearer <key>`: a space or a non-ASCII letter never arrives as written
            raise ValueError("ADMIN_API_KEY: must be printable ASCII without spaces")
        if self.app_env is AppEnv.PRODUCTION:
            if not self.admin_api_key or len(self.admin_api_key) < 32:
                raise ValueError("ADMIN_API_KEY: production requires a key of at least 32 characters")
            if not self.fulfillment_api_url:
                raise ValueError("FULFILLMENT_API_URL: production requires the provider's endpoint")
            if self.simulator:
                raise ValueError("SIMULATOR: the built-in fulfillment simulator is development-only")
            if not self.ledger_key or len(self.ledger_key) < 32:
                raise ValueError("LEDGER_KEY: production requires a key of at least 32 characters")
        elif self.admin_api_key is not None and len(self.admin_api_key) < 8:
            raise ValueError("ADMIN_API_KEY: must be at least 8 characters")
        if self.ledger_key is not None and len(self.ledger_key) < 8:
            raise ValueError("LEDGER_KEY: must be at least 8 characters")
        old_ids = [key_id for key_id, _ in self.ledger_old_keys]
        if len(set(old_ids)) != len(old_ids) or self.ledger_key_id in old_ids:
            raise ValueError("LEDGER_OLD_KEYS: each key id once, and not LEDGER_KEY_ID's")
        if self.database_read_url and not self.database_url:
            raise ValueError("DATABASE_READ_URL: needs DATABASE_URL (the embedded server has no replica)")
        if self.database_listen_url and not self.database_url:
            raise ValueError("DATABASE_LISTEN_URL: needs DATABASE_URL (the embedded server needs none)")
        for name, url in (
            ("FULFILLMENT_API_URL", self.fulfillment_api_url),
            ("FULFILLMENT_STATUS_URL", self.fulfillment_status_url),
        ):
            if url and not url.startswith(("http://", "https://")):
                raise ValueError(f"{name}: must be an http(s) URL")
        return self

    @property
    def connections_per_host(self) -> int:
        """The most database connections one `wallet serve` may open: every worker's pool, its
        replica pool when reads go to a replica, and its key-cache listener (the start-up sizing
        line and the README)."""
        pools = 2 if self.database_read_url else 1
        return self.worker_count * (self.db_pool_size * pools + self.listeners_per_worker)

    @property
    def key_cache_listen_url(self) -> str | None:
        """Where each process LISTENs for API-key changes, or None when keys are not cached: the
        cache is only as good as its invalidations, and LISTEN needs a session of its own, which
        a transaction-pooling PgBouncer does not keep (then only DATABASE_LISTEN_URL will do)."""
        if self.client_auth_mode is not ClientAuth.API_KEY or self.api_key_cache_size == 0:
            return None
        if self.database_listen_url:
            return self.database_listen_url
        return None if self.db_pooler is Pooler.TRANSACTION else self.database_url

    @property
    def listeners_per_worker(self) -> int:
        return 1 if self.key_cache_listen_url else 0

    @property
    def production(self) -> bool:
        return self.app_env is AppEnv.PRODUCTION

    @cached_property
    def admin_key(self) -> str:
        """The configured key, or a random one for this development run (printed at start)."""
        return self.admin_api_key or secrets.token_urlsafe(24)

    @cached_property
    def chain_key(self) -> LedgerKey:
        """The ledger's HMAC keys. In development without LEDGER_KEY: a key generated once into
        the file `<DATA_DIR>.ledger-key` (beside the data directory, not in it: initdb wants an
        empty directory, and a copy of the database files must not carry the key)."""
        secret = self.ledger_key or _development_ledger_key(self.data_dir)
        old = {key_id: key.encode() for key_id, key in self.ledger_old_keys}
        return LedgerKey(self.ledger_key_id, secret.encode(), old)

    @property
    def client_auth_mode(self) -> ClientAuth:
        if self.client_auth is not None:
            return self.client_auth
        return ClientAuth.API_KEY if self.production else ClientAuth.HEADER

    @property
    def worker_count(self) -> int:
        if self.workers is not None:
            return self.workers
        return (os.cpu_count() or 1) if self.production else 1

    @property
    def log_renderer(self) -> Literal["json", "console"]:
        return self.log_format or ("json" if self.production else "console")

    @property
    def rate_limit_item(self) -> RateLimitItem | None:
        return None if self.rate_limit.lower() == "off" else parse(self.rate_limit)

    @property
    def console_login_item(self) -> RateLimitItem | None:
        return None if self.console_login_rate.lower() == "off" else parse(self.console_login_rate)

    @property
    def webhooks_private_ok(self) -> bool:
        """Whether webhook endpoints may be http and loopback/private (development, tests)."""
        if self.webhook_allow_private is not None:
            return self.webhook_allow_private
        return not self.production

    @property
    def webhook_lease_seconds(self) -> float:
        """How long a claimed delivery belongs to its process: one call timing out, with a
        margin. A process killed mid-call leaves it due again after this (same webhook-id)."""
        return float(1.5 * self.webhook_timeout_seconds + 2.0)

    @property
    def order_lease_seconds(self) -> float:
        """How long the request that placed an order owns it: its worst case (every attempt
        timing out, every back-off at its longest jitter) with a margin. Only after that may the
        resolver in any process call the provider for it."""
        attempts = self.fulfillment_max_attempts
        backoff = sum(self.fulfillment_backoff_seconds * 2**i * 1.5 for i in range(attempts - 1))
        return float(1.2 * (attempts * self.fulfillment_timeout_seconds + backoff) + 2.0)

    @property
    def resolver_lease_seconds(self) -> float:
        """How long a resolver owns an order it claimed: a status lookup and a POST, each
        timing out, with a margin. A resolver that died is replaced after this."""
        return float(1.2 * 2 * self.fulfillment_timeout_seconds + 2.0)


def development_ledger_key_path(data_dir: Path) -> Path:
    path = data_dir.expanduser().resolve()
    return path.with_name(path.name + ".ledger-key")


def _development_ledger_key(data_dir: Path) -> str:
    """Read the development key file, creating it (mode 0600) first if it does not exist. Several
    processes may start together: the file appears whole (link of a finished temporary file) and
    the first one wins."""
    path = development_ledger_key_path(data_dir)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".ledger-key-")  # mkstemp: mode 0600
        try:
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_urlsafe(32) + "\n")
            with contextlib.suppress(FileExistsError):  # another process was first: use its key
                os.link(tmp, path)
        finally:
            os.unlink(tmp)
    return path.read_text().strip()
