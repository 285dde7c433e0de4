"""The provider client against real loopback servers: what it sends, how it reads each way an
HTTP/1.1 answer can be framed, when it keeps a connection, and what it says when no connection
could be made (the one fact `fulfillment.classify_error` needs from it)."""

from __future__ import annotations

import asyncio
import base64
import datetime
import gzip
import ipaddress
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.builders import dead_url, http_answer, raw_server
from wallet.provider_client import MAX_ANSWER_BYTES, NotSent, ProviderClient

BODY = b'{"id": "ff-1"}'


async def call(client: ProviderClient, url: str) -> tuple[int, bytes]:
    return await client.request("POST", url, b'{"orderId": "o-1"}', {"Idempotency-Key": "o-1"})


async def test_a_request_goes_out_whole_with_its_headers() -> None:
    async with (
        raw_server(http_answer("201 Created", BODY)) as (url, server),
        ProviderClient(timeout=2) as client,
    ):
        assert await call(client, url) == (201, BODY)
    sent = server.requests[0]
    assert sent.startswith(b"POST /fulfillments HTTP/1.1\r\n")
    port = url.rsplit(":", 1)[1].split("/")[0]
    for header in (f"Host: localhost:{port}", "Idempotency-Key: o-1", "Content-Length: 18"):
        assert f"\r\n{header}\r\n".encode() in sent
    assert sent.endswith(b'\r\n\r\n{"orderId": "o-1"}')


async def test_credentials_in_the_url_are_sent_as_basic_authentication() -> None:
    async with (
        raw_server(http_answer("201 Created", BODY)) as (url, server),
        ProviderClient(timeout=2) as client,
    ):
        with_credentials = url.replace("//", "//shop%40example:s3cret@", 1)
        assert await call(client, with_credentials) == (201, BODY)
    expected = base64.b64encode(b"shop@example:s3cret").decode()
    assert f"\r\nAuthorization: Basic {expected}\r\n".encode() in server.requests[0]
    assert b"s3cret" not in server.requests[0].split(b"\r\n")[0]  # not in the request line


async def test_calls_one_after_another_share_one_connection() -> None:
    answers = [http_answer("201 Created", b'{"id": %d}' % n) for n in range(3)]
    async with raw_server(*answers) as (url, server), ProviderClient(timeout=2) as client:
        got = [await call(client, url) for _ in range(3)]
    assert got == [(201, b'{"id": %d}' % n) for n in range(3)]
    assert server.connections == 1


async def test_an_answer_that_ends_with_the_connection_is_read_whole() -> None:
    until_close = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + BODY
    async with raw_server(until_close, close=True) as (url, server), ProviderClient(timeout=2) as client:
        assert await call(client, url) == (200, BODY)
        assert await call(client, url) == (200, BODY)  # on a new connection: that one ended
    assert server.connections == 2


async def test_a_chunked_answer_is_joined() -> None:
    chunked = http_answer(
        "201 Created",
        b"5\r\n" + BODY[:5] + b"\r\n9\r\n" + BODY[5:] + b"\r\n0\r\n\r\n",
        "Transfer-Encoding: chunked",
    )
    async with raw_server(chunked) as (url, _), ProviderClient(timeout=2) as client:
        assert await call(client, url) == (201, BODY)


async def test_a_compressed_answer_is_decoded() -> None:
    zipped = http_answer("201 Created", gzip.compress(BODY), "Content-Encoding: gzip")
    async with raw_server(zipped) as (url, _), ProviderClient(timeout=2) as client:
        assert await call(client, url) == (201, BODY)


async def test_an_informational_answer_is_not_taken_for_the_answer() -> None:
    early = b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" + http_answer("201 Created", BODY)
    async with raw_server(early) as (url, _), ProviderClient(timeout=2) as client:
        assert await call(client, url) == (201, BODY)


@pytest.mark.parametrize(
    "broken",
    [
        b"HTTP/1.1 201 Created\r\nContent-Length: 40\r\n\r\n" + BODY,  # cut short, then closed
        b"NOT HTTP AT ALL\r\n\r\n",
        http_answer("201 Created", b"not gzip", "Content-Encoding: gzip"),
        http_answer("201 Created", gzip.compress(BODY)[:-12], "Content-Encoding: gzip"),  # its end cut off
        http_answer("201 Created", b" " * (MAX_ANSWER_BYTES + 1)),
        http_answer("201 Created", gzip.compress(b" " * (MAX_ANSWER_BYTES + 1)), "Content-Encoding: gzip"),
    ],
    ids=["cut-short", "not-http", "bad-gzip", "gzip-cut-short", "too-large", "too-large-once-inflated"],
)
async def test_a_broken_answer_is_a_connection_error_not_a_status(broken: bytes) -> None:
    async with raw_server(broken, close=True) as (url, _), ProviderClient(timeout=2) as client:
        with pytest.raises(ConnectionError):
            await call(client, url)


async def test_no_connection_is_not_sent() -> None:
    async with ProviderClient(timeout=2) as client:
        with pytest.raises(NotSent):
            await call(client, dead_url())


async def test_an_answer_that_never_comes_is_a_timeout_after_sending() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)  # accepts, never answers
    port = server.sockets[0].getsockname()[1]
    async with server, ProviderClient(timeout=0.2) as client:
        with pytest.raises(TimeoutError):
            await call(client, f"http://127.0.0.1:{port}/fulfillments")


def self_signed(tmp: Path) -> tuple[ssl.SSLContext, Path]:
    """A server context for localhost with a fresh self-signed certificate, and that certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp / "cert.pem", tmp / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return context, cert_file


async def test_https_is_verified_against_the_system_trust(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tls, cert = self_signed(tmp_path)
    async with raw_server(http_answer("201 Created", BODY), tls=tls) as (url, server):
        # Not trusted: the handshake fails before a byte of the request is sent.
        async with ProviderClient(timeout=2) as client:
            with pytest.raises(NotSent):
                await call(client, url)
        assert server.requests == []
        # Trusted (OpenSSL reads SSL_CERT_FILE when the client's context is made): answered.
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        async with ProviderClient(timeout=2) as client:
            assert await call(client, url) == (201, BODY)
