"""Response shapes, for the OpenAPI document only: handlers build bodies directly (faster), and
tests check that what they send matches these."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from wallet.events import EVENT_ID_PATTERN, EventType
from wallet.orders import ORDER_ID_PATTERN, OrderStatus

_STATUS_TEXT = {
    400: "Invalid input or a business rule refused the request",
    401: "Authentication missing",
    403: "Authentication invalid",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict: a request with the same Idempotency-Key is still running, or (resolving an "
    "order) the order is already final; it is under `data`",
    413: "Request body too large",
    414: "Request target (path and query) longer than 8 KiB",
    431: "Request head too large: a header line over 8 KiB, more than 100 headers, or over 32 KiB in all",
    422: "Idempotency-Key reused with a different request",
    429: "Rate limit exceeded",
    500: "Internal error (the message is masked in production). On POST /orders a 5xx that names no "
    "order means no money moved",
    502: "The fulfillment provider refused the order: it is FAILED (under `data`) and its money is back",
    503: "Unavailable. An answer that names no order means no money moved. On POST /orders it may "
    "name one: a FAILED order under `data` (it never reached the provider; its money is back), or, "
    "with code ORDER_OUTCOME_UNKNOWN, `details.orderId` of an order that may have been placed "
    "(GET it to know)",
}


class ErrorEnvelope(BaseModel):
    success: Literal[False]
    error: str
    code: str
    details: Any = None
    data: Any = None


class MovementData(BaseModel):
    clientId: str
    previousBalance: float
    newBalance: float
    amountCredited: float | None = None
    amountDebited: float | None = None


class MovementEnvelope(BaseModel):
    success: Literal[True]
    message: str
    data: MovementData


class OrderData(BaseModel):
    orderId: str = Field(pattern=ORDER_ID_PATTERN)
    amount: float
    status: OrderStatus
    fulfillmentId: str | None
    createdAt: str
    updatedAt: str | None = None


class OrderEnvelope(BaseModel):
    success: Literal[True]
    message: str | None = None
    data: OrderData


class BalanceData(BaseModel):
    clientId: str
    balance: float = Field(description="What can be spent")
    held: float = Field(
        description="Money in PENDING orders: out of the balance until their outcome is known"
    )
    lastUpdated: str


class BalanceEnvelope(BaseModel):
    success: Literal[True]
    data: BalanceData


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorEnvelope, "description": _STATUS_TEXT[status]} for status in statuses}


# --- reading history (wallets.py, orders.py, clients.py, audit.py, statements.py) ---


class LedgerEntry(BaseModel):
    id: int
    entryNo: int
    type: Literal["CREDIT", "DEBIT", "ORDER_DEDUCTION", "ORDER_REFUND"]
    amount: float
    balanceBefore: float
    balanceAfter: float
    referenceId: str | None
    description: str | None
    createdAt: str


class LedgerPage(BaseModel):
    success: Literal[True]
    data: list[LedgerEntry]
    nextCursor: str | None


class OrderPage(BaseModel):
    success: Literal[True]
    data: list[OrderData]
    nextCursor: str | None


class StatementData(BaseModel):
    clientId: str
    from_: str | None = Field(alias="from", description="Inclusive; null: from the first entry")
    to: str = Field(description="Exclusive; the moment of the statement when not given")
    openingBalance: float
    closingBalance: float
    totals: dict[str, float] = Field(description="Sum of the period's amounts by entry type")
    entries: list[LedgerEntry]


class StatementEnvelope(BaseModel):
    success: Literal[True]
    data: StatementData


class BalanceAtData(BaseModel):
    clientId: str
    balance: float = Field(description="The balance after every entry written before `at`")
    at: str


class BalanceAtEnvelope(BaseModel):
    success: Literal[True]
    data: BalanceAtData


class ClientProfile(BaseModel):
    clientId: str
    name: str | None
    email: str | None
    balance: float
    held: float
    lowBalanceThreshold: float | None = Field(
        description="balance.low is sent when a movement takes the balance below it"
    )
    createdAt: str
    updatedAt: str


class ClientEnvelope(BaseModel):
    success: Literal[True]
    data: ClientProfile


class VerifyFault(BaseModel):
    clientId: str | None
    entryNo: int | None
    ledgerId: int | None
    reason: str


class VerifyData(BaseModel):
    ok: bool
    wallets: int
    entries: int
    faults: list[VerifyFault]


class VerifyEnvelope(BaseModel):
    success: Literal[True]
    data: VerifyData


class DigestHead(BaseModel):
    clientId: str
    entryCount: int = Field(description="The wallet's entries at that moment")
    headHash: str = Field(description="Hex hash of its last entry (entry number entryCount)")


class DigestData(BaseModel):
    version: Literal[1]
    takenAt: str = Field(description="The database's time of the snapshot the heads were read in")
    keyId: str = Field(description="LEDGER_KEY_ID of the key `digest` is an HMAC with")
    walletCount: int
    entryCount: int
    wallets: list[DigestHead] = Field(description="Every wallet with entries, in client order")
    digest: str = Field(description="Hex HMAC-SHA256 over takenAt and every head (verify.py `_digest_mac`)")


class DigestEnvelope(BaseModel):
    success: Literal[True]
    data: DigestData


# --- Client API keys and operations (issue 5) -------------------------------------------


class ApiKeyData(BaseModel):
    keyId: str
    apiKey: str = Field(description="The secret: shown once, stored only as its SHA-256 digest.")
    clientId: str
    createdAt: str


class ApiKeyEnvelope(BaseModel):
    success: Literal[True]
    message: str
    data: ApiKeyData


class RevokedKeyData(BaseModel):
    keyId: str
    clientId: str
    revokedAt: str


class RevokedKeyEnvelope(BaseModel):
    success: Literal[True]
    message: str
    data: RevokedKeyData


class ReplicaStatus(BaseModel):
    status: Literal["ok", "unreachable"]
    lagSeconds: float | None


class StatusData(BaseModel):
    status: Literal["ok", "ready"]
    primary: Literal["ok"] | None = None  # /ready
    replica: ReplicaStatus | None = None  # /ready with DATABASE_READ_URL: reported, never required


class StatusEnvelope(BaseModel):
    success: Literal[True]
    data: StatusData


# --- the review queue (review.py) ---


class Resolution(BaseModel):
    outcome: Literal["fulfilled", "failed"]
    by: str
    at: str
    note: str


class AdminOrderData(OrderData):
    updatedAt: str
    clientId: str
    failure: Literal["PROVIDER_ERROR", "UNREACHABLE", "RESOLVED_FAILED"] | None
    attempts: int = Field(description="Calls to the provider so far")
    resolverAttempts: int
    nextAttemptAt: str | None = Field(description="When the resolver asks the provider again (PENDING only)")
    lastError: str | None = Field(description="What the last inconclusive or refusing answer was")
    needsReview: bool = Field(
        description="Outcome unknown past FULFILLMENT_RESOLVE_HOURS: an operator should resolve it"
    )
    flaggedAt: str | None
    resolution: Resolution | None = Field(description="Who finished the order by hand, when and why")


class AdminOrderEnvelope(BaseModel):
    success: Literal[True]
    message: str | None = None
    data: AdminOrderData


class AdminOrderPage(BaseModel):
    success: Literal[True]
    data: list[AdminOrderData]
    nextCursor: str | None


# --- events and webhooks (wallet.events, wallet.webhooks, http/webhooks.py) ---


class EventData(BaseModel):
    id: str = Field(pattern=EVENT_ID_PATTERN, description="Also the `webhook-id` of its deliveries")
    type: EventType
    createdAt: str
    clientId: str | None = Field(
        description="null: an event about the platform itself (a global endpoint disabled), "
        "seen only by the admin and global endpoints"
    )
    data: dict[str, Any] = Field(description="The object the event is about, as the API shows it")


class EventPage(BaseModel):
    success: Literal[True]
    data: list[EventData]
    nextCursor: str | None


class WebhookEndpointData(BaseModel):
    id: str
    url: str
    clientId: str | None = Field(description="null: a global endpoint, receiving every client's events")
    eventTypes: list[EventType] | None = Field(description="null: every type")
    description: str | None
    enabled: bool
    disabledReason: str | None
    createdAt: str
    secret: str | None = Field(
        None, description="`whsec_…`: only in the answers of creation and rotation, never again"
    )


class WebhookEndpointEnvelope(BaseModel):
    success: Literal[True]
    message: str | None = None
    data: WebhookEndpointData


class WebhookEndpointList(BaseModel):
    success: Literal[True]
    data: list[WebhookEndpointData]
    nextCursor: str | None


class DeletedData(BaseModel):
    id: str
    deleted: Literal[True]


class DeletedEnvelope(BaseModel):
    success: Literal[True]
    message: str
    data: DeletedData


class AttemptData(BaseModel):
    id: int
    deliveryId: int
    eventId: str
    attemptedAt: str
    statusCode: int | None = Field(description="The receiver's HTTP status; null if none came")
    latencyMs: int
    error: str | None
    responseBody: str | None = Field(description="The first 1,024 bytes of the receiver's answer")


class AttemptPage(BaseModel):
    success: Literal[True]
    data: list[AttemptData]
    nextCursor: str | None


class ReplayData(BaseModel):
    replayed: int = Field(description="Deliveries scheduled")


class ReplayEnvelope(BaseModel):
    success: Literal[True]
    message: str
    data: ReplayData


class ThresholdData(BaseModel):
    clientId: str
    lowBalanceThreshold: float | None


class ThresholdEnvelope(BaseModel):
    success: Literal[True]
    message: str
    data: ThresholdData
