"""Admin routes for client API keys: issue (the secret is shown once) and revoke."""

from __future__ import annotations

import re

from pydantic import Field
from starlette.responses import Response

from wallet.errors import NotFound
from wallet.http.deps import ClientPath
from wallet.http.routing import Auth, Call, Routes
from wallet.http.schemas import ApiKeyEnvelope, RevokedKeyEnvelope, error_responses
from wallet.wire import iso, json_response, ok

KEY_ID = re.compile(r"^key_[0-9a-f]{16}$")


class KeyPath(ClientPath):
    key_id: str = Field(max_length=64, examples=["key_0123456789abcdef"])


routes = Routes(tags=["admin"], auth=Auth.ADMIN)


@routes.post(
    "/admin/clients/{client_id}/api-keys",
    responses={201: {"model": ApiKeyEnvelope}, **error_responses(400, 401, 403, 404, 429)},
)
async def create_api_key(call: Call, params: ClientPath) -> Response:
    """A new key for the client; the secret is in this response only (rotation: issue a new key,
    move callers to it, then revoke the old one; both work in between)."""
    client_id = params.client_id
    issued = await call.svc.clients.issue(client_id)
    data = {
        "keyId": issued.key_id,
        "apiKey": issued.api_key,
        "clientId": client_id,
        "createdAt": iso(issued.created_at),
    }
    return json_response(201, ok(data, "API key created successfully"))


@routes.delete(
    "/admin/clients/{client_id}/api-keys/{key_id}",
    responses={200: {"model": RevokedKeyEnvelope}, **error_responses(400, 401, 403, 404, 429)},
)
async def revoke_api_key(call: Call, params: KeyPath) -> Response:
    """Revoking twice is harmless: the answer keeps the first revocation time."""
    client_id, key_id = params.client_id, params.key_id
    if not KEY_ID.fullmatch(key_id):
        raise NotFound("API key not found", code="API_KEY_NOT_FOUND")
    revoked_at = await call.svc.clients.revoke(client_id, key_id)
    data = {"keyId": key_id, "clientId": client_id, "revokedAt": iso(revoked_at)}
    return json_response(200, ok(data, "API key revoked successfully"))
