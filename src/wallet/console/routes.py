"""The console's pages and actions. Thin like the API's routes (wallet.http): check the session
(and the CSRF token on every POST), call the same operation the API calls, render the result.

Every action goes through `Wallets`, `Orders` or `ClientAuthenticator` with an Idempotency-Key
made from the form's nonce (a double submit moves money once), and is audited as the API's are:
the ledger entry's description starts with "console:", a resolution's `by` is "console".
Pages without a session redirect to the login page; actions answer 403. Errors are friendly
HTML pages with the operation's status, never a 500.
"""

from __future__ import annotations

import functools
import math
import re
import secrets
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, get_args
from urllib.parse import quote

import structlog
from pydantic import TypeAdapter, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from wallet import idempotency, observability, statements
from wallet.auth import valid_client_id
from wallet.console import queries
from wallet.console.sessions import COOKIE, Session, Sessions
from wallet.database import is_unavailable
from wallet.errors import BadRequest, NotFound, WalletError
from wallet.http.deps import Services, invalid, read_lagging
from wallet.http.movements import CreditRequest, DebitRequest
from wallet.http.review import ResolvedFailed, ResolvedFulfilled, ResolveRequest
from wallet.http.statements import statement_response
from wallet.orders import ORDER_ID_PATTERN, OrderStatus
from wallet.ratelimit import client_ip
from wallet.verify import take_digest, verify_ledger
from wallet.wire import dumps, iso, parse_time

log = structlog.get_logger(__name__)
BY = "console"  # who the audit trail names for what the console does
PER_PAGE = 25
HERE = Path(__file__).parent
ORDER_ID = re.compile(ORDER_ID_PATTERN)
# Digits, grouped in threes if grouped at all (by commas or spaces), then decimals after a point:
# '12,50' is a decimal comma, not 1,250, so it is refused rather than read as a hundred times it.
_AMOUNT = re.compile(r"^(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]+)?$")
_INT = TypeAdapter(int)

templates = Jinja2Templates(directory=HERE / "templates")


def money(cents: int) -> str:
    """Exact, from integer cents, with thousands separators: 1234567 -> "12,345.67"."""
    sign = "-" if cents < 0 else ""
    whole, part = divmod(abs(cents), 100)
    return f"{sign}{whole:,}.{part:02d}"


def when(moment: datetime | None) -> str:
    return "-" if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


templates.env.filters["money"] = money
templates.env.filters["when"] = when
templates.env.filters["iso"] = iso


class Denied(Exception):
    """No valid session: the response says where to go (login page) or refuses (403)."""

    def __init__(self, response: Response) -> None:
        self.response = response


def page(request: Request, name: str, status: int = 200, **context: Any) -> Response:
    session: Session | None = getattr(request.state, "console_session", None)
    sessions: Sessions = request.app.state.console_sessions
    context.update(
        session=session,
        csrf=sessions.csrf_token(session) if session is not None else "",
        nonce=secrets.token_urlsafe(16),
        path=request.url.path,
    )
    response = templates.TemplateResponse(request, name, context, status_code=status)
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Content-Security-Policy"] = (
        "default-src 'self'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
        "frame-ancestors 'none'"
    )
    response.headers["Referrer-Policy"] = "same-origin"
    return response


def error_page(request: Request, status: int, message: str) -> Response:
    return page(request, "error.html", status=status, code=status, message=message)


Handler = Callable[[Request], Awaitable[Response]]


def console_route(handler: Handler) -> Handler:
    """Console errors are HTML pages, not the API's JSON envelope."""

    @functools.wraps(handler)
    async def handle(request: Request) -> Response:
        try:
            return await handler(request)
        except Denied as denied:
            return denied.response
        except WalletError as exc:  # a bad query parameter too (query_int)
            return error_page(request, exc.status, exc.message)
        except Exception as exc:  # the API's handlers would answer JSON; an operator reads HTML
            if is_unavailable(exc):
                return error_page(request, 503, "The database is unavailable: try again shortly.")
            log.exception("console page failed", path=request.url.path)
            return error_page(request, 500, "Something went wrong; it has been logged.")

    return handle


