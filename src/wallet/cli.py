"""`wallet serve | migrate | verify | simulator | openapi | webhooks listen`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import tempfile
from collections.abc import Iterator
from types import FrameType

import structlog
from alembic.util.exc import CommandError
from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError

from wallet.database import (
    Pooler,
    connection_limit,
    create_engine,
    embedded_postgres,
    is_unavailable,
    lock_timeout_setting,
    migrate_url,
)
from wallet.http.protocol import JsonErrorsHttpToolsProtocol
from wallet.logs import configure_logging
from wallet.settings import Settings, development_ledger_key_path


def load_settings() -> Settings:
    """Settings, or one clear line naming the bad variable and exit 2."""
    try:
        return Settings()
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]).upper()
        message = err["msg"].removeprefix("Value error, ")
        line = f"{where}: {message}" if where else message
        print(f"wallet: invalid configuration: {line}", file=sys.stderr)
        raise SystemExit(2) from None


@contextlib.contextmanager
def database(settings: Settings) -> Iterator[str]:
    """The configured DATABASE_URL, or an embedded server for as long as the block runs. A
    database the block cannot reach or enter (refused, unknown, wrong password) stops the command
    with one line naming the variable, as a bad setting does, and exit 1."""
    try:
        if settings.database_url:
            yield settings.database_url
            return
        with embedded_postgres(settings.data_dir) as url:
            print(f"wallet: embedded PostgreSQL under {settings.data_dir}", file=sys.stderr)
            yield url
    except CommandError as exc:  # Alembic: e.g. a database migrated by a newer release
        print(f"wallet: cannot migrate the database (DATABASE_URL): {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except Exception as exc:
        if not is_unavailable(exc):
            raise
        cause = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
        reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        print(f"wallet: cannot use the database (DATABASE_URL): {reason}", file=sys.stderr)
        raise SystemExit(1) from None


def serve(app: str = "wallet.http.app:app_from_env") -> None:
    """`app`: the worker's app factory, as uvicorn imports it (the bench passes a variant)."""
    import uvicorn
    from uvicorn.config import STARTUP_FAILURE

    from wallet import workers as several

    settings = load_settings()
    configure_logging(settings.log_level, settings.log_renderer)
    try:
        several.check_free(settings.host, settings.port)
    except OSError as exc:
        print(f"wallet: cannot listen on HOST:PORT {settings.host}:{settings.port}: {exc}", file=sys.stderr)
        raise SystemExit(STARTUP_FAILURE) from None
    with database(settings) as url, contextlib.ExitStack() as cleanup:
        env = {"DATABASE_URL": url}
        if not settings.admin_api_key:
            env["ADMIN_API_KEY"] = settings.admin_key
            print(f"wallet: development admin key: {settings.admin_key}", file=sys.stderr)
        if not settings.ledger_key:
            settings.chain_key  # noqa: B018 - created now, once, before the workers read it
            path = development_ledger_key_path(settings.data_dir)
            print(f"wallet: development ledger key in {path} (keep it: verify needs it)", file=sys.stderr)
        if not settings.fulfillment_api_url and not settings.production:
            host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host  # noqa: S104
            env["SIMULATOR"] = "true"
            env["FULFILLMENT_API_URL"] = f"http://{host}:{settings.port}/_simulator/fulfillments"
            if not settings.fulfillment_status_url:  # the simulator answers lookups too
                env["FULFILLMENT_STATUS_URL"] = env["FULFILLMENT_API_URL"]
            print("wallet: using the built-in fulfillment simulator", file=sys.stderr)
        workers = settings.worker_count
        if workers > 1 and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
            # Workers are spawned, so they import prometheus_client with this already set and
            # write their samples there; /metrics in any worker sums them all.
            metrics_dir = tempfile.TemporaryDirectory(prefix="wallet-metrics-")
            env["PROMETHEUS_MULTIPROC_DIR"] = cleanup.enter_context(metrics_dir)
        os.environ.update(env)
        settings = load_settings()
        asyncio.run(migrate_url(url, pooler=settings.db_pooler))
        _log_connections(settings, url)
        # uvicorn shuts down gracefully on SIGTERM, then raises the signal again with the
        # previous handler in place. Make that handler an orderly exit, so the `with` above
        # still stops the embedded PostgreSQL instead of the process dying by the signal.
        signal.signal(signal.SIGTERM, _exit_cleanly)
        config = uvicorn.Config(
            app,
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=workers,
            loop="uvloop",
            http=JsonErrorsHttpToolsProtocol,
            lifespan="on",
            log_config=None,
            access_log=False,
            server_header=False,
            # Client IPs come from TRUSTED_PROXIES only (ratelimit.client_ip); uvicorn's own
            # proxy-header handling would believe X-Forwarded-For from any loopback peer.
            proxy_headers=False,
            timeout_graceful_shutdown=int(settings.order_lease_seconds),
        )
        if workers > 1:
            several.run(config)  # each worker on its own socket
            return
        server = uvicorn.Server(config)
        server.run()
        if not server.started:
            raise SystemExit(STARTUP_FAILURE)


