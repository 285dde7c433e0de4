"""Who may call: the admin bearer key, and client API keys (CLIENT_AUTH=api_key) issued,
rotated and revoked by the admin; a key is never kept in clear."""

from __future__ import annotations

import hashlib
import re
from typing import Any

import asyncpg
import httpx

from tests.builders import ADMIN_KEY, Api, Provider, start_service
from wallet.database import plain_url


async def issue_key(api: Api, client_id: str) -> dict[str, Any]:
    response = await api.http.post(f"/admin/clients/{client_id}/api-keys", headers=api.admin_headers)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["success"] is True
    assert body["message"] == "API key created successfully"
    data: dict[str, Any] = body["data"]
    return data


async def balance_as(api: Api, client_id: str, key: str | None) -> httpx.Response:
    headers = {"client-id": client_id}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return await api.http.get("/wallet/balance", headers=headers)


async def revoke(api: Api, client_id: str, key_id: str) -> httpx.Response:
    return await api.http.delete(f"/admin/clients/{client_id}/api-keys/{key_id}", headers=api.admin_headers)


async def test_issued_key_lets_its_client_in_and_nothing_else_does(
    database_url: str, provider: Provider
) -> None:
    async with start_service(database_url, provider.url, client_auth="api_key") as api:
        assert (await api.credit("ACME", 100)).status_code == 200
        key = await issue_key(api, "ACME")
        assert key["clientId"] == "ACME"
        assert re.fullmatch(r"key_[0-9a-f]{16}", key["keyId"])
        assert key["apiKey"].startswith("wk_")
        assert len(key["apiKey"]) > 40
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", key["createdAt"])

        allowed = await balance_as(api, "ACME", key["apiKey"])
        assert allowed.status_code == 200
        assert allowed.json()["data"]["balance"] == 100
        order = await api.order("ACME", 10, headers={"Authorization": f"Bearer {key['apiKey']}"})
        assert order.status_code == 201, order.text

        missing = await balance_as(api, "ACME", None)
        assert missing.status_code == 401
        assert missing.json()["code"] == "UNAUTHORIZED"
        other_scheme = await api.http.get(
            "/wallet/balance", headers={"client-id": "ACME", "Authorization": f"Basic {key['apiKey']}"}
        )
        assert other_scheme.status_code == 401
        wrong = await balance_as(api, "ACME", "wk_not-a-key")
        assert wrong.status_code == 403
        assert wrong.json() == {
            "success": False,
            "error": "API key is not valid for this client",
            "code": "INVALID_API_KEY",
        }
        refused_order = await api.order("ACME", 10)
        assert refused_order.status_code == 401
        assert (await balance_as(api, "ACME", key["apiKey"])).json()["data"]["balance"] == 90


async def test_a_key_works_only_for_the_client_it_was_issued_to(
    database_url: str, provider: Provider
) -> None:
    async with start_service(database_url, provider.url, client_auth="api_key") as api:
        await api.credit("ALICE", 50)
        await api.credit("BOB", 50)
        alice = await issue_key(api, "ALICE")
        bob = await issue_key(api, "BOB")
        assert (await balance_as(api, "ALICE", alice["apiKey"])).status_code == 200
        stolen = await balance_as(api, "BOB", alice["apiKey"])
        assert stolen.status_code == 403
        assert stolen.json()["code"] == "INVALID_API_KEY"
        spend = await api.order("ALICE", 50, headers={"Authorization": f"Bearer {bob['apiKey']}"})
        assert spend.status_code == 403
        assert (await balance_as(api, "ALICE", alice["apiKey"])).json()["data"]["balance"] == 50


async def test_the_admin_key_is_not_a_client_key(database_url: str, provider: Provider) -> None:
    async with start_service(database_url, provider.url, client_auth="api_key") as api:
        await api.credit("ACME", 50)
        await issue_key(api, "ACME")
        response = await balance_as(api, "ACME", ADMIN_KEY)
        assert response.status_code == 403
        assert response.json()["code"] == "INVALID_API_KEY"


async def test_a_revoked_key_is_refused(database_url: str, provider: Provider) -> None:
    async with start_service(database_url, provider.url, client_auth="api_key") as api:
        await api.credit("ACME", 50)
        await api.credit("OTHER", 50)
        key = await issue_key(api, "ACME")
        assert (await balance_as(api, "ACME", key["apiKey"])).status_code == 200

        # Only the owner's path revokes it.
        assert (await revoke(api, "OTHER", key["keyId"])).status_code == 404
        assert (await balance_as(api, "ACME", key["apiKey"])).status_code == 200

        revoked = await revoke(api, "ACME", key["keyId"])
        assert revoked.status_code == 200, revoked.text
        body = revoked.json()
        assert body["success"] is True
        assert body["message"] == "API key revoked successfully"
        assert body["data"]["keyId"] == key["keyId"]
        assert body["data"]["clientId"] == "ACME"
        assert body["data"]["revokedAt"] >= key["createdAt"]

        refused = await balance_as(api, "ACME", key["apiKey"])
        assert refused.status_code == 403
        assert refused.json()["code"] == "INVALID_API_KEY"
        again = await revoke(api, "ACME", key["keyId"])
        assert again.status_code == 200
        assert again.json()["data"]["revokedAt"] == body["data"]["revokedAt"]


