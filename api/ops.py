"""Operations routes: health, Prometheus metrics, and snapshots of calls in progress.

``GET /health`` and ``GET /metrics`` are open; ``GET /calls/active`` and
``GET /calls/{call_sid}`` need the admin token (:data:`api.deps.AdminDep`).
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from loguru import logger
from redis.exceptions import RedisError

from api.deps import AdminDep, ResourcesDep
from core.metrics import render_metrics
from core.resources import AppResources, check_database, check_redis
from processors.session_snapshot import SnapshotStore

router = APIRouter()


def _snapshots(resources: AppResources) -> SnapshotStore:
    return SnapshotStore(resources.redis, prefix=resources.settings.redis_key_prefix)


def _redis_unavailable(exc: Exception) -> JSONResponse:
    logger.warning(f"call snapshots unavailable: Redis error {type(exc).__name__}")
    return JSONResponse({"error": "call snapshots unavailable (Redis is down)"}, status_code=503)


@router.get("/metrics")
async def prometheus_metrics() -> Response:
    """Prometheus exposition of the voice agent's metrics."""
    body, content_type = render_metrics()
    return Response(content=body, media_type=content_type)


@router.get("/calls/active")
async def active_calls(_admin: AdminDep, resources: ResourcesDep) -> JSONResponse:
    """Snapshots of the calls in progress (ops; bearer ``ADMIN_TOKEN``)."""
    store = _snapshots(resources)
    try:
        sids = sorted(await store.active())
        snapshots = [snap for sid in sids if (snap := await store.read(sid)) is not None]
    except RedisError as exc:
        return _redis_unavailable(exc)
    return JSONResponse({"calls": snapshots})


@router.get("/calls/{call_sid}")
async def call_snapshot(call_sid: str, _admin: AdminDep, resources: ResourcesDep) -> JSONResponse:
    """Latest snapshot of one call (ops; bearer ``ADMIN_TOKEN``)."""
    try:
        snapshot = await _snapshots(resources).read(call_sid)
    except RedisError as exc:
        return _redis_unavailable(exc)
    if snapshot is None:
        return JSONResponse({"error": "unknown call"}, status_code=404)
    return JSONResponse(snapshot)


@router.get("/health")
async def health(resources: ResourcesDep) -> JSONResponse:
    """Report each component; 503 when one is down."""
    components: dict[str, str] = {}
    for name, check in (
        ("db", lambda: check_database(resources.db)),
        ("redis", lambda: check_redis(resources.redis)),
    ):
        try:
            await check()
            components[name] = "ok"
        except Exception as exc:
            components[name] = f"down: {type(exc).__name__}"
    healthy = all(v == "ok" for v in components.values())
    return JSONResponse(
        {"status": "ok" if healthy else "degraded", "components": components},
        status_code=200 if healthy else 503,
    )
