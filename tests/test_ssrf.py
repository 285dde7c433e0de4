"""Webhook targets (SPEC §6): https and public only in production, at registration and at each
delivery, names judged by every address they resolve to."""

from __future__ import annotations

import pytest

from tests.builders import Commits, Provider, start_receiver, start_service
from wallet import ssrf


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",  # noqa: S104 - an address to refuse, not one to bind
        "224.0.0.1",
        "240.0.0.1",
        "255.255.255.255",
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "2002:7f00:1::",  # 6to4 of 127.0.0.1
        "not-an-address",
    ],
)
def test_non_public_addresses_are_refused(address: str) -> None:
    assert not ssrf.is_public(address)


@pytest.mark.parametrize("address", ["93.184.215.14", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_are_allowed(address: str) -> None:
    assert ssrf.is_public(address)


@pytest.mark.parametrize(
    "url",
    [
        "https://127.0.0.1/hook",
        "https://localhost/hook",  # a name that resolves to loopback
        "https://[::1]/hook",
        "https://169.254.169.254/latest/meta-data",
        "https://10.0.0.8:8443/hook",
        "http://93.184.215.14/hook",  # public, but not https
        "https://user:pass@93.184.215.14/hook",
        "https://exa]mple.com/",  # not a URL at all: refused, not a crash
        "https://93.184.215.14:0/hook",  # no port to call (it was read as 443)
        "https://\u00e4\ud94f\udfa6.example/",  # a name IDNA cannot encode
    ],
)
async def test_production_refuses_unsafe_urls(url: str) -> None:
    with pytest.raises(ssrf.UnsafeTarget):
        await ssrf.check_url(url, allow_private=False)


async def test_registration_refuses_private_targets_unless_allowed(
    database_url: str, provider: Provider
) -> None:
    async with start_service(database_url, provider.url, webhook_allow_private=False) as api:
        await api.credit("C1", 1)
        for url in (
            "https://localhost/hook",
            "https://127.0.0.1/hook",
            "https://[fe80::1]/x",
            "http://localhost/",
        ):
            refused = await api.http.post(
                "/webhook-endpoints", json={"url": url}, headers={"client-id": "C1"}
            )
            assert refused.status_code == 400, url
            assert refused.json()["code"] == "INVALID_WEBHOOK_URL"
    async with start_service(database_url, provider.url, webhook_allow_private=True) as api:
        allowed = await api.http.post(
            "/webhook-endpoints", json={"url": "http://localhost/"}, headers={"client-id": "C1"}
        )
        assert allowed.status_code == 201


async def test_each_delivery_checks_the_target_again(
    database_url: str, commits: Commits, provider: Provider
) -> None:
    """An endpoint registered while allowed (or whose name now resolves elsewhere) is refused at
    delivery time, before any connection: the receiver never hears of it."""
    async with start_receiver() as receiver:
        async with start_service(database_url, provider.url, webhook_allow_private=True) as api:
            await api.credit("C1", 1)
            created = await api.http.post(
                "/webhook-endpoints", json={"url": receiver.url}, headers={"client-id": "C1"}
            )
            endpoint_id = created.json()["data"]["id"]
        async with start_service(
            database_url, provider.url, webhook_allow_private=False, webhook_interval_seconds=0.05
        ) as api:
            await api.debit("C1", 1)
            path = f"/webhook-endpoints/{endpoint_id}/deliveries"

            async def refused() -> bool:
                attempts = (await api.http.get(path, headers={"client-id": "C1"})).json()["data"]
                return bool(attempts) and attempts[0]["error"].startswith("refused:")

            await commits.until(refused, what="a refused delivery attempt")
        assert receiver.got == []
