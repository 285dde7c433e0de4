"""Operations as data: each route is declared once, with who may call it, its parameters and its
body as models and its responses, and that one declaration both checks requests and writes the
OpenAPI document (`http/openapi.py`).

A handler is `async def op(call: Call[, params: P][, body: B]) -> Response`: a parameter named
`params` gets the path and query parameters validated by its model (a field is a path
parameter when the path names it, else a query one), `body` the JSON body validated by its
model. What a request costs here is one model validation per declared part: the signature is
read once, at start, not per request (FastAPI's dependency solving was a third of a balance read).
Served by Starlette: one `Route` per path, dispatching on the method.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, get_type_hints

from pydantic import BaseModel, ValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from wallet.auth import check_admin
from wallet.errors import BadRequest
from wallet.http.deps import Params, Services, invalid, parse_body

_PATH_NAMES = re.compile(r"{([^}:]+)")


class Auth(Enum):
    PUBLIC = "public"
    ADMIN = "admin"  # Authorization: Bearer <ADMIN_API_KEY>
    CLIENT = "client"  # client-id, and with CLIENT_AUTH=api_key the client's Bearer key


@dataclass(frozen=True, slots=True)
class Call:
    """What every handler gets: the request, the services, and the caller."""

    request: Request
    svc: Services
    client_id: str  # the authenticated client on Auth.CLIENT routes, else ""
    idempotency_key: str | None  # the Idempotency-Key header on idempotent routes, else None


Handler = Callable[..., Awaitable[Response]]


@dataclass(eq=False)
class Endpoint:
    method: str
    path: str
    handler: Handler
    auth: Auth
    tags: list[str]
    responses: dict[int | str, dict[str, Any]]
    idempotent: bool
    params: type[Params] | None = field(init=False)
    body: type[BaseModel] | None = field(init=False)
    path_names: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        hints = get_type_hints(self.handler)
        self.params = hints.get("params")
        self.body = hints.get("body")
        self.path_names = frozenset(_PATH_NAMES.findall(self.path))
        assert set(inspect.signature(self.handler).parameters) <= {"call", "params", "body"}, self.path

    @property
    def operation_id(self) -> str:
        return re.sub(r"\W", "_", f"{self.handler.__name__}{self.path}") + f"_{self.method.lower()}"

    async def __call__(self, request: Request) -> Response:
        svc: Services = request.app.state.services
        headers = request.headers
        client_id = ""
        if self.auth is Auth.ADMIN:
            check_admin(bearer_token(one_header(headers, "authorization")), svc.admin_key_digest)
        elif self.auth is Auth.CLIENT:
            token = bearer_token(one_header(headers, "authorization"))
            client_id = await svc.clients.authenticate(one_header(headers, "client-id"), token)
        kwargs: dict[str, Any] = {}
        if self.params is not None:
            kwargs["params"] = self._params(request)
        # checked by idempotency.key_for
        key = one_header(headers, "idempotency-key") if self.idempotent else None
        if self.body is not None:
            kwargs["body"] = await parse_body(request, self.body)
        return await self.handler(Call(request, svc, client_id, key), **kwargs)

    def _params(self, request: Request) -> Params:
        assert self.params is not None
        values: dict[str, Any] = dict(request.query_params)
        values.update(request.path_params)
        try:
            return self.params.model_validate(values)
        except ValidationError as exc:
            raise invalid(exc, lambda name: ("path" if name in self.path_names else "query",)) from None


def one_header(headers: Headers, name: str) -> str | None:
    """A header that says who asks or which request this is: sent twice with different values,
    no reading of it is the right one, so the request is refused rather than one picked."""
    values = headers.getlist(name)
    if len(values) > 1 and any(value != values[0] for value in values[1:]):
        raise BadRequest(
            f"The {name} header was sent more than once, with different values", code="DUPLICATE_HEADER"
        )
    return values[0] if values else None


def bearer_token(authorization: str | None) -> str | None:
    """The credentials of `Authorization: Bearer <token>` (any case of `Bearer`); None for a
    missing header, another scheme or an empty token, which the callers answer with a 401."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class Routes:
    """The operations a module declares, in the order the document lists them."""

    def __init__(self, *, tags: list[str] | None = None, auth: Auth = Auth.PUBLIC) -> None:
        self.endpoints: list[Endpoint] = []
        self._tags = tags or []
        self._auth = auth

    def route(
        self,
        method: str,
        path: str,
        *,
        auth: Auth | None = None,
        tags: list[str] | None = None,
        responses: dict[int | str, dict[str, Any]] | None = None,
        idempotent: bool = False,
    ) -> Callable[[Handler], Handler]:
        def register(handler: Handler) -> Handler:
            endpoint = Endpoint(
                method,
                path,
                handler,
                self._auth if auth is None else auth,
                self._tags if tags is None else tags,
                responses or {},
                idempotent,
            )
            self.endpoints.append(endpoint)
            return handler

        return register

    def get(self, path: str, **kw: Any) -> Callable[[Handler], Handler]:
        return self.route("GET", path, **kw)

    def post(self, path: str, **kw: Any) -> Callable[[Handler], Handler]:
        return self.route("POST", path, **kw)

    def put(self, path: str, **kw: Any) -> Callable[[Handler], Handler]:
        return self.route("PUT", path, **kw)

    def patch(self, path: str, **kw: Any) -> Callable[[Handler], Handler]:
        return self.route("PATCH", path, **kw)

    def delete(self, path: str, **kw: Any) -> Callable[[Handler], Handler]:
        return self.route("DELETE", path, **kw)


class _Methods:
    """The ASGI app of one path: the endpoint of the request's method, else a 405 naming every
    method the path has. HEAD is served wherever GET is (RFC 9110 §9.1: every general-purpose
    server supports both); the server sends the GET's head without its body."""

    def __init__(self, endpoints: list[Endpoint]) -> None:
        self.by_method = {e.method: e for e in endpoints}
        if "GET" in self.by_method:
            self.by_method.setdefault("HEAD", self.by_method["GET"])
        self.allow = ", ".join(sorted(self.by_method))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = self.by_method.get(scope["method"])
        if endpoint is None:
            raise HTTPException(405, headers={"Allow": self.allow})
        response = await endpoint(Request(scope, receive))
        await response(scope, receive, send)


def starlette_routes(endpoints: Iterable[Endpoint]) -> list[Route]:
    by_path: dict[str, list[Endpoint]] = {}
    for endpoint in endpoints:
        by_path.setdefault(endpoint.path, []).append(endpoint)
    return [Route(path, _Methods(group)) for path, group in by_path.items()]
