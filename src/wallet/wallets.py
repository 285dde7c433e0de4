"""Admin credits and debits, and balance reads: each one transaction, owned here (the reads
of one event-loop pass share one query, `batching`).

The Idempotency-Key is claimed and its response stored inside the same transaction as the
movement, so a replay can never move money twice and a refused request leaves no record."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from wallet import idempotency, ledger, reads
from wallet.batching import Batcher
from wallet.chain import LedgerKey
from wallet.database import direct, single
from wallet.errors import NotFound
from wallet.ledger import Movement
from wallet.money import from_cents
from wallet.reads import Balance
from wallet.wire import Reply, dumps, ok


def _movement_json(movement: Movement, amount_field: str) -> dict[str, Any]:
    return {
        "clientId": movement.client_id,
        "previousBalance": from_cents(movement.balance_before),
        "newBalance": from_cents(movement.balance_after),
        amount_field: from_cents(movement.amount),
    }


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
        render: Callable[[Movement], dict[str, Any]],
        *,
        single_statement: bool = False,
    ) -> Reply:
        if idem is None and single_statement:
            async with self.single.connect() as conn:
                return Reply(200, dumps(render(await move(conn))))
        async with self.engine.begin() as conn:
            if idem is not None:
                stored = await idempotency.claim(conn, idem, self.idempotency_ttl_hours)
                if stored is not None:
                    assert stored.status is not None  # credits and debits store it in their own transaction
                    assert stored.body is not None
                    return Reply(stored.status, stored.body, replayed=True)
            reply = Reply(200, dumps(render(await move(conn))))
            if idem is not None:
                await idempotency.complete(conn, idem, reply.status, reply.body)
        return reply

    async def credit(
        self,
        client_id: str,
        amount: int,
        *,
        idem: idempotency.IdempotencyKey | None,
        description: str | None,
        name: str | None,
        email: str | None,
    ) -> Reply:
        return await self._once(
            idem,
            lambda conn: ledger.credit(
                conn, client_id, amount, key=self.key, description=description, name=name, email=email
            ),
            lambda m: ok(_movement_json(m, "amountCredited"), "Wallet credited successfully"),
        )

    async def debit(
        self,
        client_id: str,
        amount: int,
        *,
        idem: idempotency.IdempotencyKey | None,
        description: str | None,
    ) -> Reply:
        return await self._once(
            idem,
            lambda conn: ledger.debit(conn, client_id, amount, key=self.key, description=description),
            lambda m: ok(_movement_json(m, "amountDebited"), "Wallet debited successfully"),
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
