"""A client's orders: place one (paid from the wallet, sent to the provider), read one, list them."""

from __future__ import annotations

from starlette.responses import Response

from wallet import idempotency
from wallet.database import Connector
from wallet.errors import FulfillmentFailed
from wallet.fulfillment import Failure
from wallet.http.deps import OrderPath, RequestBody, order_id_or_404, read_lagging, replayed
from wallet.http.pages import Page, order_page
from wallet.http.routing import Auth, Call, Routes
from wallet.http.schemas import OrderEnvelope, OrderPage, error_responses
from wallet.logs import REQUEST_ID
from wallet.money import Amount
from wallet.orders import ACCEPTED_MESSAGE, COMPLETED, PENDING, OrderStatus, Placed, location, order_json
from wallet.wire import json_response, ok


class OrderRequest(RequestBody):
    amount: Amount


class OrderFilter(Page):
    status: OrderStatus | None = None


routes = Routes(tags=["client"], auth=Auth.CLIENT)


@routes.post(
    "/orders",
    idempotent=True,
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
async def create_order(call: Call, body: OrderRequest) -> Response:
    scope = idempotency.client_scope(call.client_id)
    idem = idempotency.key_for(scope, call.idempotency_key, "order", body)
    return placed_response(await call.svc.orders.place(call.client_id, body.amount, idem, REQUEST_ID.get()))


_FAILED_BECAUSE: dict[str, str] = {
    Failure.UNREACHABLE: "Fulfillment provider could not be reached; the order failed and was refunded",
    Failure.PROVIDER_ERROR: "Fulfillment provider rejected the order; the order failed and was refunded",
    Failure.RESOLVED_FAILED: "An operator found the order was not carried out; it failed and was refunded",
}


def placed_response(placed: Placed) -> Response:
    """What placing an order answers, from the order's state: the same for the request that
    placed it and for every replay, so a client retrying a 202 learns the outcome."""
    order = placed.order
    if order.status == COMPLETED:
        answer = json_response(201, ok(order_json(order), "Order created successfully"))
    elif order.status == PENDING:
        answer = json_response(202, ok(order_json(order), ACCEPTED_MESSAGE), location(order.order_id))
    else:
        unreachable = order.failure == Failure.UNREACHABLE
        failed = FulfillmentFailed(
            _FAILED_BECAUSE.get(order.failure or "", _FAILED_BECAUSE[Failure.PROVIDER_ERROR]),
            status=503 if unreachable else 502,
            data=order_json(order),
        )
        answer = json_response(failed.status, failed.body())
    return replayed(placed.replayed, answer)


@routes.get(
    "/orders/{order_id}",
    responses={200: {"model": OrderEnvelope}, **error_responses(400, 401, 403, 404, 429)},
)
async def get_order(call: Call, params: OrderPath) -> Response:
    order = await call.svc.orders.get(call.client_id, order_id_or_404(params.order_id))
    return json_response(200, ok(order_json(order, updated=True)))


@routes.get("/orders", responses={200: {"model": OrderPage}, **error_responses(400, 401, 403, 404, 429)})
async def own_orders(call: Call, params: OrderFilter) -> Response:
    async def page(reads: Connector) -> Response:
        async with reads.connect() as conn:
            return await order_page(
                conn, params.limit, params.cursor, admin=False, client_id=call.client_id, status=params.status
            )

    return await read_lagging(call.svc.reads, page)
