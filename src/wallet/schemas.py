"""Response shapes, for the OpenAPI document only: handlers build bodies directly (faster), and
tests check that what they send matches these."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

_STATUS_TEXT = {
    400: "Invalid input or a business rule refused the request",
    401: "Authentication missing",
    403: "Authentication invalid",
    404: "Not found",
    405: "Method not allowed",
    409: "A request with the same Idempotency-Key is still running",
    413: "Request body too large",
    414: "Request target (path and query) longer than 8 KiB",
    431: "Request head too large: a header line over 8 KiB, more than 100 headers, or over 32 KiB in all",
    422: "Idempotency-Key reused with a different request",
    429: "Rate limit exceeded",
    500: "Internal error (the message is masked in production)",
    502: "The fulfillment provider rejected the order; it was refunded",
    503: "Unavailable (fulfillment provider unreachable: the order was refunded)",
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
    orderId: str = Field(pattern=r"^ORD-[0-9]{13}-[0-9a-f]{8}$")
    amount: float
    status: Literal["PENDING", "COMPLETED", "FAILED"]
    fulfillmentId: str | None
    createdAt: str
    updatedAt: str | None = None


class OrderEnvelope(BaseModel):
    success: Literal[True]
    message: str | None = None
    data: OrderData


class BalanceData(BaseModel):
    clientId: str
    balance: float
    lastUpdated: str


class BalanceEnvelope(BaseModel):
    success: Literal[True]
    data: BalanceData


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorEnvelope, "description": _STATUS_TEXT[status]} for status in statuses}


# --- reading history (history.py) ---


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


class ClientProfile(BaseModel):
    clientId: str
    name: str | None
    email: str | None
    balance: float
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


class StatusData(BaseModel):
    status: Literal["ok", "ready"]


class StatusEnvelope(BaseModel):
    success: Literal[True]
    data: StatusData
