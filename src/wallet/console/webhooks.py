"""The console's webhooks page: every endpoint (a client's or global), recent delivery attempts,
enabling an endpoint again, and replay of one event or of every failed one since a time.

Like the rest of the console: reads from `queries`, actions through the operations the API
calls (`Webhooks.set_enabled`, `Webhooks.replay`, as the admin) with the API's own request
models and time parser, a CSRF token on every form, and a confirmation before a replay sends
anything.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from wallet.console import queries
from wallet.console.routes import (
    PER_PAGE,
    _quote,
    _svc,
    _validated,
    actor,
    console_route,
    page,
    query_int,
    viewer,
)
from wallet.errors import BadRequest
from wallet.http.webhooks import ReplayEvent, ReplaySince, _endpoint_id
from wallet.wire import iso, parse_time

DEFAULT_SINCE = timedelta(days=1)  # the replay form's suggestion


def _key(raw: int) -> int:
    if not 1 <= raw <= queries.LAST:
        raise BadRequest("Unknown page")
    return raw


@console_route
async def webhooks(request: Request) -> Response:
    endpoint = request.query_params.get("endpoint", "")
    before = query_int(request, "before", queries.LAST)
    endpoints_before = query_int(request, "endpoints_before", queries.LAST)
    await viewer(request)
    only = _endpoint_id(endpoint) if endpoint else None
    async with _svc(request).wallets.single.connect() as conn:
        endpoints, endpoints_next = await queries.webhook_endpoints(conn, _key(endpoints_before), PER_PAGE)
        attempts, attempts_next = await queries.webhook_attempts(conn, only, _key(before), PER_PAGE)
    return page(
        request,
        "webhooks.html",
        endpoints=endpoints,
        endpoints_next=endpoints_next,
        attempts=attempts,
        attempts_next=attempts_next,
        only=only or "",
        since=iso(datetime.now(UTC) - DEFAULT_SINCE),
    )


@console_route
async def set_enabled(request: Request) -> Response:
    """Enable (failures forgotten, deliveries resume) or disable an endpoint."""
    endpoint_id: str = request.path_params["endpoint_id"]
    _, form = await actor(request)
    enabled = form.get("enabled") == "yes"
    await _svc(request).webhooks.set_enabled(_endpoint_id(endpoint_id), None, enabled)
    done = f"Endpoint {endpoint_id} {'enabled' if enabled else 'disabled'}."
    return RedirectResponse(f"/console/webhooks?done={_quote(done)}", status_code=303)


@console_route
async def replay(request: Request) -> Response:
    """One event (`event_id`) or every failed one since a time (`since`): the first submit shows
    what will be sent again, the confirmed one schedules it."""
    _, form = await actor(request)
    endpoint_id = _endpoint_id(request.path_params["endpoint_id"])
    event_id, since = form.get("event_id", "").strip(), form.get("since", "").strip()
    what: dict[str, Any] = {}
    if event_id:
        what["event_id"] = _validated(ReplayEvent, {"eventId": event_id}).eventId
    elif since:
        what["since"] = parse_time(_validated(ReplaySince, {"since": since}).since, "since")
    else:
        raise BadRequest("Choose an event or a time to replay from")
    if form.get("confirm") != "yes":
        return page(
            request,
            "replay_confirm.html",
            endpoint_id=endpoint_id,
            event_id=event_id,
            since=since,
            since_at=what.get("since"),
        )
    count = await _svc(request).webhooks.replay(
        endpoint_id, None, event_id=what.get("event_id"), since=what.get("since")
    )
    done = f"Replay scheduled: {count} deliver{'y' if count == 1 else 'ies'} to {endpoint_id}."
    return RedirectResponse(f"/console/webhooks?endpoint={endpoint_id}&done={_quote(done)}", status_code=303)


PAGES = [
    Route("/console/webhooks", webhooks, methods=["GET"]),
    Route("/console/webhooks/{endpoint_id}/enabled", set_enabled, methods=["POST"]),
    Route("/console/webhooks/{endpoint_id}/replay", replay, methods=["POST"]),
]
