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
        ({"admin_api_key": STRONG}, "FULFILLMENT_API_URL"),
        ({"admin_api_key": STRONG, "fulfillment_api_url": PROVIDER, "simulator": True}, "SIMULATOR"),
    ],
)
def test_production_refuses_unsafe_settings(values: dict[str, Any], variable: str) -> None:
    with pytest.raises(ValidationError, match=variable):
        settings(app_env="production", **values)


def test_production_defaults() -> None:
    prod = settings(app_env="production", admin_api_key=STRONG, fulfillment_api_url=PROVIDER)
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
        {"database_url": "mysql://localhost/db"},
        {"fulfillment_api_url": "ftp://x"},
        {"fulfillment_max_attempts": 0},
        {"fulfillment_timeout_seconds": -1},
        {"trusted_proxies": "not-an-ip"},
        {"idempotency_ttl_hours": 1},
        {"app_env": "staging"},
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
    ],
)
def test_serve_stops_with_one_line_naming_the_variable(
    env: dict[str, str], variable: str, tmp_path: Any
) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "REDIS_URL"))}
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
