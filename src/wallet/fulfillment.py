"""The calls to the fulfillment provider, and what each answer proves (SPEC §4.3).

Every answer is one of three kinds:

- fulfilled: a 2xx with an id. Final.
- refused: the provider rejected the order (a 4xx other than 408, 409, 425, 429), or the
  request provably never reached it (the connection could not be made, so not a byte was sent)
  on every attempt. Final: the money may go back.
- unknown: anything else (a timeout after sending, a connection lost before the answer, a 5xx,
  408/409/425/429, a 2xx without a usable id). The provider may have carried the order out, so
  the money stays held until a later call finds out.

`classify` is the only place that decides this. Every call carries the same
`Idempotency-Key: <orderId>`, so asking again can never fulfil an order twice.

The calls go through `provider_client` (why not aiohttp or httpx: there).
"""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum

import orjson
import structlog

from wallet import observability
from wallet.money import from_cents
from wallet.provider_client import NotSent, ProviderClient
from wallet.settings import Settings

log = structlog.get_logger(__name__)

# 4xx answers that say "not now" rather than "no": the order may still be carried out.
NOT_A_REFUSAL = frozenset({408, 409, 425, 429})


class Kind(StrEnum):
    FULFILLED = "fulfilled"
    REFUSED = "refused"
    UNKNOWN = "unknown"


class Failure(StrEnum):
    """Why a FAILED order failed; stored on the order, and what its answer's status says."""

    PROVIDER_ERROR = "PROVIDER_ERROR"  # the provider refused it -> 502
    UNREACHABLE = "UNREACHABLE"  # it never reached the provider -> 503
    RESOLVED_FAILED = "RESOLVED_FAILED"  # an operator found it was not carried out -> 502


@dataclass(frozen=True, slots=True)
class Answer:
    """What one call proved."""

    kind: Kind
    detail: str
    fulfillment_id: str | None = None
    status: int | None = None  # the provider's HTTP status, if it answered at all
    reached: bool = True  # False only when the request provably never left


def _usable(provider_id: str) -> bool:
    """An id an operator can read back and match: not blank, no control characters (a NUL cannot
    even be stored) and no lone surrogates."""
    return bool(provider_id.strip()) and provider_id.isprintable()


