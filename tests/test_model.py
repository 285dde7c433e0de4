"""A model-based test of the wallet rules (SPEC §2) against the real service.

Hypothesis drives credits, debits, orders (with the provider refusing or answering nothing
useful at random, so some orders end with their outcome unknown), operators resolving those
either way, idempotent retries and replays; after every step the service must agree with a plain
Python model of each wallet (what can be spent, what is held, which orders are PENDING), and
`GET /admin/ledger/verify` must find every ledger intact (sums, chain, hashes, orders).

The service and the provider run on the test's event loop; the state machine runs in a worker
thread with a synchronous client, so each step is a real HTTP exchange.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, ClassVar

import httpx
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from tests.builders import ADMIN_KEY, Provider, start_service

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
CENTS = st.integers(min_value=1, max_value=20_000)
WHO = st.integers(min_value=0, max_value=2)


def amount(cents: int) -> float:
    return cents / 100


class WalletRules(RuleBasedStateMachine):
    http: ClassVar[httpx.Client]
    provider: ClassVar[Provider]

    def __init__(self) -> None:
        super().__init__()
        run = uuid.uuid4().hex[:8]
        self.clients = [f"m{run}-{n}" for n in range(3)]
        self.model: dict[str, int] = {}  # spendable cents, for clients the service knows
        self.pending: dict[str, tuple[str, int]] = {}  # order id -> (client, cents): money held
        self.sent: list[tuple[str, dict[str, Any], dict[str, str], int, bytes]] = []
        self.failing = False
        self.provider.set()  # each example starts with a healthy provider

    def _post(
        self, path: str, body: dict[str, Any], headers: dict[str, str], key: str | None
    ) -> httpx.Response:
        if key is not None:
            headers = {**headers, "Idempotency-Key": key}
        response = self.http.post(path, json=body, headers=headers)
        if key is not None and response.status_code in (200, 201, 202, 502, 503):
            self.sent.append((path, body, headers, response.status_code, response.content))
        return response

    @rule(who=WHO, cents=CENTS, keyed=st.booleans())
    def credit(self, who: int, cents: int, keyed: bool) -> None:
        client = self.clients[who]
        key = uuid.uuid4().hex if keyed else None
        body = {"client_id": client, "amount": amount(cents)}
        response = self._post("/admin/wallet/credit", body, ADMIN, key)
        assert response.status_code == 200, response.text
        data = response.json()["data"]
        before = self.model.get(client, 0)
        assert round(data["previousBalance"] * 100) == before
        assert round(data["newBalance"] * 100) == before + cents
        self.model[client] = before + cents

    @rule(who=WHO, cents=CENTS, keyed=st.booleans())
    def debit(self, who: int, cents: int, keyed: bool) -> None:
        client = self.clients[who]
        key = uuid.uuid4().hex if keyed else None
        response = self._post(
            "/admin/wallet/debit", {"client_id": client, "amount": amount(cents)}, ADMIN, key
        )
        if client not in self.model:
            assert response.status_code == 404
        elif self.model[client] < cents:
            assert response.status_code == 400
            assert response.json()["code"] == "INSUFFICIENT_FUNDS"
        else:
            assert response.status_code == 200, response.text
            assert round(response.json()["data"]["newBalance"] * 100) == self.model[client] - cents
            self.model[client] -= cents

    @rule(who=WHO, cents=CENTS, keyed=st.booleans())
    def order(self, who: int, cents: int, keyed: bool) -> None:
        client = self.clients[who]
        key = uuid.uuid4().hex if keyed else None
        response = self._post("/orders", {"amount": amount(cents)}, {"client-id": client}, key)
        if client not in self.model:
            assert response.status_code == 404
        elif self.model[client] < cents:
            assert response.status_code == 400
            assert response.json()["code"] == "INSUFFICIENT_FUNDS"
        elif response.status_code == 201:
            assert response.json()["data"]["status"] == "COMPLETED"
            self.model[client] -= cents
        elif response.status_code == 202:  # the provider's answers proved nothing: money held
            assert self.failing, response.text
            assert response.json()["data"]["status"] == "PENDING"
            self.model[client] -= cents
            self.pending[response.json()["data"]["orderId"]] = (client, cents)
        else:
            assert self.failing, response.text
            assert response.status_code == 502
            assert response.json()["data"]["status"] == "FAILED"

    @precondition(lambda self: bool(self.pending))
    @rule(data=st.data(), fulfilled=st.booleans())
    def operator_resolves(self, data: st.DataObject, fulfilled: bool) -> None:
        order_id = data.draw(st.sampled_from(sorted(self.pending)))
        body: dict[str, Any] = {"outcome": "fulfilled" if fulfilled else "failed", "note": "model"}
        if fulfilled:
            body["fulfillmentId"] = f"f-{order_id}"
        response = self.http.post(f"/admin/orders/{order_id}/resolve", json=body, headers=ADMIN)
        assert response.status_code == 200, response.text
        client, cents = self.pending.pop(order_id)
        if not fulfilled:
            self.model[client] += cents
        again = self.http.post(f"/admin/orders/{order_id}/resolve", json=body, headers=ADMIN)
        assert again.status_code == 409

    @rule(rate=st.sampled_from([0.0, 0.5, 1.0]), status=st.sampled_from([400, 500, 503]))
    def provider_faults(self, rate: float, status: int) -> None:
        self.failing = rate > 0
        if self.failing:
            self.provider.set(error_status=status, error_rate=rate)
        else:
            self.provider.set()

    @precondition(lambda self: bool(self.sent))
    @rule(data=st.data())
    def replay(self, data: st.DataObject) -> None:
        path, body, headers, status, content = data.draw(st.sampled_from(self.sent))
        again = self.http.post(path, json=body, headers=headers)
        assert again.headers["Idempotent-Replayed"] == "true"
        if status != 202:
            assert (again.status_code, again.content) == (status, content)
            return
        # A replayed 202 tells the order as it is now.
        order_id = httpx.Response(status, content=content).json()["data"]["orderId"]
        now = again.json()["data"]
        assert now["orderId"] == order_id
        if order_id in self.pending:
            assert (again.status_code, again.content) == (status, content)
        else:
            assert (again.status_code, now["status"]) in ((201, "COMPLETED"), (502, "FAILED"))

    @precondition(lambda self: bool(self.sent))
    @rule(data=st.data(), cents=CENTS)
    def reuse_key_with_another_body(self, data: st.DataObject, cents: int) -> None:
        path, body, headers, _, _ = data.draw(st.sampled_from(self.sent))
        other = {**body, "amount": amount(cents)}
        response = self.http.post(path, json=other, headers=headers)
        if other == body:
            assert response.headers["Idempotent-Replayed"] == "true"
        else:
            assert response.status_code == 422

    @invariant()
    def service_agrees_with_the_model(self) -> None:
        for client in self.clients:
            response = self.http.get("/wallet/balance", headers={"client-id": client})
            if client not in self.model:
                assert response.status_code == 404
                continue
            wallet = response.json()["data"]
            assert round(wallet["balance"] * 100) == self.model[client]
            held = [o for o, (owner, _) in self.pending.items() if owner == client]
            assert round(wallet["held"] * 100) == sum(self.pending[o][1] for o in held)
            pending = self.http.get(
                "/orders", params={"status": "PENDING", "limit": 100}, headers={"client-id": client}
            )
            assert {o["orderId"] for o in pending.json()["data"]} == set(held)

    @invariant()
    def ledger_is_intact(self) -> None:
        verdict = self.http.get("/admin/ledger/verify", headers=ADMIN).json()["data"]
        assert verdict["ok"], verdict["faults"]


async def test_wallet_rules_hold_in_any_sequence(database_url: str, provider: Provider) -> None:
    async with start_service(
        database_url,
        provider.url,
        fulfillment_max_attempts=2,
        fulfillment_backoff_seconds=0.001,
        recovery_interval_seconds=3600,  # unknown outcomes stay unknown until an operator decides
    ) as api:
        base = str(api.http.base_url)

        def run() -> None:
            with httpx.Client(base_url=base, timeout=30) as http:
                WalletRules.http = http
                WalletRules.provider = provider
                run_state_machine_as_test(
                    WalletRules,
                    settings=settings(
                        max_examples=12,
                        stateful_step_count=15,
                        deadline=None,
                        suppress_health_check=[HealthCheck.too_slow],
                    ),
                )

        await asyncio.to_thread(run)
