"""Domain errors carry their HTTP status and machine code; `http/errors.py` renders them in one envelope."""

from __future__ import annotations

from typing import Any, ClassVar

CHALLENGE = "Bearer"  # both the admin's key and a client's are bearer tokens


class WalletError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "INTERNAL_ERROR"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        details: Any = None,
        data: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.error_code = code or self.code
        self.details = details
        self.data = data
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"success": False, "error": self.message, "code": self.error_code}
        if self.details is not None:
            body["details"] = self.details
        if self.data is not None:
            body["data"] = self.data
        return body


class BadRequest(WalletError):
    status = 400
    code = "VALIDATION_ERROR"


class InsufficientFunds(WalletError):
    status = 400
    code = "INSUFFICIENT_FUNDS"


class BalanceCapExceeded(WalletError):
    status = 400
    code = "BALANCE_LIMIT_EXCEEDED"


class Unauthorized(WalletError):
    """Says which scheme to answer with (RFC 9110 §11.6.1: a 401 always does)."""

    status = 401
    code = "UNAUTHORIZED"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": CHALLENGE})


class Forbidden(WalletError):
    status = 403
    code = "FORBIDDEN"


class NotFound(WalletError):
    status = 404
    code = "NOT_FOUND"


class ClientNotFound(NotFound):
    code = "CLIENT_NOT_FOUND"


class Conflict(WalletError):
    status = 409
    code = "IDEMPOTENCY_IN_PROGRESS"


class PayloadTooLarge(WalletError):
    status = 413
    code = "PAYLOAD_TOO_LARGE"


class UriTooLong(WalletError):
    status = 414
    code = "URI_TOO_LONG"


class HeaderFieldsTooLarge(WalletError):
    status = 431
    code = "REQUEST_HEADER_FIELDS_TOO_LARGE"


class IdempotencyMismatch(WalletError):
    status = 422
    code = "IDEMPOTENCY_KEY_REUSED"


class RateLimited(WalletError):
    status = 429
    code = "RATE_LIMITED"


class FulfillmentFailed(WalletError):
    """The provider refused the order (502) or could not be reached (503); the money is back."""

    code = "FULFILLMENT_FAILED"

    def __init__(self, message: str, *, status: int, data: Any) -> None:
        super().__init__(message, data=data)
        self.status = status  # type: ignore[misc]


class ServiceUnavailable(WalletError):
    status = 503
    code = "SERVICE_UNAVAILABLE"