def query_int(request: Request, name: str, default: int) -> int:
    """An integer query parameter by pydantic's lax rules ("12", " 12 ", "1_000" and "1.0" are
    numbers; "abc", "1.5" and "" are a 400); absent, the default. Ranges are the page's to check."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        return _INT.validate_python(raw)
    except ValidationError:
        raise BadRequest("That request was not understood: check the address.") from None


def _svc(request: Request) -> Services:
    svc: Services = request.app.state.services
    return svc


def _sessions(request: Request) -> Sessions:
    sessions: Sessions = request.app.state.console_sessions
    return sessions


async def _session(request: Request) -> Session | None:
    session = await _sessions(request).find(request.cookies.get(COOKIE))
    request.state.console_session = session
    return session


async def viewer(request: Request) -> Session:
    """For pages: no session -> the login page."""
    session = await _session(request)
    if session is None:
        raise Denied(RedirectResponse("/console/login", status_code=303))
    return session


async def read_form(request: Request) -> dict[str, str]:
    """The posted form's text fields. A body that is not a form (broken multipart, too many
    fields) is the sender's mistake: 400, never a 500."""
    try:
        form = await request.form()
    except HTTPException:  # Starlette's own verdict on the body
        raise BadRequest("That form could not be read: reload the page and try again.") from None
    return {k: v for k, v in form.items() if isinstance(v, str)}


async def actor(request: Request) -> tuple[Session, dict[str, str]]:
    """For actions: a session and the form's CSRF token, else 403. Returns the form."""
    session = await _session(request)
    if session is None:  # before the body is read: without a session, what it holds is moot
        raise Denied(error_page(request, 403, "Your session has ended: log in again."))
    form = await read_form(request)
    if not _sessions(request).csrf_ok(session, form.get("csrf")):
        raise Denied(error_page(request, 403, "This form has expired: reload the page and try again."))
    return session, form


def _nonce_key(form: dict[str, str], route: str, model: Any) -> idempotency.IdempotencyKey | None:
    """The form's nonce as the Idempotency-Key: submitting the same form twice acts once."""
    nonce = form.get("nonce", "")
    return idempotency.key_for(idempotency.ADMIN_SCOPE, f"console-{nonce}" if nonce else None, route, model)


def _validated(model: Any, values: dict[str, Any]) -> Any:
    """A form's fields through the API's own request model, refused as the API refuses them."""
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise invalid(exc) from None


def parse_amount(raw: str) -> Decimal:
    """An amount typed by a person: thousands separated by commas or spaces, exact decimals."""
    grouped = raw.strip().replace(" ", ",").replace("\u202f", ",")
    if not _AMOUNT.fullmatch(grouped):
        raise BadRequest("amount: enter a number such as 1,250.00")
    cleaned = grouped.replace(",", "")
    try:
        return Decimal(cleaned)
    except InvalidOperation:
        raise BadRequest("amount: enter a number such as 1,250.00") from None


def _description(note: str) -> str | None:
    note = note.strip()
    return f"{BY}: {note}" if note else BY


# --- login ------------------------------------------------------------------------------------


@console_route
async def login_form(request: Request) -> Response:
    if await _session(request) is not None:
        return RedirectResponse("/console", status_code=303)
    return page(request, "login.html")


@console_route
async def login(request: Request) -> Response:
    settings = _svc(request).settings
    if not await _sessions(request).login_allowed(client_ip(request.scope, settings.trusted_proxies)):
        observability.RATE_LIMITED.inc()  # a rate-limit refusal like the API's (SPEC §6, /metrics)
        return page(
            request, "login.html", status=429, error="Too many attempts: wait a minute and try again."
        )
    form = await read_form(request)
    key = form.get("key")
    if key is None or not _sessions(request).key_matches(key):
        return page(request, "login.html", status=403, error="That key is not the admin key.")
    session = await _sessions(request).open()
    response = RedirectResponse("/console", status_code=303)
    response.set_cookie(
        COOKIE,
        session.secret,
        max_age=math.floor((session.expires_at - session.created_at).total_seconds()),
        path="/console",
        httponly=True,
        samesite="strict",
        secure=settings.production,
    )
    return response


@console_route
async def logout(request: Request) -> Response:
    session, _ = await actor(request)
    await _sessions(request).close(session.secret)
    response = RedirectResponse("/console/login", status_code=303)
    response.delete_cookie(COOKIE, path="/console")
    return response


# --- pages ------------------------------------------------------------------------------------


@console_route
async def overview(request: Request) -> Response:
    await viewer(request)
    now = datetime.now(UTC)
    async with _svc(request).wallets.single.connect() as conn:
        data = await queries.overview(conn, now)
    return page(request, "overview.html", o=data, chart=_chart(data), now=now)


def _chart(data: queries.Overview) -> dict[str, Any]:
    """Orders per minute over the last 24 h, stacked by outcome, as bars of an inline SVG."""
    colours = {"COMPLETED": "#1a7f37", "FAILED": "#cf222e", "PENDING": "#9a6700"}
    peak = max((sum(v.values()) for v in data.per_minute.values()), default=0)
    bars = []
    for minute, counts in sorted(data.per_minute.items()):
        x = minute - data.chart_start
        if not 0 <= x < 1440:
            continue
        y = 100.0
        for status in ("COMPLETED", "FAILED", "PENDING"):
            n = counts.get(status, 0)
            if n:
                height = 100.0 * n / peak
                y -= height
                bars.append({"x": x, "y": round(y, 2), "h": round(height, 2), "fill": colours[status]})
    totals = {s: sum(v.get(s, 0) for v in data.per_minute.values()) for s in colours}
    return {"bars": bars, "peak": peak, "colours": colours, "totals": totals}