def classify(status: int, body: bytes) -> Answer:
    """The provider answered `status` with `body`."""
    if 200 <= status < 300:
        try:
            provider_id = orjson.loads(body)["id"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return Answer(Kind.UNKNOWN, f"provider answered {status} without an id", status=status)
        if isinstance(provider_id, float):  # orjson reads an integer past 64 bits as a float too:
            provider_id = json.loads(body, parse_float=str, parse_int=str)["id"]  # the id as written
        if (
            not isinstance(provider_id, str | int)
            or isinstance(provider_id, bool)
            or not _usable(str(provider_id))
        ):
            return Answer(Kind.UNKNOWN, f"provider answered {status} with an unusable id", status=status)
        fulfillment_id = str(provider_id)[:256]
        return Answer(Kind.FULFILLED, f"provider answered {status}", fulfillment_id, status=status)
    if 400 <= status < 500 and status not in NOT_A_REFUSAL:
        return Answer(Kind.REFUSED, f"provider refused the order: {status}", status=status)
    return Answer(Kind.UNKNOWN, f"provider answered {status}", status=status)


def classify_error(exc: BaseException, timeout: float) -> Answer:
    """The call raised `exc` instead of answering."""
    if isinstance(exc, NotSent):
        # No connection was made (refused, name or TLS failure, connect timeout): nothing was sent.
        return Answer(Kind.REFUSED, f"not sent: {type(exc).__name__}: {exc}", reached=False)
    if isinstance(exc, TimeoutError):
        return Answer(Kind.UNKNOWN, f"no answer within {timeout}s")
    return Answer(Kind.UNKNOWN, f"{type(exc).__name__}: {exc}")


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the calls for one order proved, taken together."""

    kind: Kind
    attempts: int
    detail: str
    fulfillment_id: str | None = None
    failure: Failure | None = None  # for REFUSED; for UNKNOWN, what a refund would say (None: never)
    # Set when nothing was sent, so the earlier calls' deadline stands: the provider's "no record"
    # came too early to prove anything, and proves "never received" one timeout after this.
    sent_by: datetime | None = None


def _combine(answers: list[Answer]) -> Outcome:
    last = answers[-1]
    if last.kind is Kind.FULFILLED:
        return Outcome(Kind.FULFILLED, len(answers), last.detail, fulfillment_id=last.fulfillment_id)
    if last.kind is Kind.REFUSED and last.reached:
        return Outcome(Kind.REFUSED, len(answers), last.detail, failure=Failure.PROVIDER_ERROR)
    if all(not a.reached for a in answers):
        return Outcome(Kind.REFUSED, len(answers), last.detail, failure=Failure.UNREACHABLE)
    # Some call may have reached the provider. If the money has to go back regardless
    # (FULFILLMENT_ON_UNKNOWN=refund), say 502 if it ever answered, 503 if it never did; but a
    # provider that answered 2xx accepted the order (only its id was unusable): never refunded.
    if any(a.status is not None and 200 <= a.status < 300 for a in answers):
        return Outcome(Kind.UNKNOWN, len(answers), last.detail)
    answered = any(a.status is not None for a in answers)
    failure = Failure.PROVIDER_ERROR if answered else Failure.UNREACHABLE
    return Outcome(Kind.UNKNOWN, len(answers), last.detail, failure=failure)


def new_http_client(settings: Settings) -> ProviderClient:
    """One client per process, with a keep-alive pool; created inside the running loop."""
    return ProviderClient(timeout=settings.fulfillment_timeout_seconds)


class Provider:
    def __init__(self, settings: Settings, http: ProviderClient) -> None:
        assert settings.fulfillment_api_url is not None
        self._url = settings.fulfillment_api_url
        self._status_url = settings.fulfillment_status_url
        self._http = http
        self._timeout = settings.fulfillment_timeout_seconds
        self._max_attempts = settings.fulfillment_max_attempts
        self._backoff = settings.fulfillment_backoff_seconds

    async def fulfill(
        self, order_id: str, client_id: str, amount: int, request_id: str | None = None
    ) -> Outcome:
        """The attempts a request makes: up to FULFILLMENT_MAX_ATTEMPTS, backing off between
        answers that are not final."""
        answers: list[Answer] = []
        for attempt in range(1, self._max_attempts + 1):
            if attempt > 1:
                observability.FULFILLMENT_RETRIES.inc()
                await asyncio.sleep(self._backoff * 2 ** (attempt - 2) * random.uniform(0.5, 1.5))
            answer = await self.post(order_id, client_id, amount, request_id)
            answers.append(answer)
            if answer.kind is Kind.FULFILLED or (answer.kind is Kind.REFUSED and answer.reached):
                break
            log.warning(
                "fulfillment attempt inconclusive", order_id=order_id, attempt=attempt, detail=answer.detail
            )
        return _combine(answers)

    async def ask_again(
        self,
        order_id: str,
        client_id: str,
        amount: int,
        request_id: str | None = None,
        *,
        quiet_since: datetime | None = None,
    ) -> Outcome:
        """The resolver's question for an order whose earlier calls proved nothing: the status
        lookup first when there is one, else the same POST with the same key. A call that is
        not sent now proves nothing about the earlier ones, so it stays unknown.

        "Never received" is proof only once no earlier call can still arrive: `quiet_since` is
        when the last call this service may have made could have reached the provider at the
        latest, and a lookup before that (plus one timeout) that finds nothing sends nothing
        and stays unknown, to be asked again once it would prove it (`Outcome.sent_by`)."""
        if self._status_url is not None:
            answer = await self.lookup(order_id, request_id)
            if answer.kind is Kind.FULFILLED:
                return Outcome(answer.kind, 1, answer.detail, answer.fulfillment_id)
            if answer.kind is Kind.REFUSED:
                if quiet_since is None or datetime.now(UTC) >= quiet_since + timedelta(seconds=self._timeout):
                    return Outcome(Kind.REFUSED, 1, answer.detail, failure=Failure.UNREACHABLE)
                # Too early to believe, and a POST now would only restart the wait: ask again later.
                detail = "the provider has no record of the order yet; an earlier call may still arrive"
                return Outcome(Kind.UNKNOWN, 0, detail, failure=Failure.UNREACHABLE, sent_by=quiet_since)
        answer = await self.post(order_id, client_id, amount, request_id)
        if answer.kind is Kind.REFUSED and not answer.reached:
            answer = Answer(Kind.UNKNOWN, answer.detail)
        return _combine([Answer(Kind.UNKNOWN, "an earlier call went unanswered"), answer])

    async def post(self, order_id: str, client_id: str, amount: int, request_id: str | None) -> Answer:
        payload: dict[str, object] = {
            "orderId": order_id,
            "clientId": client_id,
            "amount": from_cents(amount),
        }
        answer = await self._call("POST", self._url, payload, self._headers(order_id, request_id))
        observability.FULFILLMENT_ATTEMPTS.labels(answer.kind.value).inc()
        return answer

    async def lookup(self, order_id: str, request_id: str | None) -> Answer:
        """GET FULFILLMENT_STATUS_URL/{orderId}: 200 with an id is fulfilled, 404 was never
        received (so never carried out), anything else proves nothing."""
        assert self._status_url is not None
        url = f"{self._status_url.rstrip('/')}/{order_id}"
        answer = await self._call("GET", url, None, self._headers(order_id, request_id))
        if answer.status == 404:
            answer = Answer(Kind.REFUSED, "the provider has no record of the order", status=404)
        elif answer.kind is Kind.REFUSED:
            answer = Answer(Kind.UNKNOWN, answer.detail, status=answer.status)
        observability.FULFILLMENT_LOOKUPS.labels(answer.kind.value).inc()
        return answer

    @staticmethod
    def _headers(order_id: str, request_id: str | None) -> dict[str, str]:
        headers = {"Idempotency-Key": order_id}
        if request_id:
            headers["X-Request-ID"] = request_id
        return headers

    async def _call(
        self, method: str, url: str, payload: dict[str, object] | None, headers: dict[str, str]
    ) -> Answer:
        sent = None if payload is None else orjson.dumps(payload)
        try:
            status, body = await self._http.request(method, url, sent, headers)
        except (NotSent, OSError, TimeoutError) as exc:  # ConnectionError is an OSError
            return classify_error(exc, self._timeout)
        return classify(status, body)
