"""The OpenAPI document, made to say what the service really does.

FastAPI's generated document is close, but some of it is not what happens on the wire: a 422
"Validation Error" we never send (bad input is 400), headers that may be `null`, no security
schemes' effect depending on CLIENT_AUTH, and no mention of the headers every response carries.
`document` starts from the generated one and corrects every operation by the same rules, so
routes added later are described correctly too."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from wallet.auth import CLIENT_ID
from wallet.http.schemas import error_responses
from wallet.ratelimit import EXEMPT_PATHS
from wallet.settings import ClientAuth

_STRING_HEADERS: dict[str, dict[str, Any]] = {
    "client-id": {"type": "string", "pattern": CLIENT_ID.pattern, "minLength": 1, "maxLength": 64},
    "Idempotency-Key": {"type": "string", "pattern": "^[\\x20-\\x7e]+$", "minLength": 1, "maxLength": 255},
}
_REQUEST_ID = {
    "description": "The request id: the caller's `X-Request-ID` if usable, else a generated one. "
    "It is in every log line of the request and is passed on to the fulfillment provider.",
    "schema": {"type": "string"},
}
_RATE_HEADERS = {
    name: {"description": text, "schema": {"type": "string", "pattern": "^[0-9]+$"}}
    for name, text in (
        ("RateLimit-Limit", "Requests allowed per window (absent when RATE_LIMIT=off)"),
        ("RateLimit-Remaining", "Requests left in the current window"),
        ("RateLimit-Reset", "Seconds until the window frees a request"),
    )
}
_RETRY_AFTER = {"description": "Seconds to wait before retrying", "schema": {"type": "string"}}


def _fix_parameters(operation: dict[str, Any]) -> None:
    """Headers are strings or absent, never null; ours have the rules the code enforces."""
    for parameter in operation.get("parameters", []):
        if parameter["in"] != "header":
            continue
        schema = parameter["schema"]
        described = {k: schema[k] for k in ("description", "examples") if k in schema}
        if parameter["name"] in _STRING_HEADERS:
            parameter["schema"] = {**_STRING_HEADERS[parameter["name"]], **described}
        elif "anyOf" in schema:
            parameter["schema"] = {**next(s for s in schema["anyOf"] if s.get("type") != "null"), **described}
        if parameter["name"] == "client-id":
            parameter["required"] = True


def _fix_responses(operation: dict[str, Any], extra: dict[int | str, dict[str, Any]], limited: bool) -> None:
    responses: dict[str, Any] = operation["responses"]
    default_422 = responses.get("422", {})
    if "HTTPValidationError" in str(default_422):
        del responses["422"]  # invalid input is a 400 here
    for status, response in extra.items():
        responses.setdefault(str(status), {"description": response["description"]})
        responses[str(status)].setdefault(
            "content",
            {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorEnvelope"}}},
        )
    for status, response in responses.items():
        headers = response.setdefault("headers", {})
        headers["X-Request-ID"] = {**_REQUEST_ID, "required": True}
        if limited:
            headers.update(_RATE_HEADERS)
            if status == "429":
                headers["Retry-After"] = {**_RETRY_AFTER, "required": True}


def document(app: FastAPI, client_auth: ClientAuth) -> dict[str, Any]:
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    if client_auth is ClientAuth.HEADER:  # the client key is not asked for, so not documented
        components.get("securitySchemes", {}).pop("ClientKey", None)
    for path, operations in doc["paths"].items():
        limited = path not in EXEMPT_PATHS
        # Any route can fail unexpectedly, or refuse an oversized request head (http/protocol.py);
        # any route that reads the database can find it gone.
        extra = error_responses(414, 431, 500)
        if limited:
            extra.update(error_responses(429, 503))
        for operation in operations.values():
            if client_auth is ClientAuth.HEADER and {"ClientKey": []} in operation.get("security", []):
                del operation["security"]  # the client-id header alone identifies the caller
                operation["responses"].pop("401", None)
                operation["responses"].pop("403", None)
            _fix_parameters(operation)
            _fix_responses(operation, extra, limited)
    return doc


def install(app: FastAPI, client_auth: ClientAuth) -> None:
    """Serve the corrected document at /openapi.json (and so in /docs)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document(app, client_auth)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
