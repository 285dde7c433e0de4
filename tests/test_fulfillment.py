"""What each provider answer proves (SPEC §4.3), case by case, against real loopback servers:
a provider that answers with exactly the bytes a case needs, drops the connection after reading
the request, or never answers; and a port where nothing listens."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.builders import HANG, RESET, RawServer, dead_url, http_answer, raw_server
from wallet.fulfillment import Failure, Kind, Outcome, Provider, new_http_client
from wallet.settings import Settings

ORDER_ID = "ORD-1703251234567-a1b2c3d4"


def reply(behaviour: str) -> bytes | str:
    """'STATUS BODY' as the bytes of that answer; RESET and HANG as they are."""
    if behaviour in (RESET, HANG):
        return behaviour
    status, _, payload = behaviour.partition(" ")
    return http_answer(f"{status} X", payload.encode())


@contextlib.asynccontextmanager
async def raw_provider(*behaviours: str) -> AsyncIterator[tuple[str, RawServer]]:
    async with raw_server(*map(reply, behaviours)) as served:
        yield served


@contextlib.asynccontextmanager
async def provider_client(url: str, **settings: Any) -> AsyncIterator[Provider]:
    """The service's client of the provider at `url`, with `settings` (a raw provider answers at
    once, so a short timeout)."""
    config = Settings(
        database_url="postgresql://unused/x",
        fulfillment_api_url=url,
        fulfillment_timeout_seconds=0.3,
        **settings,
    )
    async with new_http_client(config) as http:
        yield Provider(config, http)


async def fulfill(url: str, attempts: int, status_url: str | None = None) -> Outcome:
    async with provider_client(
        url,
        fulfillment_status_url=status_url,
        fulfillment_max_attempts=attempts,
        fulfillment_backoff_seconds=0.01,
    ) as client:
        return await client.fulfill(ORDER_ID, "C1", 1050)


CASES = [
    ('201 {"id": 7}', Kind.FULFILLED, None),
    ('200 {"id": "ff-1", "extra": true}', Kind.FULFILLED, None),
    # A 2xx whose id is unusable: the provider took the order, so even FULFILLMENT_ON_UNKNOWN=
    # refund never refunds it (no failure to refund it with).
    ("201 {}", Kind.UNKNOWN, None),  # a 2xx without an id
    ('201 {"id": null}', Kind.UNKNOWN, None),
    ('201 {"id": " "}', Kind.UNKNOWN, None),  # blank: nothing to match it by
    ('201 {"id": "a\\u0000b"}', Kind.UNKNOWN, None),  # a NUL cannot be stored
    ('201 {"id": "\\ud800"}', Kind.UNKNOWN, None),  # a lone surrogate
    ("200 <html>ok</html>", Kind.UNKNOWN, None),  # a 2xx whose body is not JSON
    ('400 {"error": "bad"}', Kind.REFUSED, Failure.PROVIDER_ERROR),
    ("404 {}", Kind.REFUSED, Failure.PROVIDER_ERROR),
    ("422 {}", Kind.REFUSED, Failure.PROVIDER_ERROR),
    ("408 {}", Kind.UNKNOWN, Failure.PROVIDER_ERROR),
    ("409 {}", Kind.UNKNOWN, Failure.PROVIDER_ERROR),
    ("425 {}", Kind.UNKNOWN, Failure.PROVIDER_ERROR),
    ("429 {}", Kind.UNKNOWN, Failure.PROVIDER_ERROR),
    ("500 {}", Kind.UNKNOWN, Failure.PROVIDER_ERROR),
    ("502 {}", Kind.UNKNOWN, Failure.PROVIDER_ERROR),
    ("503 {}", Kind.UNKNOWN, Failure.PROVIDER_ERROR),
    ("504 {}", Kind.UNKNOWN, Failure.PROVIDER_ERROR),
    ("reset", Kind.UNKNOWN, Failure.UNREACHABLE),  # reset after the request was written
    ("hang", Kind.UNKNOWN, Failure.UNREACHABLE),  # sent, then no answer in time
]


@pytest.mark.parametrize(
    ("behaviour", "kind", "failure"), CASES, ids=[c[0].split(" ")[0] + "-" + c[1] for c in CASES]
)
async def test_each_answer_is_classified_by_what_it_proves(
    behaviour: str, kind: Kind, failure: Failure | None
) -> None:
    async with raw_provider(behaviour) as (url, provider):
        outcome = await fulfill(url, attempts=2)
    assert outcome.kind is kind
    assert outcome.failure is failure
    # Fulfilled and refused are final at once; only an unknown answer is asked again.
    assert len(provider.requests) == outcome.attempts == (2 if kind is Kind.UNKNOWN else 1)
    assert all(f"Idempotency-Key: {ORDER_ID}".encode() in r for r in provider.requests)


async def test_nothing_listening_on_every_attempt_is_refused_as_never_sent() -> None:
    outcome = await fulfill(dead_url(), attempts=3)
    assert outcome.kind is Kind.REFUSED
    assert outcome.failure is Failure.UNREACHABLE
    assert outcome.attempts == 3


async def test_a_call_that_may_have_landed_is_never_undone_by_a_later_unreachable_one() -> None:
    """The first attempt was sent and went unanswered; the provider then vanishes. The first
    attempt may have been carried out, so the order is not refused."""
    async with (
        raw_provider("hang") as (url, provider),
        provider_client(url, fulfillment_max_attempts=1) as client,
    ):
        first = await client.fulfill(ORDER_ID, "C1", 1050)
        client._url = dead_url()  # the provider is gone now
        again = await client.ask_again(ORDER_ID, "C1", 1050)
    assert first.kind is Kind.UNKNOWN
    assert again.kind is Kind.UNKNOWN
    assert len(provider.requests) == 1


@pytest.mark.parametrize(
    "literal", ["123456789012345678901234567890", "18446744073709551615", "-5", "1e300", "1.50"]
)
async def test_a_numeric_id_is_kept_as_the_provider_wrote_it(literal: str) -> None:
    """SPEC §4.2: the id becomes fulfillmentId as a string; a reconciliation against the
    provider matches it only if no digit was rounded on the way."""
    async with raw_provider(f'201 {{"id": {literal}}}') as (url, _):
        outcome = await fulfill(url, attempts=1)
    assert outcome.kind is Kind.FULFILLED
    assert outcome.fulfillment_id == literal


async def test_an_unknown_answer_then_a_success_is_fulfilled() -> None:
    async with raw_provider("503 {}", "reset", '201 {"id": 42}') as (url, provider):
        outcome = await fulfill(url, attempts=3)
    assert outcome.kind is Kind.FULFILLED
    assert outcome.fulfillment_id == "42"
    assert len(provider.requests) == 3


@pytest.mark.parametrize(
    ("lookup", "kind", "posts"),
    [
        ('200 {"id": "ff-9"}', Kind.FULFILLED, 0),  # the provider has it: no second POST
        ("404 {}", Kind.REFUSED, 0),  # the provider never received it: never carried out
        ("500 {}", Kind.FULFILLED, 1),  # the lookup proves nothing: ask again with the same key
    ],
)
async def test_the_resolver_looks_the_order_up_first_when_it_can(lookup: str, kind: Kind, posts: int) -> None:
    async with (
        raw_provider('201 {"id": "ff-9"}') as (url, poster),
        raw_provider(lookup) as (status_url, looker),
        provider_client(url, fulfillment_status_url=status_url) as client,
    ):
        outcome = await client.ask_again(ORDER_ID, "C1", 1050)
    assert outcome.kind is kind
    assert len(poster.requests) == posts
    assert looker.requests[0].startswith(f"GET /fulfillments/{ORDER_ID} ".encode())
    if kind is Kind.REFUSED:
        assert outcome.failure is Failure.UNREACHABLE


async def test_nothing_found_while_an_earlier_call_may_still_arrive_proves_nothing() -> None:
    """The provider has no record yet, but the request's last POST may still be on its way (in
    a queue, a buffer): refunding now could refund an order carried out a moment later. Posting
    again would only restart that wait, so nothing is sent: the order is asked about again once
    the answer would prove "never received"."""
    async with (
        raw_provider('201 {"id": "ff-3"}') as (url, poster),
        raw_provider("404 {}") as (status_url, looker),
        provider_client(url, fulfillment_status_url=status_url) as client,
    ):
        soon = datetime.now(UTC) + timedelta(seconds=60)
        outcome = await client.ask_again(ORDER_ID, "C1", 1050, quiet_since=soon)
        long_ago = datetime.now(UTC) - timedelta(seconds=60)
        settled = await client.ask_again(ORDER_ID, "C1", 1050, quiet_since=long_ago)
    assert outcome.kind is Kind.UNKNOWN
    assert outcome.sent_by == soon  # the earlier calls' deadline stands: this one sent nothing
    assert poster.requests == []
    assert settled.kind is Kind.REFUSED  # nothing found long after the last call: never received
    assert settled.failure is Failure.UNREACHABLE
    assert len(looker.requests) == 2
