"""Who may call: the admin bearer key, and client API keys (CLIENT_AUTH=api_key) issued,
rotated and revoked by the admin; a key is never kept in clear. Each server process caches the
keys it verified, and a revocation however made reaches every process within a second."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx

from tests.builders import ADMIN_KEY, Api, Provider, ServerProcess, spawn_service, start_service
from tests.servers import relay
from tests.test_batching import batch_sizes
from tests.test_workers import metric
from wallet.auth import ClientAuthenticator
from wallet.database import create_engine, plain_url
from wallet.keycache import APPLICATION_NAME
from wallet.settings import ClientAuth


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
        assert missing.headers["WWW-Authenticate"] == "Bearer"
        # Credentials first: no key is a 401 whatever else the request lacks.
        for headers in ({}, {"client-id": "not valid!"}):
            anonymous = await api.http.get("/wallet/balance", headers=headers)
            assert anonymous.status_code == 401, headers
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


async def test_keys_checked_in_one_pass_are_looked_up_in_one_query(
    database_url: str, provider: Provider
) -> None:
    """Keys no cache knows (a cold start, a cleared cache) are asked for together: one query
    answers every check of an event-loop pass, each with its own verdict."""
    async with start_service(database_url, provider.url, client_auth="api_key") as api:
        for client_id in ("ALICE", "BOB"):
            await api.credit(client_id, 10)
        alice, bob, gone = [await issue_key(api, client) for client in ("ALICE", "BOB", "BOB")]
        assert (await revoke(api, "BOB", gone["keyId"])).status_code == 200
    engine = create_engine(database_url, pool_size=2)
    try:
        clients = ClientAuthenticator(engine, ClientAuth.API_KEY)
        asked = [
            ("ALICE", alice["apiKey"]),
            ("BOB", bob["apiKey"]),
            ("BOB", alice["apiKey"]),  # someone else's key
            ("BOB", gone["apiKey"]),  # revoked
            ("ALICE", "wk_no-such-key"),
            ("ALICE", alice["apiKey"]),
        ]
        batches = batch_sizes("api_key")
        answers = await asyncio.gather(
            *(clients.authenticate(c, k) for c, k in asked), return_exceptions=True
        )
        assert batch_sizes("api_key") == (batches[0] + 1, batches[1] + len(asked))
        assert [a if isinstance(a, str) else getattr(a, "error_code", a) for a in answers] == [
            "ALICE",
            "BOB",
            "INVALID_API_KEY",
            "INVALID_API_KEY",
            "INVALID_API_KEY",
            "ALICE",
        ]
    finally:
        await engine.dispose()


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
        no_admin_key = await api.http.post("/admin/clients/NOBODY/api-keys")
        assert no_admin_key.status_code == 401
        assert no_admin_key.headers["WWW-Authenticate"] == "Bearer"
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


@contextlib.asynccontextmanager
async def other_server(
    database_url: str, listen_url: str, provider: Provider
) -> AsyncIterator[tuple[ServerProcess, Api]]:
    """`wallet serve` as a process of its own (one worker) on the same database, listening for
    key changes at `listen_url` (PostgreSQL itself: with DB_POOLER=transaction `database_url` is
    PgBouncer's, where no session stays ours)."""
    env = {
        "DATABASE_URL": database_url,
        "DATABASE_LISTEN_URL": listen_url,
        "CLIENT_AUTH": "api_key",
        "ADMIN_API_KEY": ADMIN_KEY,
        "FULFILLMENT_API_URL": provider.url,
        "WORKERS": "1",
        "RATE_LIMIT": "off",
        "LOG_LEVEL": "info",
    }
    async with spawn_service(env) as server, httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        yield server, Api(http)


async def listening(server: ServerProcess, times: int = 1) -> None:
    """Until the server's key cache has subscribed to key changes `times` times."""
    async with asyncio.timeout(30):
        await server.wait_for("api key cache listening", count=times)


async def key_cache(api: Api) -> dict[str, float]:
    """The server's key cache as its /metrics tell it: checks by result, and whether it listens."""
    text = (await api.http.get("/metrics")).text
    counts = {r: metric(text, "wallet_api_key_cache_total", result=r) for r in ("hit", "miss", "bypass")}
    return {**counts, "listening": metric(text, "wallet_api_key_cache_listening")}


async def until_cached(api: Api, client_id: str, key: str) -> None:
    """Use the key until the server answers it from its cache (a hit counted)."""
    async with asyncio.timeout(30):
        while True:
            hits = (await key_cache(api))["hit"]
            assert (await balance_as(api, client_id, key)).status_code == 200
            if (await key_cache(api))["hit"] > hits:
                return


async def refused_within(api: Api, client_id: str, key: str, seconds: float) -> None:
    """Use the key until it is refused; fail if a request sent more than `seconds` after the
    call is still let in."""
    start = time.monotonic()
    while True:
        sent = time.monotonic() - start
        response = await balance_as(api, client_id, key)
        if response.status_code == 403:
            assert response.json()["code"] == "INVALID_API_KEY"
            return
        assert response.status_code == 200, response.text
        assert sent <= seconds, f"the key was still accepted {sent:.2f} s after it was revoked"


async def test_a_key_revoked_on_one_server_is_refused_by_another_within_a_second(
    database_url: str, direct_database_url: str, provider: Provider
) -> None:
    async with (
        start_service(database_url, provider.url, client_auth="api_key") as api,
        other_server(database_url, direct_database_url, provider) as (server, other),
    ):
        await api.credit("ACME", 50)
        key = await issue_key(api, "ACME")
        kept = await issue_key(api, "ACME")
        await listening(server)
        await until_cached(other, "ACME", key["apiKey"])
        await until_cached(other, "ACME", kept["apiKey"])

        assert (await revoke(api, "ACME", key["keyId"])).status_code == 200
        await refused_within(other, "ACME", key["apiKey"], seconds=1.0)
        assert (await balance_as(other, "ACME", kept["apiKey"])).status_code == 200
        # A key never issued is refused by the query every time: refusals are not cached.
        for _ in range(2):
            assert (await balance_as(other, "ACME", "wk_never-issued")).status_code == 403
        # A new key works at once, on a server that has cached others.
        new = await issue_key(api, "ACME")
        assert (await balance_as(other, "ACME", new["apiKey"])).status_code == 200


async def test_the_server_that_revokes_a_key_refuses_it_at_once(
    database_url: str, direct_database_url: str, provider: Provider
) -> None:
    """Even before it hears the change: its listening session is stalled (nothing reaches it) while
    the key, cached, is revoked and used again. The cache trusts a stalled session for less than a
    second, so each try checks that the cache was still trusted (the use was a miss: looked for in
    the cache, not there) and tries again with a new key when the machine was too slow for that."""
    async with (
        relay(direct_database_url) as path,
        other_server(database_url, path.url, provider) as (server, api),
    ):
        await api.credit("ACME", 50)
        await listening(server)
        for _ in range(10):
            key = await issue_key(api, "ACME")
            await until_cached(api, "ACME", key["apiKey"])
            path.flowing.clear()
            try:
                before = await key_cache(api)
                assert (await revoke(api, "ACME", key["keyId"])).status_code == 200
                refused = await balance_as(api, "ACME", key["apiKey"])
                after = await key_cache(api)
            finally:
                path.flowing.set()
            assert refused.status_code == 403, refused.text
            if after["miss"] > before["miss"]:
                return
        raise AssertionError("the cache was never trusted when the key was used after its revocation")


async def test_keys_revoked_or_deleted_by_sql_are_refused_within_a_second(
    database_url: str, direct_database_url: str, provider: Provider
) -> None:
    """An operator's SQL is a revocation too: the table announces every change, not the API."""
    async with other_server(database_url, direct_database_url, provider) as (server, api):
        await api.credit("ACME", 50)
        revoked, deleted, kept = [await issue_key(api, "ACME") for _ in range(3)]
        await listening(server)
        for key in (revoked, deleted, kept):
            await until_cached(api, "ACME", key["apiKey"])

        conn = await asyncpg.connect(plain_url(direct_database_url))
        try:
            await conn.execute("UPDATE api_keys SET revoked_at = now() WHERE key_id = $1", revoked["keyId"])
            await refused_within(api, "ACME", revoked["apiKey"], seconds=1.0)
            await conn.execute("DELETE FROM api_keys WHERE key_id = $1", deleted["keyId"])
            await refused_within(api, "ACME", deleted["apiKey"], seconds=1.0)
        finally:
            await conn.close()
        assert (await balance_as(api, "ACME", kept["apiKey"])).status_code == 200


async def test_without_its_listener_a_server_checks_every_key_in_the_database(
    database_url: str, direct_database_url: str, provider: Provider
) -> None:
    """The listening session is killed and cannot come back (its network path refuses new
    connections): the cache is dropped and bypassed, so a revocation it cannot hear still takes
    effect at once; once the session is back, the cache serves and hears revocations again."""
    async with (
        relay(direct_database_url) as path,
        start_service(database_url, provider.url, client_auth="api_key", api_key_cache_size=0) as api,
        other_server(database_url, path.url, provider) as (server, other),
    ):
        await api.credit("ACME", 50)
        first, second = await issue_key(api, "ACME"), await issue_key(api, "ACME")
        await listening(server)
        await until_cached(other, "ACME", first["apiKey"])
        assert (await key_cache(other))["listening"] == 1

        path.accepting = False
        conn = await asyncpg.connect(plain_url(direct_database_url))
        try:
            pids = await conn.fetch(
                "SELECT pid FROM pg_stat_activity"
                " WHERE datname = current_database() AND application_name = $1",
                APPLICATION_NAME,
            )
            assert len(pids) == 1, pids  # the other server's: this one has no cache
            assert await conn.fetchval("SELECT pg_terminate_backend($1, 10000)", pids[0]["pid"])
        finally:
            await conn.close()
        async with asyncio.timeout(30):
            await server.wait_for("api key cache listener lost")

        before = await key_cache(other)
        for _ in range(3):
            assert (await balance_as(other, "ACME", first["apiKey"])).status_code == 200
        after = await key_cache(other)
        assert after["listening"] == 0
        assert after["hit"] == before["hit"]
        assert after["bypass"] == before["bypass"] + 3
        assert (await revoke(api, "ACME", first["keyId"])).status_code == 200
        assert (await balance_as(other, "ACME", first["apiKey"])).status_code == 403

        path.accepting = True
        await listening(server, times=2)
        assert (await key_cache(other))["listening"] == 1
        await until_cached(other, "ACME", second["apiKey"])
        assert (await revoke(api, "ACME", second["keyId"])).status_code == 200
        await refused_within(other, "ACME", second["apiKey"], seconds=1.0)