async def test_rotation_old_and_new_keys_both_work_until_the_old_is_revoked(
    database_url: str, provider: Provider
) -> None:
    async with start_service(database_url, provider.url, client_auth="api_key") as api:
        await api.credit("ACME", 50)
        old = await issue_key(api, "ACME")
        new = await issue_key(api, "ACME")
        assert old["keyId"] != new["keyId"]
        assert old["apiKey"] != new["apiKey"]
        assert (await balance_as(api, "ACME", old["apiKey"])).status_code == 200
        assert (await balance_as(api, "ACME", new["apiKey"])).status_code == 200
        assert (await revoke(api, "ACME", old["keyId"])).status_code == 200
        assert (await balance_as(api, "ACME", old["apiKey"])).status_code == 403
        assert (await balance_as(api, "ACME", new["apiKey"])).status_code == 200


async def test_key_administration_errors(database_url: str, provider: Provider) -> None:
    async with start_service(database_url, provider.url, client_auth="api_key") as api:
        unknown = await api.http.post("/admin/clients/NOBODY/api-keys", headers=api.admin_headers)
        assert unknown.status_code == 404
        assert unknown.json()["code"] == "CLIENT_NOT_FOUND"
        malformed = await api.http.post("/admin/clients/bad%20id/api-keys", headers=api.admin_headers)
        assert malformed.status_code == 400
        assert malformed.json()["success"] is False
        assert (await api.http.post("/admin/clients/NOBODY/api-keys")).status_code == 401
        wrong_admin = await api.http.post(
            "/admin/clients/NOBODY/api-keys", headers={"Authorization": "Bearer not-the-admin-key"}
        )
        assert wrong_admin.status_code == 403
        await api.credit("ACME", 1)
        no_such_key = await revoke(api, "ACME", "key_0123456789abcdef")
        assert no_such_key.status_code == 404
        assert no_such_key.json()["code"] == "API_KEY_NOT_FOUND"
        assert (await revoke(api, "ACME", "not-a-key-id")).status_code == 404


async def test_header_mode_trusts_the_client_id_header(database_url: str, provider: Provider) -> None:
    async with start_service(database_url, provider.url, client_auth="header") as api:
        await api.credit("ACME", 50)
        assert (await balance_as(api, "ACME", None)).status_code == 200


async def test_keys_are_never_stored_in_clear(database_url: str, provider: Provider) -> None:
    """Every text-like column of every table is searched for the secret; its digest is there."""
    async with start_service(database_url, provider.url, client_auth="api_key") as api:
        await api.credit("ACME", 50)
        keys = [await issue_key(api, "ACME") for _ in range(2)]
        await revoke(api, "ACME", keys[0]["keyId"])
        for key in keys:
            await balance_as(api, "ACME", key["apiKey"])
            await api.order("ACME", 1, headers={"Authorization": f"Bearer {key['apiKey']}"})

    conn = await asyncpg.connect(plain_url(database_url))
    try:
        columns = await conn.fetch(
            """SELECT table_name, column_name FROM information_schema.columns
               WHERE table_schema = 'public'
                 AND data_type IN ('text', 'character varying', 'bytea', 'json', 'jsonb')"""
        )
        assert {(c["table_name"], c["column_name"]) for c in columns} >= {("api_keys", "key_hash")}
        haystack: list[bytes] = []
        for column in columns:
            name, table = column["column_name"], column["table_name"]
            query = f'SELECT "{name}" AS v FROM "{table}" WHERE "{name}" IS NOT NULL'  # noqa: S608 (catalog names)
            for row in await conn.fetch(query):
                value = row["v"]
                haystack.append(bytes(value) if isinstance(value, bytes) else str(value).encode())
        stored_digests = {bytes(r["key_hash"]) for r in await conn.fetch("SELECT key_hash FROM api_keys")}
    finally:
        await conn.close()

    for key in keys:
        secret = key["apiKey"].encode()
        assert hashlib.sha256(secret).digest() in stored_digests
        assert not any(secret in value for value in haystack)
        assert not any(secret[3:] in value for value in haystack)
