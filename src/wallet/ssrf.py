"""Webhook targets must not reach inside our network (server-side request forgery).

In production an endpoint is https and every address its name resolves to is public: checked
when it is registered, and again at each delivery by the resolver the delivery client connects
through (`PublicResolver`), so a name that later resolves elsewhere (DNS rebinding) is refused
at connect time: the address checked is the address connected to. WEBHOOK_ALLOW_PRIVATE=true
(development and tests) allows http and any address.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Any
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from wallet.errors import BadRequest

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class UnsafeTarget(OSError):
    """A webhook URL that would reach a private, loopback or otherwise non-public address."""


def is_public(address: str) -> bool:
    """Globally routable unicast only: not private, loopback, link-local, multicast, reserved or
    unspecified, in IPv4 or IPv6, IPv4-mapped and IPv4-compatible IPv6 judged as their IPv4."""
    try:
        ip: IpAddress = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None:
            ip = embedded
    return bool(ip.is_global) and not ip.is_multicast and not ip.is_reserved


def _host_port(url: str, allow_private: bool) -> tuple[str, int]:
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError:  # an unbalanced [ or ], a port that is no number
        raise UnsafeTarget("webhook URL is not a valid URL") from None
    schemes = ("https", "http") if allow_private else ("https",)
    if parts.scheme not in schemes:
        raise UnsafeTarget(f"webhook URLs must be {' or '.join(schemes)}")
    if not host or parts.username is not None or parts.password is not None:
        raise UnsafeTarget("webhook URLs need a host and no credentials")
    if port == 0:  # `:0` is no port to call; it was read as the scheme's default
        raise UnsafeTarget("webhook URL port must be 1-65535")
    return host, port or (443 if parts.scheme == "https" else 80)


async def check_url(url: str, *, allow_private: bool) -> None:
    """Raise UnsafeTarget unless `url` may be called now (its scheme, and each address its host
    resolves to). Used at registration and before each delivery."""
    host, port = _host_port(url, allow_private)
    if allow_private:
        return
    try:
        ipaddress.ip_address(host)
        addresses = [host]
    except ValueError:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:  # UnicodeError: a name IDNA cannot encode
            raise UnsafeTarget(f"webhook host {host} does not resolve") from exc
        addresses = [str(info[4][0]) for info in infos]
    refused = [a for a in addresses if not is_public(a)]
    if refused or not addresses:
        raise UnsafeTarget(f"webhook host {host} resolves to a non-public address ({', '.join(refused)})")


async def validate_registration(url: str, *, allow_private: bool) -> None:
    """check_url as a 400 for the API."""
    if len(url) > 2048:
        raise BadRequest("url: at most 2048 characters", code="INVALID_WEBHOOK_URL")
    try:
        await check_url(url, allow_private=allow_private)
    except UnsafeTarget as exc:
        raise BadRequest(f"url: {exc}", code="INVALID_WEBHOOK_URL") from None


class PublicResolver(AbstractResolver):
    """The delivery client's resolver: every address of the name must be public, and only those
    are returned, so aiohttp connects to an address that was checked."""

    def __init__(self) -> None:
        self._inner = DefaultResolver()

    async def resolve(self, host: str, port: int = 0, family: Any = socket.AF_INET) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        refused = [r["host"] for r in results if not is_public(r["host"])]
        if refused or not results:
            raise UnsafeTarget(f"webhook host {host} resolves to a non-public address ({', '.join(refused)})")
        return results

    async def close(self) -> None:
        await self._inner.close()
