"""The OpenAPI document, written from the routes' declarations (`http/routing.py`): the models
that validate a request are the schemas it documents, so the two cannot disagree. Every
operation also gets what is true of every route: the headers each response carries, the
refusals of an oversized request head, rate limiting and an unavailable database."""

from __future__ import annotations

import inspect
import types
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from wallet.auth import CLIENT_ID
from wallet.errors import CHALLENGE
from wallet.http.deps import Params
from wallet.http.routing import Auth, Endpoint
from wallet.http.schemas import ErrorEnvelope, error_responses
from wallet.idempotency import REPLAYED_HEADER
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
_CHALLENGE = {"description": "The scheme to authenticate with", "schema": {"const": CHALLENGE}}
_REPLAYED = {
    "description": "`true` when this is the stored answer to an earlier request with the same "
    "Idempotency-Key (nothing moved again)",
    "schema": {"const": "true"},
}
_RETRY_AFTER = {"description": "Seconds to wait before retrying", "schema": {"type": "string"}}


def _fix_responses(
    operation: dict[str, Any], extra: dict[int | str, dict[str, Any]], limited: bool, idempotent: bool
) -> None:
    responses: dict[str, Any] = operation["responses"]
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
        if status == "401":
            headers["WWW-Authenticate"] = {**_CHALLENGE, "required": True}
        if idempotent:
            headers[REPLAYED_HEADER] = _REPLAYED


TITLE = "Wallet service"
VERSION = "0.1.0"
DESCRIPTION = "Prepaid wallets for business clients, orders paid from them, and an append-only ledger."
_SECURITY_SCHEMES = {
    "AdminKey": {"type": "http", "scheme": "bearer", "description": "`ADMIN_API_KEY`"},
    "ClientKey": {
        "type": "http",
        "scheme": "bearer",
        "description": "A key from `POST /admin/clients/{client_id}/api-keys`, sent with the `client-id` "
        "it belongs to. Required when CLIENT_AUTH=api_key (the production default).",
    },
}
_CLIENT_HEADER = {
    "name": "client-id",
    "in": "header",
    "required": True,
    "description": "The calling client's id",
    "schema": {**_STRING_HEADERS["client-id"], "examples": ["CLIENT123"]},
}
_IDEMPOTENCY_HEADER = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "Makes a retried request safe: same key and body, same answer, money moved once.",
    "schema": _STRING_HEADERS["Idempotency-Key"],
}


def _models(spec: dict[str, Any]) -> list[type[BaseModel]]:
    model = spec.get("model")
    if model is None:
        return []
    return list(model.__args__) if isinstance(model, types.UnionType) else [model]


class _Schemas:
    """Every model the routes name, as components: parameters and bodies as they are validated,
    responses as they are sent."""

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        wanted: dict[tuple[type[BaseModel], JsonSchemaMode], None] = {(ErrorEnvelope, "serialization"): None}
        for endpoint in endpoints:
            for part in (endpoint.params, endpoint.body):
                if part is not None:
                    wanted[(part, "validation")] = None
            for spec in endpoint.responses.values():
                wanted.update({(model, "serialization"): None for model in _models(spec)})
        self.refs, defs = models_json_schema(list(wanted), ref_template="#/components/schemas/{model}")
        self.components: dict[str, Any] = defs.get("$defs", {})
        # Parameters are documented one by one, not as a schema.
        self._params = {
            model: self.components.pop(self.ref(model, mode)["$ref"].rsplit("/", 1)[1])
            for model, mode in wanted
            if issubclass(model, Params)
        }

    def ref(self, model: type[BaseModel], mode: JsonSchemaMode) -> dict[str, Any]:
        return dict(self.refs[(model, mode)])

    def response(self, spec: dict[str, Any]) -> dict[str, Any]:
        refs = [self.ref(model, "serialization") for model in _models(spec)]
        return refs[0] if len(refs) == 1 else {"anyOf": refs}

    def parameters(self, endpoint: Endpoint) -> list[dict[str, Any]]:
        """Each field of the params model, in the path if the path names it, else in the query."""
        if endpoint.params is None:
            return []
        schema = self._params[endpoint.params]
        required = set(schema.get("required", []))
        found = []
        for field, prop in schema["properties"].items():
            where = "path" if field in endpoint.path_names else "query"
            parameter = {"name": field, "in": where, "required": where == "path" or field in required}
            if "description" in prop:
                parameter["description"] = prop["description"]
            found.append({**parameter, "schema": prop})
        return found


def _operation(endpoint: Endpoint, schemas: _Schemas, client_auth: ClientAuth) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "tags": endpoint.tags,
        "summary": endpoint.handler.__name__.replace("_", " ").title(),
        "operationId": endpoint.operation_id,
    }
    if endpoint.handler.__doc__:
        operation["description"] = inspect.cleandoc(endpoint.handler.__doc__)
    parameters = schemas.parameters(endpoint)
    if endpoint.auth is Auth.CLIENT:
        parameters.append(_CLIENT_HEADER)
    if endpoint.idempotent:
        parameters.append(_IDEMPOTENCY_HEADER)
    if parameters:
        operation["parameters"] = parameters
    if endpoint.body is not None:
        body_schema = schemas.ref(endpoint.body, "validation")
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": body_schema}},
        }
    responses: dict[str, Any] = {}
    for status, spec in endpoint.responses.items():
        response: dict[str, Any] = {"description": spec.get("description", "Successful Response")}
        content = {"application/json": {"schema": schemas.response(spec)}} if "model" in spec else {}
        content.update(spec.get("content", {}))
        if content:
            response["content"] = content
        if "headers" in spec:
            response["headers"] = dict(spec["headers"])
        responses[str(status)] = response
    operation["responses"] = responses
    if endpoint.auth is Auth.ADMIN:
        operation["security"] = [{"AdminKey": []}]
    elif endpoint.auth is Auth.CLIENT and client_auth is ClientAuth.API_KEY:
        operation["security"] = [{"ClientKey": []}]
    elif endpoint.auth is Auth.CLIENT:  # the client-id header alone identifies the caller
        responses.pop("401", None)
        responses.pop("403", None)
    return operation


def document(endpoints: Sequence[Endpoint], client_auth: ClientAuth) -> dict[str, Any]:
    schemas = _Schemas(endpoints)
    paths: dict[str, dict[str, Any]] = {}
    for endpoint in endpoints:
        operation = _operation(endpoint, schemas, client_auth)
        limited = endpoint.path not in EXEMPT_PATHS
        # Any route can fail unexpectedly, or refuse an oversized request head (http/protocol.py);
        # any route that reads the database can find it gone.
        extra = error_responses(414, 431, 500)
        if limited:
            extra.update(error_responses(429, 503))
        _fix_responses(operation, extra, limited, endpoint.idempotent)
        paths.setdefault(endpoint.path, {})[endpoint.method.lower()] = operation
    security = dict(_SECURITY_SCHEMES)
    if client_auth is ClientAuth.HEADER:  # the client key is not asked for, so not documented
        del security["ClientKey"]
    return {
        "openapi": "3.1.0",
        "info": {"title": TITLE, "description": DESCRIPTION, "version": VERSION},
        "paths": paths,
        "components": {"schemas": schemas.components, "securitySchemes": security},
    }
