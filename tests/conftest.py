"""Real parts only: a real PostgreSQL (DATABASE_URL, or an embedded server when unset), a fresh
database per test cloned from a migrated template, and real HTTP servers on loopback. With
DB_POOLER=transaction (CI's third leg), the service reaches each test's database through a
PgBouncer in transaction mode that the tests start (tests/servers.py)."""

from __future__ import annotations

import asyncio
import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from tests.builders import Commits, Provider, start_provider, watch_commits
from tests.servers import pgbouncer, with_server
from wallet.database import embedded_postgres, migrate_url, plain_url


def _with_database(url: str, name: str) -> str:
    return make_url(plain_url(url)).set(database=name).render_as_string(hide_password=False)


def _asyncpg_dsn(url: str) -> str:
    """asyncpg reads the socket directory from `host=` in the query, like libpq."""
    return plain_url(url)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    configured = os.environ.get("DATABASE_URL")
    if configured:
        yield configured
        return
    with (
        tempfile.TemporaryDirectory(prefix="wallet-test-pg-") as data_dir,
        embedded_postgres(Path(data_dir) / "pgdata") as url,
    ):
        yield url


async def _admin(url: str, *statements: str) -> None:
    conn = await asyncpg.connect(_asyncpg_dsn(url))
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def template_database(postgres_url: str) -> Iterator[str]:
    """Migrated once per run; every test's database is a copy of it."""
    name = f"wallet_tpl_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(postgres_url, f'CREATE DATABASE "{name}"'))
    asyncio.run(migrate_url(_with_database(postgres_url, name)))
    yield name
    asyncio.run(_admin(postgres_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def pooler_url(postgres_url: str) -> Iterator[str | None]:
    """With DB_POOLER=transaction: a PgBouncer in transaction mode in front of the tests' server,
    with fewer server connections (4) than a service has clients, so transactions move between
    server connections as they do in production."""
    if os.environ.get("DB_POOLER") != "transaction":
        yield None
        return
    with pgbouncer(postgres_url, pool_size=4) as url:
        yield url


@pytest.fixture
async def database_url(
    postgres_url: str, template_database: str, pooler_url: str | None
) -> AsyncIterator[str]:
    name = f"wallet_test_{uuid.uuid4().hex[:12]}"
    await _admin(
        postgres_url,
        f'CREATE DATABASE "{name}" TEMPLATE "{template_database}" STRATEGY FILE_COPY',
    )
    if pooler_url is None:
        yield _with_database(postgres_url, name)
    else:
        parsed = make_url(pooler_url)
        assert parsed.host is not None
        assert parsed.port is not None
        yield with_server(postgres_url, parsed.host, parsed.port, name)
    await _admin(postgres_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def direct_database_url(database_url: str, postgres_url: str) -> str:
    """This test's database on PostgreSQL itself, even with DB_POOLER set (where `database_url`
    goes through PgBouncer): for sessions of its own, such as LISTEN."""
    name = make_url(database_url).database
    assert name is not None
    return _with_database(postgres_url, name)


@pytest.fixture
async def commits(direct_database_url: str) -> AsyncIterator[Commits]:
    """The commits to this test's database, heard from PostgreSQL itself (with DB_POOLER set, the
    service goes through PgBouncer, but LISTEN needs a session of its own)."""
    async with watch_commits(direct_database_url) as watching:
        yield watching


@pytest.fixture
async def provider() -> AsyncIterator[Provider]:
    async with start_provider() as running:
        yield running


@pytest.fixture
def redis_url() -> str | None:
    return os.environ.get("REDIS_URL")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep each phase's report on the test, so fixtures can tell whether it failed (the browser
    tests save screenshots then)."""
    report: pytest.TestReport = yield
    setattr(item, f"rep_{report.when}", report)
    return report
