"""A model-based test of the wallet rules (SPEC §2) against the real service.

Hypothesis drives credits, debits, orders (with the provider failing at random), idempotent
retries and replays; after every step the service must agree with a plain Python model of each
wallet, `GET /admin/ledger/verify` must find every ledger intact (sums, chain, hashes), and no
order may be left PENDING once its response has been sent.

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
        self.model: dict[str, int] = {}  # cents, for clients the service knows
        self.sent: list[tuple[str, dict[str, Any], dict[str, str], int, bytes]] = []
        self.failing = False
        self.provider.set()  # each example starts with a healthy provider

    def _post(
        self, path: str, body: dict[str, Any], headers: dict[str, str], key: str | None
    ) -> httpx.Response:
        if key is not None:
            headers = {**headers, "Idempotency-Key": key}
        response = self.http.post(path, json=body, headers=headers)
        if key is not None and response.status_code in (200, 201, 502, 503):
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
        else:
            assert self.failing, response.text
            assert response.status_code == 502
            assert response.json()["data"]["status"] == "FAILED"

    @rule(rate=st.sampled_from([0.0, 0.5, 1.0]), status=st.sampled_from([400, 500]))
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
        assert (again.status_code, again.content) == (status, content)
        assert again.headers["Idempotent-Replayed"] == "true"

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
            assert round(response.json()["data"]["balance"] * 100) == self.model[client]
            pending = self.http.get("/orders", params={"status": "PENDING"}, headers={"client-id": client})
            assert pending.json()["data"] == []

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
