"""The operator's side of orders (SPEC §4.6): every order in full, the review queue, and finishing
an order by hand when the provider's answer never came.

A resolution is recorded on the order (who, when, the operator's note) and is idempotent with an
Idempotency-Key; without one, resolving an order that is already final answers 409 with it.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, RootModel
from starlette.responses import Response

from wallet import idempotency
from wallet.http.deps import ClientIdField, OrderPath, RequestBody, order_id_or_404, replayed
from wallet.http.pages import Page, order_page
from wallet.http.routing import Auth, Call, Routes
from wallet.http.schemas import AdminOrderEnvelope, AdminOrderPage, error_responses
from wallet.orders import OrderStatus, admin_order_json
from wallet.wire import json_response, ok

OPERATOR = "admin"  # the only operator principal today: the holder of ADMIN_API_KEY

PRINTABLE = r"^[\x21-\x7e]+$"


Note = Annotated[str, Field(min_length=1, max_length=500, pattern=r"^[^\x00]*$", description="Why")]


class ResolvedFulfilled(RequestBody):
    """The provider did carry the order out: it completes with the provider's id."""

    outcome: Literal["fulfilled"]
    fulfillmentId: Annotated[str, Field(min_length=1, max_length=256, pattern=PRINTABLE)]
    note: Note


class ResolvedFailed(RequestBody):
    """The provider did not carry it out: it fails and its money goes back to the wallet."""

    outcome: Literal["failed"]
    note: Note


class ResolveRequest(
    RootModel[Annotated[ResolvedFulfilled | ResolvedFailed, Field(discriminator="outcome")]]
):
    pass


class AnyOrderFilter(Page):
    status: OrderStatus | None = None
    needs_review: bool | None = Field(None, alias="needsReview")
    client_id: ClientIdField | None = Field(None, alias="clientId")


routes = Routes(tags=["admin"], auth=Auth.ADMIN)


@routes.get(
    "/admin/orders", responses={200: {"model": AdminOrderPage}, **error_responses(400, 401, 403, 429)}
)
async def list_orders(call: Call, params: AnyOrderFilter) -> Response:
    """Every client's orders, newest first; `needsReview=true` is the review queue."""
    async with call.svc.reads.connect() as conn:
        return await order_page(
            conn,
            params.limit,
            params.cursor,
            admin=True,
            client_id=params.client_id,
            status=params.status,
            needs_review=params.needs_review,
        )


@routes.get(
    "/admin/orders/{order_id}",
    responses={200: {"model": AdminOrderEnvelope}, **error_responses(400, 401, 403, 404, 429)},
)
async def get_order(call: Call, params: OrderPath) -> Response:
    order = await call.svc.orders.get_any(order_id_or_404(params.order_id))
    return json_response(200, ok(admin_order_json(order)))


@routes.post(
    "/admin/orders/{order_id}/resolve",
    idempotent=True,
    responses={200: {"model": AdminOrderEnvelope}, **error_responses(400, 401, 403, 404, 409, 413, 422, 429)},
)
async def resolve_order(call: Call, params: OrderPath, body: ResolveRequest) -> Response:
    """Finish a PENDING order whose outcome the provider never gave: `fulfilled` with the
    provider's id, or `failed` (its money goes back to the wallet). 409 with the order if it is
    already final (the resolver may have just finished it)."""
    order_id = order_id_or_404(params.order_id)
    req = body.root
    result = await call.svc.orders.resolve(
        order_id,
        fulfillment_id=req.fulfillmentId if isinstance(req, ResolvedFulfilled) else None,
        note=req.note,
        by=OPERATOR,
        idem=idempotency.key_for(idempotency.ADMIN_SCOPE, call.idempotency_key, f"resolve {order_id}", body),
    )
    return replayed(result.replayed, json_response(200, ok(admin_order_json(result.order), "Order resolved")))