@console_route
async def clients(request: Request) -> Response:
    q, sort = request.query_params.get("q", ""), request.query_params.get("sort", "id")
    page_no = query_int(request, "page_no", 1)
    await viewer(request)
    if sort not in queries.CLIENT_SORTS or not 1 <= page_no <= 100_000 or len(q) > 200 or "\x00" in q:
        raise BadRequest("Unknown sort, page or search")
    async with _svc(request).wallets.single.connect() as conn:
        rows = await queries.clients(conn, q.strip(), sort, page_no, PER_PAGE)
    return page(
        request,
        "clients.html",
        rows=rows[:PER_PAGE],
        more=len(rows) > PER_PAGE,
        q=q,
        sort=sort,
        page_no=page_no,
    )


@console_route
async def client(request: Request) -> Response:
    client_id: str = request.path_params["client_id"]
    ledger_before = query_int(request, "ledger_before", queries.LAST)
    orders_before = query_int(request, "orders_before", queries.LAST)
    await viewer(request)
    valid_client_id(client_id, field="client id")
    if not 1 <= ledger_before <= queries.LAST or not 1 <= orders_before <= queries.LAST:
        raise BadRequest("Unknown page")
    return await _client_page(request, client_id, ledger_before, orders_before)


async def _client_page(
    request: Request,
    client_id: str,
    ledger_before: int = queries.LAST,
    orders_before: int = queries.LAST,
    **extra: Any,
) -> Response:
    async with _svc(request).wallets.single.connect() as conn:
        profile = await queries.profile(conn, client_id)
        if profile is None:
            raise NotFound(f"Client {client_id} not found")
        entries = await queries.ledger(conn, client_id, ledger_before, PER_PAGE)
        orders, orders_next = await queries.client_orders(conn, client_id, orders_before, PER_PAGE)
        keys = await queries.api_keys(conn, client_id)
    return page(
        request,
        "client.html",
        status=extra.pop("status", 200),
        c=profile,
        entries=entries[:PER_PAGE],
        entries_next=entries[PER_PAGE - 1].entry_no if len(entries) > PER_PAGE else None,
        orders=orders,
        orders_next=orders_next,
        keys=keys,
        **extra,
    )


@console_route
async def move_money(request: Request) -> Response:
    """Credit or debit: the first submit shows a confirmation, the confirmed one moves money."""
    client_id: str = request.path_params["client_id"]
    kind: str = request.path_params["kind"]
    _, form = await actor(request)
    if kind not in ("credit", "debit"):
        raise NotFound("No such action")
    valid_client_id(client_id, field="client id")
    amount = parse_amount(form.get("amount", ""))
    note = form.get("note", "").strip()
    model = CreditRequest if kind == "credit" else DebitRequest
    req = _validated(model, {"client_id": client_id, "amount": amount, "description": _description(note)})
    if form.get("confirm") != "yes":
        return page(
            request,
            "confirm.html",
            kind=kind,
            client_id=client_id,
            cents=req.amount,
            note=note,
            amount=form.get("amount", ""),
            form_nonce=form.get("nonce", ""),
        )
    wallets = _svc(request).wallets
    idem = _nonce_key(form, kind, req)
    if isinstance(req, CreditRequest):
        await wallets.credit(
            client_id, req.amount, idem=idem, description=req.description, name=None, email=None
        )
    else:
        await wallets.debit(client_id, req.amount, idem=idem, description=req.description)
    done = f"{'Credited' if kind == 'credit' else 'Debited'} {money(req.amount)}."
    return RedirectResponse(f"/console/clients/{client_id}?done={_quote(done)}", status_code=303)


def _quote(value: str) -> str:
    return quote(value, safe="")


@console_route
async def issue_key(request: Request) -> Response:
    client_id: str = request.path_params["client_id"]
    await actor(request)
    valid_client_id(client_id, field="client id")
    issued = await _svc(request).clients.issue(client_id)
    return await _client_page(request, client_id, issued=issued)


@console_route
async def revoke_key(request: Request) -> Response:
    client_id: str = request.path_params["client_id"]
    key_id: str = request.path_params["key_id"]
    await actor(request)
    valid_client_id(client_id, field="client id")
    if not re.fullmatch(r"key_[0-9a-f]{16}", key_id):
        raise NotFound("API key not found")
    await _svc(request).clients.revoke(client_id, key_id)
    return RedirectResponse(f"/console/clients/{client_id}?done={_quote('Key ' + key_id + ' revoked.')}", 303)


