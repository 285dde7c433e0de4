"""Statements (`wallet.statements`): opening and closing balance, totals and entries over a time
range, as JSON or CSV; a client's own, and any client's for the operator."""

from __future__ import annotations

from datetime import UTC
from typing import Any

from pydantic import Field
from starlette.requests import Request
from starlette.responses import Response

from wallet import statements
from wallet.http.deps import ClientPath, Params, read_lagging
from wallet.http.routing import Auth, Call, Routes
from wallet.http.schemas import StatementEnvelope, error_responses
from wallet.wire import TIME_DOC, TimeText, json_response, ok, parse_time

routes = Routes()


class Period(Params):
    start: TimeText | None = Field(None, alias="from", max_length=64, description=f"Inclusive. {TIME_DOC}")
    end: TimeText | None = Field(None, alias="to", max_length=64, description=f"Exclusive. {TIME_DOC}")
    format: str | None = Field(
        None, pattern="^(json|csv)$", description="`csv` for CSV (or Accept: text/csv)"
    )


class ClientPeriod(ClientPath, Period):
    pass


STATEMENT_DOC: dict[int | str, dict[str, Any]] = {
    200: {
        "model": StatementEnvelope,
        "description": "The statement, or with `format=csv` / `Accept: text/csv` the entries as CSV",
        "content": {statements.CSV_TYPE: {"schema": {"type": "string"}}},
    },
    **error_responses(400, 401, 403, 404, 429),
}


def wants_csv(request: Request, fmt: str | None) -> bool:
    if fmt is not None:
        return fmt == "csv"
    accept = request.headers.get("accept", "")
    return any(part.split(";")[0].strip().lower() == statements.CSV_TYPE for part in accept.split(","))


def statement_response(st: statements.Statement, as_csv: bool) -> Response:
    """The statement as the JSON envelope, or as a CSV attachment named for its client and end.
    Either way `Vary: Accept`, since the same URL answers both: a cache must not mix them."""
    if not as_csv:
        return json_response(200, ok(statements.statement_json(st)), headers={"Vary": "Accept"})
    name = f"statement-{st.client_id}-{st.end.astimezone(UTC):%Y%m%dT%H%M%SZ}.csv"
    return Response(
        statements.statement_csv(st),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{name}"', "Vary": "Accept"},
    )


async def _statement(call: Call, client_id: str, period: Period) -> Response:
    begin, until = parse_time(period.start, "from"), parse_time(period.end, "to")
    st = await read_lagging(
        call.svc.snapshots, lambda snapshots: statements.statement(snapshots, client_id, begin, until)
    )
    return statement_response(st, wants_csv(call.request, period.format))


@routes.get("/wallet/statement", tags=["client"], auth=Auth.CLIENT, responses=STATEMENT_DOC)
async def own_statement(call: Call, params: Period) -> Response:
    """Opening and closing balance, totals by type and every entry with `from` <= time < `to`
    (both optional: all history, until now). At most 10,000 entries: more is a 400."""
    return await _statement(call, call.client_id, params)


@routes.get("/admin/clients/{client_id}/statement", tags=["admin"], auth=Auth.ADMIN, responses=STATEMENT_DOC)
async def client_statement(call: Call, params: ClientPeriod) -> Response:
    """A client's statement, as `GET /wallet/statement` gives it to the client."""
    return await _statement(call, params.client_id, params)