def _log_connections(settings: Settings, url: str) -> None:
    """Say at start how many database connections this host may open (every worker's pool, and
    the replica's), what a PgBouncer in front needs for it, and warn when the server accepts
    fewer: production runs CPU-count workers, and under load requests would then fail."""
    structlog.get_logger("wallet.cli").info(
        "database connections",
        total=settings.connections_per_host,
        workers=settings.worker_count,
        pool_size=settings.db_pool_size,
        primary=settings.worker_count * settings.db_pool_size,
        replica=settings.worker_count * settings.db_pool_size if settings.database_read_url else 0,
        listeners=settings.worker_count * settings.listeners_per_worker,
        pooler=settings.db_pooler.value,
        note="a session-pooling PgBouncer needs a pool of hosts x this; README: Sizing",
    )
    if settings.db_pooler is Pooler.TRANSACTION:
        # The pools are PgBouncer's clients (max_client_conn), not the server's. PgBouncer refuses
        # the lock deadline as a startup parameter: only the role's own setting can give it.
        if asyncio.run(lock_timeout_setting(url, settings.db_pooler)) == "0":
            structlog.get_logger("wallet.cli").warning(
                "behind a transaction pooler statements wait for locks without a deadline",
                fix="ALTER ROLE <the service's role> SET lock_timeout = '5s' (README: Poolers and replicas)",
            )
        return
    allowed = asyncio.run(connection_limit(url))
    # What the primary sees: the pools, and the key-cache listeners (on DATABASE_URL here, or on
    # DATABASE_LISTEN_URL, which normally reaches the same server).
    wanted = settings.worker_count * (settings.db_pool_size + settings.listeners_per_worker)
    if wanted > allowed:
        structlog.get_logger("wallet.cli").warning(
            "the pools may open more database connections than the server accepts",
            wanted=wanted,
            allowed=allowed,
            fix="lower DB_POOL_SIZE or WORKERS, or raise the server's max_connections",
        )


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def migrate_cmd() -> None:
    settings = load_settings()
    with database(settings) as url:
        asyncio.run(migrate_url(url, pooler=settings.db_pooler))
    print("wallet: migrations applied", file=sys.stderr)


