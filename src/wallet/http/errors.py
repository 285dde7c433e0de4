"""The one place errors become responses: every exception handler renders the error envelope
`{"success": false, "error", "code"[, "details"]}` (core errors carry their status and code)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import asyncpg
import sqlalchemy.exc
import structlog
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from wallet.database import Unavailable, gave_up, is_unavailable
from wallet.errors import ServiceUnavailable, WalletError
from wallet.wire import json_response

log = structlog.get_logger(__name__)

_ROUTING = {404: ("Route not found", "NOT_FOUND"), 405: ("Method not allowed", "METHOD_NOT_ALLOWED")}


def internal_error_response(exc: Exception, production: bool) -> Response:
    log.error("unhandled error", exc_info=exc)
    message = "Internal server error" if production else f"{type(exc).__name__}: {exc}"
    return json_response(500, {"success": False, "error": message, "code": "INTERNAL_ERROR"})


async def _wallet_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, WalletError)
    return json_response(exc.status, exc.body(), exc.headers)


async def _http_error(_: Request, exc: Exception) -> Response:
    """Routing's refusals: no such route (404), or not with this method (405, with `Allow`)."""
    assert isinstance(exc, HTTPException)
    message, code = _ROUTING.get(exc.status_code, (str(exc.detail), "HTTP_ERROR"))
    body = {"success": False, "error": message, "code": code}
    return json_response(exc.status_code, body, dict(exc.headers or {}))


def handlers(production: bool) -> Mapping[Any, Callable[[Request, Exception], Awaitable[Response]]]:
    """Core errors, routing errors and database errors. Anything else is a 500, answered by
    `middleware.CatchAll`, inside the request's context."""

    async def database_error(_: Request, exc: Exception) -> Response:
        """A database that is gone, refusing us or shutting down is unavailability (503), not a
        bug; `database.is_unavailable` is the one rule that tells them apart."""
        if not is_unavailable(exc):
            return internal_error_response(exc, production)
        log.error("database unavailable", error=str(exc))
        # A lock not granted in time: the server rolled the statement back, so that much is known.
        message = "Service temporarily unavailable" + ("; no money moved" if gave_up(exc) else "")
        return json_response(503, ServiceUnavailable(message).body())

    # Every family a database error can come from: SQLAlchemy's, asyncpg's own (the group-commit
    # statements run on asyncpg, database.Direct), and the socket's.
    database = (
        sqlalchemy.exc.SQLAlchemyError,
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
        asyncpg.InternalClientError,
        OSError,
        Unavailable,
    )
    return {WalletError: _wallet_error, HTTPException: _http_error, **dict.fromkeys(database, database_error)}