@console_route
async def statement(request: Request) -> Response:
    client_id: str = request.path_params["client_id"]
    await viewer(request)
    valid_client_id(client_id, field="client id")
    params = request.query_params
    start = parse_time(params.get("from") or None, "from")
    end = parse_time(params.get("to") or None, "to")
    st = await read_lagging(
        _svc(request).snapshots, lambda snapshots: statements.statement(snapshots, client_id, start, end)
    )
    return statement_response(st, params.get("format", "csv") == "csv")


@console_route
async def orders(request: Request) -> Response:
    status, review = request.query_params.get("status", ""), request.query_params.get("review", "")
    before = query_int(request, "before", queries.LAST)
    await viewer(request)
    if (status and status not in set(get_args(OrderStatus))) or not 1 <= before <= queries.LAST:
        raise BadRequest("Unknown status or page")
    async with _svc(request).wallets.single.connect() as conn:
        rows, next_key = await queries.orders(conn, status or None, review == "1", before, PER_PAGE)
    return page(
        request,
        "orders.html",
        rows=rows,
        next=next_key,
        filter_status=status,
        review=review,
        statuses=list(get_args(OrderStatus)),
    )


@console_route
async def resolve(request: Request) -> Response:
    order_id: str = request.path_params["order_id"]
    _, form = await actor(request)
    if not ORDER_ID.fullmatch(order_id):
        raise NotFound("Order not found")
    outcome = form.get("outcome")
    fields: dict[str, Any] = {"outcome": outcome, "note": form.get("note", "").strip()}
    if outcome == "fulfilled":
        fields["fulfillmentId"] = form.get("fulfillmentId", "").strip()
    body = _validated(ResolveRequest, fields)
    req: ResolvedFulfilled | ResolvedFailed = body.root
    # A final order is a 409 (Conflict) raised by resolve: shown as an error page with its reason.
    await _svc(request).orders.resolve(
        order_id,
        fulfillment_id=req.fulfillmentId if isinstance(req, ResolvedFulfilled) else None,
        note=req.note,
        by=BY,
        idem=_nonce_key(form, f"resolve {order_id}", body),
    )
    done = f"Order {order_id} resolved as {req.outcome}."
    return RedirectResponse(f"/console/orders?review=1&done={_quote(done)}", status_code=303)


@console_route
async def ledger(request: Request) -> Response:
    await viewer(request)
    async with _svc(request).wallets.single.connect() as conn:
        check = await queries.last_check(conn)
    return page(request, "ledger.html", check=check)


@console_route
async def run_verify(request: Request) -> Response:
    await actor(request)
    svc = _svc(request)
    verdict = await verify_ledger(svc.wallets.engine, svc.settings.chain_key)
    async with svc.wallets.single.connect() as conn:
        await queries.record_check(conn, verdict, BY)
        check = await queries.last_check(conn)
    return page(request, "ledger.html", check=check, verdict=verdict.as_json())


@console_route
async def digest(request: Request) -> Response:
    """The digest's `data`, as `wallet verify --digest FILE` reads it."""
    await viewer(request)
    svc = _svc(request)
    data = await take_digest(svc.wallets.engine, svc.settings.chain_key)
    name = f"ledger-digest-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    return Response(
        dumps(data),
        media_type="application/json",
        headers={"Content-Disposition": f'attachment; filename="{name}"', "Cache-Control": "no-store"},
    )


PAGES = [
    Route("/console/login", login_form, methods=["GET"]),
    Route("/console/login", login, methods=["POST"]),
    Route("/console/logout", logout, methods=["POST"]),
    Route("/console", overview, methods=["GET"]),
    Route("/console/clients", clients, methods=["GET"]),
    Route("/console/clients/{client_id}", client, methods=["GET"]),
    Route("/console/clients/{client_id}/{kind}", move_money, methods=["POST"]),
    Route("/console/clients/{client_id}/keys/new", issue_key, methods=["POST"]),
    Route("/console/clients/{client_id}/keys/{key_id}/revoke", revoke_key, methods=["POST"]),
    Route("/console/clients/{client_id}/statement", statement, methods=["GET"]),
    Route("/console/orders", orders, methods=["GET"]),
    Route("/console/orders/{order_id}/resolve", resolve, methods=["POST"]),
    Route("/console/ledger", ledger, methods=["GET"]),
    Route("/console/ledger/verify", run_verify, methods=["POST"]),
    Route("/console/ledger/digest", digest, methods=["GET"]),
]


def routes() -> list[BaseRoute]:
    """The pages, and their static files. Sessions are built in the app's lifespan."""
    from wallet.console import webhooks  # its routes build on this module's

    static = StaticFiles(directory=HERE / "static")
    return [*PAGES, *webhooks.PAGES, Mount("/console/static", static, name="console-static")]
