"""Reading history (SPEC §6): keyset pages, newest first, each row exactly once, own rows only."""

from __future__ import annotations

import itertools

import pytest

from tests.builders import BAD_PAGING, Api, Provider, all_pages, start_service


async def make_activity(api: Api, provider: Provider, client_id: str) -> None:
    await api.credit(client_id, 1000)
    for n in range(1, 8):
        await api.order(client_id, n)
    provider.set(error_status=400)
    for n in range(2):
        assert (await api.order(client_id, 10 + n)).status_code == 502
    provider.set()
    for n in range(5):
        await api.debit(client_id, 1 + n / 100)


async def test_ledger_pages_cover_every_entry_once_in_order(database_url: str, provider: Provider) -> None:
    async with start_service(database_url, provider.url) as api:
        await make_activity(api, provider, "C1")
        await api.credit("C2", 5)
        entries = await all_pages(api, "/wallet/transactions", {"client-id": "C1"}, limit=3)
        # 1 credit + 7 orders + 2 failed orders (deduction and refund each) + 5 debits
        assert len(entries) == 1 + 7 + 4 + 5
        numbers = [e["entryNo"] for e in entries]
        assert numbers == list(range(len(entries), 0, -1))
        for newer, older in itertools.pairwise(entries):
            assert newer["balanceBefore"] == older["balanceAfter"]
        assert entries[-1]["type"] == "CREDIT"
        assert entries[-1]["balanceBefore"] == 0
        balance = await api.balance("C1")
        assert entries[0]["balanceAfter"] == float(balance)
        assert {e["type"] for e in entries} == {"CREDIT", "ORDER_DEDUCTION", "ORDER_REFUND", "DEBIT"}
        # The same pages through the admin endpoint.
        admin = await all_pages(api, "/admin/clients/C1/ledger", api.admin_headers, limit=4)
        assert admin == entries
        first_page = await api.http.get("/wallet/transactions", headers={"client-id": "C1"})
        assert len(first_page.json()["data"]) == 17  # the default limit is 20


async def test_order_pages_and_status_filter(database_url: str, provider: Provider) -> None:
    async with start_service(database_url, provider.url) as api:
        await make_activity(api, provider, "C1")
        await api.credit("C2", 100)
        other = (await api.order("C2", 1)).json()["data"]["orderId"]
        orders = await all_pages(api, "/orders", {"client-id": "C1"}, limit=2)
        assert len(orders) == 9
        assert other not in {o["orderId"] for o in orders}
        created = [o["createdAt"] for o in orders]
        assert created == sorted(created, reverse=True)
        failed = await all_pages(api, "/orders", {"client-id": "C1"}, limit=1, status="FAILED")
        assert [o["amount"] for o in failed] == [11, 10]
        assert all(o["status"] == "FAILED" for o in failed)
        completed = await all_pages(api, "/orders", {"client-id": "C1"}, limit=5, status="COMPLETED")
        assert len(completed) == 7
        assert await all_pages(api, "/orders", {"client-id": "C1"}, limit=5, status="PENDING") == []


async def test_clients_see_only_their_own_rows(database_url: str, provider: Provider) -> None:
    async with start_service(database_url, provider.url) as api:
        await api.credit("alice", 100)
        await api.order("alice", 10)
        await api.credit("bob", 100)
        bob = await all_pages(api, "/wallet/transactions", {"client-id": "bob"}, limit=10)
        assert [e["type"] for e in bob] == ["CREDIT"]
        assert await all_pages(api, "/orders", {"client-id": "bob"}, limit=10) == []
        # A cursor taken from alice's pages does not open alice's rows to bob.
        alice_page = await api.http.get(
            "/wallet/transactions", params={"limit": "1"}, headers={"client-id": "alice"}
        )
        cursor = alice_page.json()["nextCursor"]
        assert cursor is not None
        bob_page = await api.http.get(
            "/wallet/transactions", params={"cursor": cursor}, headers={"client-id": "bob"}
        )
        assert [e["type"] for e in bob_page.json()["data"]] == ["CREDIT"]


@pytest.mark.parametrize("params", BAD_PAGING)
async def test_bad_paging_parameters_are_400(
    database_url: str, provider: Provider, params: dict[str, str]
) -> None:
    async with start_service(database_url, provider.url) as api:
        await api.credit("C1", 100)
        for path in ["/wallet/transactions", "/orders"]:
            response = await api.http.get(path, params=params, headers={"client-id": "C1"})
            assert response.status_code == 400, (path, params, response.text)
            assert response.json()["success"] is False
        bad_status = await api.http.get("/orders", params={"status": "DONE"}, headers={"client-id": "C1"})
        assert bad_status.status_code == 400


async def test_admin_reads_need_the_admin_key(database_url: str, provider: Provider) -> None:
    async with start_service(database_url, provider.url) as api:
        await api.credit("C1", 12.5, name="Acme", email="ops@acme.test")
        profile = await api.http.get("/admin/clients/C1", headers=api.admin_headers)
        assert profile.status_code == 200
        data = profile.json()["data"]
        assert (data["clientId"], data["name"], data["email"], data["balance"]) == (
            "C1",
            "Acme",
            "ops@acme.test",
            12.5,
        )
        for path in ["/admin/clients/C1", "/admin/clients/C1/ledger", "/admin/ledger/verify"]:
            assert (await api.http.get(path)).status_code == 401
            assert (await api.http.get(path, headers={"Authorization": "Bearer wrong"})).status_code == 403
        assert (await api.http.get("/admin/clients/ghost", headers=api.admin_headers)).status_code == 404
        for path in ["/admin/clients/" + "x" * 8000, "/admin/clients/" + "x" * 8000 + "/ledger"]:
            huge = await api.http.get(path, headers=api.admin_headers)
            assert (huge.status_code, huge.json()["success"]) == (400, False)
        ghost_ledger = await api.http.get("/admin/clients/ghost/ledger", headers=api.admin_headers)
        assert ghost_ledger.status_code == 404
        own = await api.http.get("/wallet/transactions", headers={"client-id": "ghost"})
        assert own.status_code == 404
