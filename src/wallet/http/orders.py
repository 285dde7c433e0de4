"""A client's orders: place one (paid from the wallet, sent to the provider), read one, list them."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request
from starlette.responses import Response

from wallet import idempotency
from wallet.http.deps import (
    ClientId,
    IdemHeader,
    Parsed,
    RequestBody,
    Svc,
    body_doc,
    json_body,
    order_id_or_404,
    reply,
)
from wallet.http.pages import Cursor, Limit, order_page
from wallet.http.schemas import OrderEnvelope, OrderPage, error_responses
from wallet.money import Amount
from wallet.orders import OrderStatus, order_json
from wallet.wire import json_response, ok


class OrderRequest(RequestBody):
    amount: Amount


router = APIRouter()


@router.post(
    "/orders",
    tags=["client"],
    status_code=201,
    openapi_extra=body_doc(OrderRequest),
    responses={
        201: {"model": OrderEnvelope, "description": "Fulfilled: the order is COMPLETED"},
        202: {
            "model": OrderEnvelope,
            "description": "Accepted, outcome not known yet: the order is PENDING and its money held until "
            "the provider's answer is known (GET the `Location` to learn it; a replay with the same "
            "Idempotency-Key answers with the order's current state)",
            "headers": {"Location": {"description": "`/orders/{orderId}`", "schema": {"type": "string"}}},
        },
        **error_responses(400, 401, 403, 404, 409, 413, 422, 429, 502, 503),
    },
)
async def create_order(
    request: Request,
    svc: Svc,
    client_id: ClientId,
    body: Annotated[Parsed[OrderRequest], Depends(json_body(OrderRequest))],
    idempotency_key: IdemHeader = None,
) -> Response:
    from wallet.observability import REQUEST_ID

    result = await svc.orders.place(
        client_id,
        body.model.amount,
        idempotency.key_for(idempotency.client_scope(client_id), idempotency_key, "order", body.model),
        REQUEST_ID.get(),
    )
    return reply(result)


@router.get(
    "/orders/{order_id}",
    tags=["client"],
    responses={200: {"model": OrderEnvelope}, **error_responses(400, 401, 403, 404, 429)},
)
async def get_order(
    svc: Svc,
    client_id: ClientId,
    order_id: Annotated[str, Path(examples=["ORD-1703251234567-a1b2c3d4"])],
) -> Response:
    order = await svc.orders.get(client_id, order_id_or_404(order_id))
    return json_response(200, ok(order_json(order, updated=True)))


@router.get(
    "/orders",
    tags=["client"],
    responses={200: {"model": OrderPage}, **error_responses(400, 401, 403, 429)},
)
async def own_orders(
    svc: Svc,
    client_id: ClientId,
    status: Annotated[OrderStatus | None, Query()] = None,
    limit: Limit = 20,
    cursor: Cursor = None,
) -> Response:
    async with svc.reads.connect() as conn:
        return await order_page(conn, limit, cursor, admin=False, client_id=client_id, status=status)
