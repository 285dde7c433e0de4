"""Admin credits and debits, and balance reads: each one transaction, owned here (the reads
of one event-loop pass share one query, `batching`).

The Idempotency-Key is claimed, and the movement kept under it, inside the same transaction as
the movement, so a replay can never move money twice and a refused request leaves no record."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from wallet import idempotency, ledger, reads
from wallet.batching import Batcher
from wallet.chain import LedgerKey
from wallet.database import direct, single
from wallet.errors import NotFound
from wallet.ledger import Movement
from wallet.reads import Balance
from wallet.wire import Reply


@dataclass(frozen=True, slots=True)
class Moved:
    """What a credit or debit came to, and whether this is a replay of an earlier request with
    the same Idempotency-Key."""

    movement: Movement
    replayed: bool = False


def _as_result(movement: Movement) -> dict[str, Any]:
    """The movement as its key's record keeps it (JSON-shaped), for replays to render."""
    return {**asdict(movement), "created_at": movement.created_at.isoformat()}


def _replay(stored: idempotency.StoredResponse) -> Moved | Reply:
    if stored.result is None:  # kept before migration 0013: the answer's bytes, replayed as they are
        assert stored.status is not None  # credits and debits finish in their own transaction
        assert stored.body is not None
        return Reply(stored.status, stored.body)
    result = stored.result
    return Moved(Movement(**{**result, "created_at": datetime.fromisoformat(result["created_at"])}), True)


class Wallets:
    def __init__(self, engine: AsyncEngine, *, key: LedgerKey, idempotency_ttl_hours: float) -> None:
        self.engine = engine
        self.key = key
        # Single statements are atomic on their own: no BEGIN/COMMIT round trips for them.
        self.single = single(engine)
        self.idempotency_ttl_hours = idempotency_ttl_hours
        # Group commit (batching.py): the balance reads of one event-loop pass share one query.
        self._reads = Batcher("balance", self._read_balances)

    async def _once(
        self,
        idem: idempotency.IdempotencyKey | None,
        move: Callable[[AsyncConnection], Awaitable[Movement]],
        *,
        single_statement: bool = False,
    ) -> Moved | Reply:
        if idem is None and single_statement:
            async with self.single.connect() as conn:
                return Moved(await move(conn))
        async with self.engine.begin() as conn:
            if idem is not None:
                stored = await idempotency.claim(conn, idem, self.idempotency_ttl_hours)
                if stored is not None:
                    return _replay(stored)
            movement = await move(conn)
            if idem is not None:
                await idempotency.finish(conn, idem, _as_result(movement))
        return Moved(movement)

    async def credit(
        self,
        client_id: str,
        amount: int,
        *,
        idem: idempotency.IdempotencyKey | None,
        description: str | None,
        name: str | None,
        email: str | None,
    ) -> Moved | Reply:
        return await self._once(
            idem,
            lambda conn: ledger.credit(
                conn, client_id, amount, key=self.key, description=description, name=name, email=email
            ),
        )

    async def debit(
        self,
        client_id: str,
        amount: int,
        *,
        idem: idempotency.IdempotencyKey | None,
        description: str | None,
    ) -> Moved | Reply:
        return await self._once(
            idem,
            lambda conn: ledger.debit(conn, client_id, amount, key=self.key, description=description),
            single_statement=True,
        )

    async def balance(self, client_id: str) -> Balance:
        found = await self._reads.submit(client_id)
        if isinstance(found, NotFound):
            raise found
        return found

    async def _read_balances(self, client_ids: Sequence[str]) -> list[Balance | NotFound]:
        async with direct(self.engine) as conn:
            return await reads.balances(conn, client_ids)
