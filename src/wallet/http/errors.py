"""The one place errors become responses: every exception handler renders the error envelope
`{"success": false, "error", "code"[, "details"]}` (core errors carry their status and code)."""

from __future__ import annotations

import re

import sqlalchemy.exc
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response

from wallet.database import is_unavailable
from wallet.errors import ServiceUnavailable, WalletError
from wallet.wire import json_response

log = structlog.get_logger(__name__)


def internal_error_response(exc: Exception, production: bool) -> Response:
    log.error("unhandled error", exc_info=exc)
    message = "Internal server error" if production else f"{type(exc).__name__}: {exc}"
    return json_response(500, {"success": False, "error": message, "code": "INTERNAL_ERROR"})


def _allowed_methods(request: Request) -> str:
    """Starlette's 405 names only the first route whose path matched, but GET and POST /orders are
    two routes; the OpenAPI document (public, and what clients read) knows every method of a path."""
    table: list[tuple[re.Pattern[str], str]] | None = getattr(request.app.state, "allowed_methods", None)
    if table is None:
        table = [
            (
                re.compile("^" + re.sub(r"\\{[^/]+?\\}", "[^/]+", re.escape(path)) + "$"),
                ", ".join(sorted(m.upper() for m in ops)),
            )
            for path, ops in request.app.openapi()["paths"].items()
        ]
        request.app.state.allowed_methods = table
    return next((methods for pattern, methods in table if pattern.match(request.url.path)), "")


def install(app: FastAPI, production: bool) -> None:
    """Register the handlers: core errors, routing errors, validation, an unavailable database
    and anything unexpected."""

    @app.exception_handler(WalletError)
    async def wallet_error(_: Request, exc: WalletError) -> Response:
        return json_response(exc.status, exc.body(), exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = _allowed_methods(request) or headers.get("Allow", "")
        codes = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}
        messages = {404: "Route not found", 405: "Method not allowed"}
        body = {
            "success": False,
            "error": messages.get(exc.status_code, str(exc.detail)),
            "code": codes.get(exc.status_code, "HTTP_ERROR"),
        }
        return json_response(exc.status_code, body, headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> Response:
        details = [
            {"field": ".".join(str(p) for p in err["loc"]), "message": err["msg"]} for err in exc.errors()
        ]
        first = details[0] if details else {"field": "request", "message": "invalid"}
        body = {
            "success": False,
            "error": f"{first['field']}: {first['message']}",
            "code": "VALIDATION_ERROR",
            "details": details,
        }
        return json_response(400, body)

    @app.exception_handler(sqlalchemy.exc.TimeoutError)
    @app.exception_handler(sqlalchemy.exc.OperationalError)
    @app.exception_handler(sqlalchemy.exc.InterfaceError)
    @app.exception_handler(OSError)
    async def unavailable(_: Request, exc: Exception) -> Response:
        log.error("database unavailable", error=str(exc))
        return json_response(503, ServiceUnavailable("Service temporarily unavailable").body())

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> Response:
        return internal_error_response(exc, production)

    @app.exception_handler(sqlalchemy.exc.DBAPIError)
    async def database_error(request: Request, exc: Exception) -> Response:
        """A database that is gone, refusing us or shutting down is unavailability, not a bug."""
        if is_unavailable(exc):
            return await unavailable(request, exc)
        return await internal_error(request, exc)
