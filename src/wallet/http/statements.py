"""Statements (`wallet.statements`): opening and closing balance, totals and entries over a time
range, as JSON or CSV; a client's own, and any client's for the operator."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from wallet import statements
from wallet.http.deps import Admin, ClientId, PathClientId, Svc
from wallet.http.schemas import StatementEnvelope, error_responses

router = APIRouter()

FromQuery = Annotated[
    statements.TimeText | None,
    Query(alias="from", max_length=64, description=f"Inclusive. {statements.TIME_DOC}"),
]
ToQuery = Annotated[
    statements.TimeText | None,
    Query(alias="to", max_length=64, description=f"Exclusive. {statements.TIME_DOC}"),
]
Format = Annotated[
    str | None, Query(pattern="^(json|csv)$", description="`csv` for CSV (or Accept: text/csv)")
]
STATEMENT_DOC: dict[int | str, dict[str, Any]] = {
    200: {
        "model": StatementEnvelope,
        "description": "The statement, or with `format=csv` / `Accept: text/csv` the entries as CSV",
        "content": {statements.CSV_TYPE: {"schema": {"type": "string"}}},
    },
}


async def _statement(
    request: Request, svc: Svc, client_id: str, start: str | None, end: str | None, fmt: str | None
) -> Response:
    begin, until = statements.parse_time(start, "from"), statements.parse_time(end, "to")
    st = await statements.statement(svc.snapshots, client_id, begin, until)
    return statements.statement_response(st, statements.wants_csv(request, fmt))


@router.get(
    "/wallet/statement",
    tags=["client"],
    responses={**STATEMENT_DOC, **error_responses(400, 401, 403, 404, 429)},
)
async def own_statement(
    request: Request,
    svc: Svc,
    client_id: ClientId,
    start: FromQuery = None,
    end: ToQuery = None,
    format: Format = None,
) -> Response:
    """Opening and closing balance, totals by type and every entry with `from` <= time < `to`
    (both optional: all history, until now). At most 10,000 entries: more is a 400."""
    return await _statement(request, svc, client_id, start, end, format)


@router.get(
    "/admin/clients/{client_id}/statement",
    tags=["admin"],
    dependencies=[Admin],
    responses={**STATEMENT_DOC, **error_responses(400, 401, 403, 404, 429)},
)
async def client_statement(
    request: Request,
    svc: Svc,
    client_id: PathClientId,
    start: FromQuery = None,
    end: ToQuery = None,
    format: Format = None,
) -> Response:
    """A client's statement, as `GET /wallet/statement` gives it to the client."""
    return await _statement(request, svc, client_id, start, end, format)
