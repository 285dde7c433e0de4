"""A model-based test of the wallet rules (SPEC §2) against the real service.

Hypothesis drives credits, debits, orders (with the provider refusing or answering nothing
useful at random, so some orders end with their outcome unknown), operators resolving those
either way, idempotent retries and replays; after every step the service must agree with a plain
Python model of each wallet (what can be spent, what is held, which orders are PENDING), and
`GET /admin/ledger/verify` must find every ledger intact (sums, chain, hashes, orders).

The service and the provider run on the test's event loop; the state machine runs in a worker
thread with a synchronous client, so each step is a real HTTP exchange.

`ConcurrentGroups` does the same for the batched path: each step fires a whole group of requests
at once on the service's loop, so group commit (batching.py) pays for several orders of one
wallet in one statement, amid credits, debits and replays; then it checks what the answers and
the ledger say together.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import httpx
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from prometheus_client.parser import text_string_to_metric_families

from tests.builders import ADMIN_KEY, Api, Provider, all_pages, start_service

T = TypeVar("T")

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


# --- the batched path: groups of requests at once ---------------------------------------------

REPLAYED = "Idempotent-Replayed"
_SIGN = {"CREDIT": 1, "ORDER_REFUND": 1, "DEBIT": -1, "ORDER_DEDUCTION": -1}
_MOST = {"order": 3_000, "credit": 15_000, "debit": 6_000}  # cents


@st.composite
def calls(draw: st.DrawFn) -> tuple[str, int, int, bool]:
    """(kind, wallet, cents, keyed). Mostly orders; wallet 0 the busiest, 2 one that never
    exists (orders and debits there are refused; credits go to wallet 0 instead)."""
    kind = draw(st.sampled_from(("order", "order", "order", "credit", "debit")))
    who = draw(st.sampled_from((0, 0, 0, 1, 1, 2)))
    return kind, who, draw(st.integers(1, _MOST[kind])), draw(st.booleans())


@st.composite
def groups(draw: st.DrawFn) -> tuple[list[tuple[str, int, int, bool]], list[int]]:
    """The calls of one group, and which of them are sent a second time with the same key."""
    group = draw(st.lists(calls(), min_size=2, max_size=24))
    return group, draw(st.lists(st.integers(0, len(group) - 1), max_size=4))


def cents(value: float) -> int:
    return round(value * 100)


@dataclass(frozen=True)
class Call:
    kind: str  # credit, debit or order
    wallet: str
    cents: int
    key: str | None

    async def send(self, http: httpx.AsyncClient) -> httpx.Response:
        headers = {} if self.key is None else {"Idempotency-Key": self.key}
        if self.kind == "order":
            body: dict[str, Any] = {"amount": amount(self.cents)}
            return await http.post("/orders", json=body, headers={"client-id": self.wallet, **headers})
        body = {"client_id": self.wallet, "amount": amount(self.cents)}
        return await http.post(f"/admin/wallet/{self.kind}", json=body, headers={**ADMIN, **headers})


@dataclass
class Moved:
    """What one group's fresh answers (not replays) say moved in one wallet."""

    credits: Counter[tuple[str, int, int]] = field(default_factory=Counter)  # (type, before, after)
    deductions: Counter[tuple[str, int]] = field(default_factory=Counter)  # (order id, cents)
    refunds: Counter[tuple[str, int]] = field(default_factory=Counter)


