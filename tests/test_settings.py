"""Configuration is checked once, at start, and unsafe production settings are refused."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
from pydantic import ValidationError

from wallet.settings import ClientAuth, Settings

STRONG = "k" * 32
PROVIDER = "https://provider.example/fulfillments"


def settings(**values: Any) -> Settings:
    return Settings(_env_file=None, **values)


@pytest.mark.parametrize(
    ("values", "variable"),
    [
        ({"fulfillment_api_url": PROVIDER}, "ADMIN_API_KEY"),
        ({"admin_api_key": "short", "fulfillment_api_url": PROVIDER}, "ADMIN_API_KEY"),
        # Keys no Authorization header can carry as written: they would never match.
        ({"admin_api_key": "ключ-админа-" + STRONG, "fulfillment_api_url": PROVIDER}, "ADMIN_API_KEY"),
        ({"admin_api_key": f" {STRONG}", "fulfillment_api_url": PROVIDER}, "ADMIN_API_KEY"),
        ({"admin_api_key": f"{STRONG[:16]} {STRONG[16:]}", "fulfillment_api_url": PROVIDER}, "ADMIN_API_KEY"),
        ({"admin_api_key": STRONG}, "FULFILLMENT_API_URL"),
        ({"admin_api_key": STRONG, "fulfillment_api_url": PROVIDER, "simulator": True}, "SIMULATOR"),
        ({"admin_api_key": STRONG, "fulfillment_api_url": PROVIDER}, "LEDGER_KEY"),
        ({"admin_api_key": STRONG, "fulfillment_api_url": PROVIDER, "ledger_key": "short"}, "LEDGER_KEY"),
    ],
)
def test_production_refuses_unsafe_settings(values: dict[str, Any], variable: str) -> None:
    with pytest.raises(ValidationError, match=variable):
        settings(app_env="production", **values)


def test_production_defaults() -> None:
    prod = settings(
        app_env="production", admin_api_key=STRONG, fulfillment_api_url=PROVIDER, ledger_key=STRONG
    )
    assert prod.client_auth_mode is ClientAuth.API_KEY
    assert prod.worker_count == (os.cpu_count() or 1)
    assert prod.log_renderer == "json"
    dev = settings()
    assert dev.client_auth_mode is ClientAuth.HEADER
    assert dev.worker_count == 1
    assert dev.log_renderer == "console"
    generated = dev.admin_key
    assert len(generated) >= 32
    assert dev.admin_key == generated  # generated once per run, then stable


@pytest.mark.parametrize(
    "values",
    [
        {"port": 70000},
        {"rate_limit": "lots"},
        {"rate_limit": "0/minute"},  # every request refused
        {"rate_limit": "5/0 minute"},  # `limits` reads it as 5 a minute
        {"rate_limit": "5/minute;10/hour"},  # one limit only: the rest would be dropped
        {"console_login_rate": "0/minute"},
        {"database_url": "mysql://localhost/db"},
        {"fulfillment_api_url": "ftp://x"},
        {"fulfillment_max_attempts": 0},
        {"fulfillment_timeout_seconds": -1},
        {"db_lock_timeout_seconds": 0},
        {"trusted_proxies": "not-an-ip"},
        {"idempotency_ttl_hours": 1},
        {"app_env": "staging"},
        {"ledger_key_id": "has:colon"},
        {"ledger_old_keys": "no-separator"},
        {"ledger_old_keys": "k0:one,k0:two"},
        {"ledger_key_id": "k0", "ledger_old_keys": "k0:the-current-id"},
        {"ledger_key": "short"},
        {"console_login_rate": "many"},
        {"console_session_hours": 0},
        {"console_session_hours": 24 * 8},
        {"db_pooler": "session"},
        {"database_url": "postgresql://primary/db", "database_read_url": "mysql://replica/db"},
        {"database_url": "postgresql://primary/db", "database_listen_url": "redis://primary"},
        {"database_url": None, "database_listen_url": "postgresql://primary/db"},
        {"api_key_cache_size": -1},
        {"database_url": "postgresql://"},  # no database: libpq would take the OS user's
        {"database_url": "postgresql://postgres@127.0.0.1:5432/"},
        {"database_url": "postgresql://primary/db", "database_read_url": "postgresql://replica"},
        {"redis_url": "notaurl"},  # redis-py would read it as localhost, database 0
        {"idempotency_ttl_hours": "inf"},  # every keyed request failed on the interval
        {"fulfillment_timeout_seconds": "nan"},
        {"db_lock_timeout_seconds": 0.0001},  # 0 ms to PostgreSQL: no deadline at all
    ],
)
def test_invalid_values_are_refused(values: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        settings(**values)


def test_lists_and_limits_parse() -> None:
    parsed = settings(trusted_proxies="10.0.0.0/8, 127.0.0.1", rate_limit="30/minute")
    assert [str(n) for n in parsed.trusted_proxies] == ["10.0.0.0/8", "127.0.0.1/32"]
    item = parsed.rate_limit_item
    assert item is not None
    assert item.amount == 30
    assert settings(rate_limit="off").rate_limit_item is None
    login = settings(console_login_rate="5/minute").console_login_item
    assert login is not None
    assert login.amount == 5
    assert settings(console_login_rate="off").console_login_item is None


def test_ledger_keys_rotate_by_id(tmp_path: Any) -> None:
    rotated = settings(
        ledger_key="new-key-0123456789", ledger_key_id="k2", ledger_old_keys="k0:oldest-key, k1:old-key"
    )
    key = rotated.chain_key
    assert key.key_id == "k2"
    assert key.secret_for("k2") == b"new-key-0123456789"
    assert key.secret_for("k1") == b"old-key"
    assert key.secret_for("k0") == b"oldest-key"
    assert key.secret_for("k3") is None
    assert "old-key" not in repr(rotated)


def test_development_ledger_key_is_generated_once_beside_data_dir(tmp_path: Any) -> None:
    data_dir = tmp_path / "data"
    first = settings(data_dir=data_dir).chain_key
    key_file = tmp_path / "data.ledger-key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert not data_dir.exists()  # initdb wants it empty; backups of it must not carry the key
    assert len(first.secret) >= 32
    assert settings(data_dir=data_dir).chain_key.secret == first.secret


def test_connections_per_host_count_every_pool() -> None:
    """What `wallet serve` logs at start (README: Sizing)."""
    direct = settings(workers=4, db_pool_size=10, database_url="postgresql://primary/db")
    replicated = settings(
        workers=4, db_pool_size=10, database_url="postgresql://p/db", database_read_url="postgresql://r/db"
    )
    assert direct.connections_per_host == 40
    assert replicated.connections_per_host == 80


DIRECT = "postgresql://primary/db"


@pytest.mark.parametrize(
    ("values", "listen_url"),
    [
        ({"client_auth": "header"}, None),  # no keys to check
        ({"client_auth": "api_key"}, "postgresql://pooler/db"),
        ({"client_auth": "api_key", "database_listen_url": DIRECT}, DIRECT),
        ({"client_auth": "api_key", "api_key_cache_size": 0}, None),
        ({"client_auth": "api_key", "db_pooler": "transaction"}, None),  # LISTEN needs a session
        ({"client_auth": "api_key", "db_pooler": "transaction", "database_listen_url": DIRECT}, DIRECT),
    ],
)
def test_api_keys_are_cached_only_where_their_changes_can_be_heard(
    values: dict[str, Any], listen_url: str | None
) -> None:
    """Each process that caches keys holds one listening session: counted in the sizing line."""
    s = settings(
        database_url="postgresql://pooler/db",
        **{"db_pooler": "none", "database_listen_url": None, **values},
        workers=2,
        db_pool_size=10,
    )
    assert s.key_cache_listen_url == listen_url
    assert s.connections_per_host == (22 if listen_url else 20)


def test_order_lease_outlasts_the_worst_fulfillment() -> None:
    s = settings(fulfillment_timeout_seconds=5, fulfillment_max_attempts=3, fulfillment_backoff_seconds=0.5)
    worst = 3 * 5 + (0.5 + 1.0) * 1.5
    assert s.order_lease_seconds > worst


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"PORT": "seventy"}, "PORT"),
        ({"APP_ENV": "production", "FULFILLMENT_API_URL": PROVIDER}, "ADMIN_API_KEY"),
        ({"RATE_LIMIT": "fast"}, "RATE_LIMIT"),
        ({"DB_POOLER": "statement"}, "DB_POOLER"),
        ({"DATABASE_READ_URL": "postgresql://replica/db"}, "DATABASE_READ_URL"),
        (
            {"APP_ENV": "production", "FULFILLMENT_API_URL": PROVIDER, "ADMIN_API_KEY": STRONG},
            "LEDGER_KEY",
        ),
    ],
)
def test_serve_stops_with_one_line_naming_the_variable(
    env: dict[str, str], variable: str, tmp_path: Any
) -> None:
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "REDIS_URL", "LEDGER_"))
    }
    result = subprocess.run(
        [sys.executable, "-m", "wallet.cli", "serve"],
        env={**clean, **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("wallet: invalid configuration: ")
    assert variable in lines[0]
