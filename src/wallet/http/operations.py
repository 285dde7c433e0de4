"""Operations routes: liveness, readiness (the primary, and the replica's lag) and metrics."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess
from sqlalchemy import text
from starlette.responses import Response

from wallet.database import single
from wallet.errors import ServiceUnavailable
from wallet.http.routing import Call, Routes
from wallet.http.schemas import StatusEnvelope, error_responses
from wallet.wire import json_response, ok

log = structlog.get_logger(__name__)

# Seconds since the last replayed transaction; 0 when the replica has replayed all it received
# (an idle primary sends nothing new, which is not lag); NULL on a server that is no replica.
_REPLICA_LAG = text("""
SELECT CASE WHEN NOT pg_is_in_recovery() THEN NULL
            WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0
            ELSE extract(epoch FROM now() - pg_last_xact_replay_timestamp()) END
""")


routes = Routes(tags=["operations"])


@routes.get("/health", responses={200: {"model": StatusEnvelope}})
async def health(call: Call) -> Response:
    """The process is alive and answering (liveness)."""
    return json_response(200, ok({"status": "ok"}))


@routes.get("/ready", responses={200: {"model": StatusEnvelope}, **error_responses(503)})
async def ready(call: Call) -> Response:
    """The primary answers (readiness): 503 when it does not. A replica is reported (`ok` with
    its replay lag in seconds, or `unreachable`) but never makes the service unready: reads
    then go to the primary, and every instance shares the replica, so taking instances out of
    the load balancer for it would turn a degraded read path into an outage."""
    try:
        async with asyncio.timeout(2), single(call.request.app.state.engine).connect() as conn:
            await conn.execute(text("SELECT 1"))
    except Exception as exc:
        raise ServiceUnavailable("Database unreachable", code="NOT_READY") from exc
    data: dict[str, Any] = {"status": "ready", "primary": "ok"}
    replica = call.request.app.state.replica
    if replica is not None:
        try:
            async with asyncio.timeout(2), single(replica).connect() as conn:
                lag = await conn.scalar(_REPLICA_LAG)
            data["replica"] = {"status": "ok", "lagSeconds": None if lag is None else float(lag)}
        except Exception as exc:
            log.warning("read replica unreachable", error=str(exc))
            data["replica"] = {"status": "unreachable", "lagSeconds": None}
    return json_response(200, ok(data))


@routes.get(
    "/metrics",
    responses={200: {"description": "Prometheus text format", "content": {CONTENT_TYPE_LATEST: {}}}},
)
async def metrics(call: Call) -> Response:
    """Prometheus metrics of all workers of this server."""
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