def verify(digest_path: str | None) -> None:
    """Exit 0 if every wallet's ledger checks out (and, with a digest, still holds everything the
    digest saw); otherwise name each wallet's first bad entry and exit 1."""
    from wallet.verify import Digest, Verdict, load_digest, verify_ledger

    settings = load_settings()
    digest: Digest | None = None
    if digest_path is not None:
        try:
            digest = load_digest(digest_path)
        except (OSError, ValueError) as exc:
            print(f"wallet verify: cannot read the digest {digest_path}: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
    show_progress = sys.stderr.isatty()

    def progress(verdict: Verdict) -> None:
        print(
            f"\rverified {verdict.entries:,} entries in {verdict.wallets:,} wallets",
            end="",
            file=sys.stderr,
            flush=True,
        )

    async def run(url: str) -> Verdict:
        engine = create_engine(url, pool_size=2, pooler=settings.db_pooler)
        try:
            return await verify_ledger(
                engine, settings.chain_key, digest=digest, progress=progress if show_progress else None
            )
        finally:
            await engine.dispose()

    with database(settings) as url:
        verdict = asyncio.run(run(url))
    if show_progress:
        print(file=sys.stderr)
    summary = f"{verdict.wallets} wallets, {verdict.entries} entries"
    if verdict.ok:
        print(f"wallet verify: OK: {summary}")
        return
    print(f"wallet verify: FAILED: {len(verdict.faults)} fault(s) in {summary}")
    for fault in verdict.faults:
        print(f"  {fault.describe()}")
    raise SystemExit(1)


def simulator(port: int, faults: argparse.Namespace) -> None:
    """A standalone provider for development: point FULFILLMENT_API_URL at it to see the service
    handle a slow, failing or hanging provider."""
    import uvicorn

    from wallet.simulator import Faults, Simulator

    sim = Simulator(
        faults=Faults(
            latency_seconds=faults.latency,
            error_status=faults.error_status,
            error_rate=faults.error_rate,
            hang=faults.hang,
            answer_late_seconds=faults.answer_late,
        )
    )
    # Bound before it is announced: a caller that read the line can connect at once (the
    # connection waits in the backlog until uvicorn serves), and --port 0 picks a free port.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(1024)
    print(
        f"wallet: fulfillment simulator at http://127.0.0.1:{sock.getsockname()[1]}/fulfillments",
        file=sys.stderr,
        flush=True,
    )
    config = uvicorn.Config(
        sim.asgi(),
        log_level="warning",
        loop="uvloop",
        http="httptools",
        access_log=False,
        timeout_graceful_shutdown=1,  # calls it is hanging on must not keep it from stopping
    )
    uvicorn.Server(config).run(sockets=[sock])


def listen(host: str, port: int, secret: str) -> None:
    """Receive webhooks on this machine and print each verified event (see `listen.Listener`)."""
    import uvicorn

    from wallet.listen import Listener

    try:
        app = Listener(secret)
    except Exception as exc:
        print(f"wallet webhooks listen: invalid --secret: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    print(
        f"wallet: listening for webhooks at http://{host}:{sock.getsockname()[1]}/",
        file=sys.stderr,
        flush=True,
    )
    config = uvicorn.Config(app, log_level="warning", http="httptools", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])


def openapi() -> None:
    from wallet.http.app import openapi_document

    settings = Settings(database_url="postgresql://unused/openapi", admin_api_key="x" * 32)
    json.dump(openapi_document(settings), sys.stdout, indent=2)
    print()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="wallet", description="Prepaid wallet service")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="migrate, then serve the HTTP API")
    commands.add_parser("migrate", help="apply pending database migrations")
    check = commands.add_parser("verify", help="check every wallet's ledger: sums, chain, hashes")
    check.add_argument(
        "--digest",
        metavar="FILE",
        help="a digest's data (GET /admin/ledger/digest) as JSON: prove nothing it saw changed since",
    )
    sim = commands.add_parser("simulator", help="run a standalone fulfillment simulator")
    sim.add_argument("--port", type=int, default=3001)
    sim.add_argument("--latency", type=float, default=0.0, help="seconds per call")
    sim.add_argument("--error-status", type=int, help="answer this HTTP status instead of success")
    sim.add_argument("--error-rate", type=float, default=1.0, help="on this fraction of calls (1.0)")
    sim.add_argument("--hang", action="store_true", help="accept calls and never answer")
    sim.add_argument(
        "--answer-late",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="fulfil each order at once but answer this many seconds later (past the service's"
        " timeout, its outcome is unknown until the resolver asks again)",
    )
    commands.add_parser("openapi", help="print the OpenAPI document")
    hooks = commands.add_parser("webhooks", help="webhook tools for developers").add_subparsers(
        dest="webhooks_command", required=True
    )
    receiver = hooks.add_parser("listen", help="receive webhooks here and print each verified event")
    receiver.add_argument("--port", type=int, default=4000)
    receiver.add_argument("--host", default="127.0.0.1")
    receiver.add_argument("--secret", required=True, help="the endpoint's whsec_... secret")
    args = parser.parse_args(argv)
    if args.command == "serve":
        try:
            serve()
        except KeyboardInterrupt:  # Ctrl-C: uvicorn already shut down gracefully
            raise SystemExit(130) from None
    elif args.command == "migrate":
        migrate_cmd()
    elif args.command == "verify":
        verify(args.digest)
    elif args.command == "simulator":
        simulator(args.port, args)
    elif args.command == "openapi":
        openapi()
    elif args.command == "webhooks":
        try:
            listen(args.host, args.port, args.secret)
        except KeyboardInterrupt:
            raise SystemExit(130) from None


if __name__ == "__main__":
    main()
