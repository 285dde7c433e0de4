"""The pool's deadlines (database.py): no request waits on the database without one."""

from __future__ import annotations

import asyncio

import pytest

from wallet.database import create_engine, is_unavailable


async def test_a_server_that_holds_the_handshake_is_unavailable_within_the_pools_wait() -> None:
    """A paused PgBouncer, or a server that hangs, accepts the socket and never answers the
    startup: making a connection gives up after the pool's own wait, not asyncpg's 60 s."""
    silent = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)  # accepts, never answers
    port = silent.sockets[0].getsockname()[1]
    engine = create_engine(f"postgresql://postgres@127.0.0.1:{port}/wallet", pool_timeout=0.5)
    try:
        async with asyncio.timeout(20):  # far past 0.5 s, far short of 60 s
            with pytest.raises(TimeoutError) as caught:
                async with engine.connect():
                    pass
        assert is_unavailable(caught.value)
    finally:
        await engine.dispose()
        silent.close()