class ConcurrentGroups(RuleBasedStateMachine):
    """Each step fires a group of requests at two wallets at once (orders, most of them, mixed
    with admin credits and debits, some with Idempotency-Keys, some keys sent twice, some keys
    of earlier groups again), so the service's group commit batches them. Once every answer is
    in, the user's view must add up: one serial history per wallet that each answer is part of,
    every accepted order once, refusals and replays moving nothing, the chain intact."""

    api: ClassVar[Api]
    loop: ClassVar[asyncio.AbstractEventLoop]
    provider: ClassVar[Provider]

    def __init__(self) -> None:
        super().__init__()
        run = uuid.uuid4().hex[:8]
        self.wallets = [f"g{run}-{n}" for n in range(2)]
        self.ghost = f"g{run}-none"
        self.balance = dict.fromkeys(self.wallets, 0)
        self.entries = dict.fromkeys(self.wallets, 0)
        self.orders: dict[str, tuple[str, int, str]] = {}  # order id -> (wallet, cents, status)
        self.first: dict[str, tuple[Call, int, bytes]] = {}  # key -> the answer that moved money
        self.provider.set()

    def _on_loop(self, work: Coroutine[Any, Any, T]) -> T:
        """Run on the service's event loop (this state machine runs in a worker thread)."""
        return asyncio.run_coroutine_threadsafe(work, self.loop).result()

    async def _fire(self, calls: list[Call]) -> list[httpx.Response]:
        return await asyncio.gather(*(call.send(self.api.http) for call in calls))

    @initialize(opening=st.tuples(st.integers(1, 40_000), st.integers(1, 40_000)))
    def open_wallets(self, opening: tuple[int, int]) -> None:
        for wallet, cents_ in zip(self.wallets, opening, strict=True):
            response = self._on_loop(Call("credit", wallet, cents_, None).send(self.api.http))
            assert response.status_code == 200, response.text
            self.balance[wallet], self.entries[wallet] = cents_, 1

    @rule(
        group=groups(),
        again=st.lists(st.integers(min_value=0), max_size=3),
        refusing=st.sampled_from([0.0, 0.3, 1.0]),
    )
    def fire_a_group(
        self, group: tuple[list[tuple[str, int, int, bool]], list[int]], again: list[int], refusing: float
    ) -> None:
        # The provider refuses that share of orders at once: FAILED and refunded, never pending.
        if refusing:
            self.provider.set(error_status=400, error_rate=refusing)
        else:
            self.provider.set()
        raw, repeats = group
        calls = [
            Call(
                kind,
                self.ghost if who == 2 and kind != "credit" else self.wallets[who % 2],
                cents_,
                uuid.uuid4().hex if keyed or n in repeats else None,
            )
            for n, (kind, who, cents_, keyed) in enumerate(raw)
        ]
        calls += [calls[n] for n in repeats]  # the same request, same key, in the same group
        earlier = [c for c, _, _ in self.first.values()]
        calls += [earlier[n % len(earlier)] for n in again] if earlier else []
        answers = self._on_loop(self._fire(calls))
        moved = self._judge(calls, answers, refusing)
        self._on_loop(self._check_ledgers(moved))
        self._on_loop(
            self._check_replays({c.key: c for c in calls if c.key is not None and c.key in self.first})
        )

    def _judge(self, calls: list[Call], answers: list[httpx.Response], refusing: float) -> dict[str, Moved]:
        """Each answer as the caller reads it; what the fresh ones say moved, per wallet."""
        moved = {wallet: Moved() for wallet in self.wallets}
        sent = Counter(call.key for call in calls)
        for call, answer in zip(calls, answers, strict=True):
            if answer.headers.get(REPLAYED) == "true":
                continue  # judged below, once every fresh answer is known
            status, body = answer.status_code, answer.json()
            if call.wallet == self.ghost:
                assert (status, body["code"]) == (404, "CLIENT_NOT_FOUND"), answer.text
                continue
            if status == 400:
                assert call.kind != "credit", answer.text
                assert body["code"] == "INSUFFICIENT_FUNDS", answer.text
                continue
            if status == 409:  # the same key's order is still being paid for or fulfilled
                assert call.kind == "order", answer.text
                assert sent[call.key] > 1, answer.text
                assert body["code"] == "IDEMPOTENCY_IN_PROGRESS", answer.text
                continue
            data = body["data"]
            if call.kind == "order":
                assert status in ((201, 502) if refusing else (201,)), answer.text
                assert data["orderId"] not in self.orders, "an order id answered twice"
                assert (cents(data["amount"]), data["status"]) == (
                    call.cents,
                    "COMPLETED" if status == 201 else "FAILED",
                ), answer.text
                moved[call.wallet].deductions[data["orderId"], call.cents] += 1
                if status == 502:
                    moved[call.wallet].refunds[data["orderId"], call.cents] += 1
                self.orders[data["orderId"]] = (call.wallet, call.cents, data["status"])
            else:
                assert status == 200, answer.text
                before, after = cents(data["previousBalance"]), cents(data["newBalance"])
                sign = 1 if call.kind == "credit" else -1
                assert after == before + sign * call.cents
                moved[call.wallet].credits[call.kind.upper(), before, after] += 1
            if call.key is not None:
                assert call.key not in self.first, "one key moved money twice"
                self.first[call.key] = (call, status, answer.content)
        for call, answer in zip(calls, answers, strict=True):
            if answer.headers.get(REPLAYED) == "true":
                assert call.key in self.first, "a replay of an answer that moved nothing"
                _, status, content = self.first[call.key]
                assert (answer.status_code, answer.content) == (status, content)
        return moved

    async def _check_ledgers(self, moved: dict[str, Moved]) -> None:
        for wallet in self.wallets:
            page = await all_pages(self.api, f"/admin/clients/{wallet}/ledger", ADMIN, 100)
            entries = page[::-1]
            assert [e["entryNo"] for e in entries] == list(range(1, len(entries) + 1))
            balance = 0
            for e in entries:  # one serial history: each entry starts where the one before ended
                before, after, cents_ = (
                    cents(e["balanceBefore"]),
                    cents(e["balanceAfter"]),
                    cents(e["amount"]),
                )
                assert before == balance, e
                assert after == before + _SIGN[e["type"]] * cents_, e
                assert after >= 0, e
                balance = after
            new = entries[self.entries[wallet] :]
            want = moved[wallet]
            assert (
                Counter(
                    (e["type"], cents(e["balanceBefore"]), cents(e["balanceAfter"]))
                    for e in new
                    if e["type"] in ("CREDIT", "DEBIT")
                )
                == want.credits
            )
            assert (
                Counter((e["referenceId"], cents(e["amount"])) for e in new if e["type"] == "ORDER_DEDUCTION")
                == want.deductions
            )
            assert (
                Counter((e["referenceId"], cents(e["amount"])) for e in new if e["type"] == "ORDER_REFUND")
                == want.refunds
            )
            completed = sum(c * n for (o, c), n in want.deductions.items() if (o, c) not in want.refunds)
            changed = sum(n * (after - before) for (_, before, after), n in want.credits.items())
            assert balance == self.balance[wallet] + changed - completed
            shown = await self.api.wallet(wallet)
            assert (cents(shown["balance"]), cents(shown["held"])) == (balance, 0)
            self.balance[wallet], self.entries[wallet] = balance, len(entries)
            listed = await all_pages(self.api, "/orders", {"client-id": wallet}, 100)
            assert len(listed) == len({o["orderId"] for o in listed}), "an order listed twice"
            assert {o["orderId"]: o["status"] for o in listed} == {
                order_id: status for order_id, (owner, _, status) in self.orders.items() if owner == wallet
            }
        ghost = await self.api.http.get("/wallet/balance", headers={"client-id": self.ghost})
        assert ghost.status_code == 404
        verdict = (await self.api.http.get("/admin/ledger/verify", headers=ADMIN)).json()["data"]
        assert verdict["ok"], verdict["faults"]

    async def _check_replays(self, keyed: dict[str, Call]) -> None:
        """Every key of the group that moved money, sent again at once: its first answer,
        byte for byte, and no money moved."""
        calls = list(keyed.values())
        for call, answer in zip(calls, await self._fire(calls), strict=True):
            assert call.key is not None
            _, status, content = self.first[call.key]
            assert answer.headers.get(REPLAYED) == "true"
            assert (answer.status_code, answer.content) == (status, content)
        for wallet in self.wallets:
            last = await self.api.http.get(f"/admin/clients/{wallet}/ledger?limit=1", headers=ADMIN)
            assert last.json()["data"][0]["entryNo"] == self.entries[wallet]
            assert cents((await self.api.wallet(wallet))["balance"]) == self.balance[wallet]


def placement_batches(metrics: str) -> tuple[float, float]:
    """From /metrics: how many order batches ran, and how many of them held a single order."""
    count = single = 0.0
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            if family.name != "wallet_batch_size" or sample.labels.get("kind") != "placement":
                continue
            if sample.name == "wallet_batch_size_count":
                count = sample.value
            elif sample.name == "wallet_batch_size_bucket" and float(sample.labels["le"]) == 1:
                single = sample.value
    return count, single


async def test_concurrent_groups_keep_one_serial_history(database_url: str, provider: Provider) -> None:
    async with start_service(database_url, provider.url, recovery_interval_seconds=3600) as api:
        batches, single = placement_batches((await api.http.get("/metrics")).text)
        ConcurrentGroups.api = api
        ConcurrentGroups.loop = asyncio.get_running_loop()
        ConcurrentGroups.provider = provider
        await asyncio.to_thread(
            run_state_machine_as_test,
            ConcurrentGroups,
            settings=settings(
                max_examples=6,
                stateful_step_count=6,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )
        # The groups really went through group commit: some batch held more than one placement.
        after, after_single = placement_batches((await api.http.get("/metrics")).text)
        assert (after - batches) - (after_single - single) > 0
