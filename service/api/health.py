"""Health and metrics: /livez (batch loops alive), /readyz (models loaded and warm, why each version
is loaded, and the bundles left out as broken), /metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from clipserve.service.api.deps import MetricsDep, RegistryDep
from clipserve.service.api.errors import error_response

router = APIRouter(tags=["health"])


@router.get("/livez", summary="Liveness: the batch loops are running")
async def livez(registry: RegistryDep) -> Response:
    """200 while the batch loops run; 503 when one has stopped (restart the process)."""
    if registry.ready and not registry.alive:
        return error_response(503, "not_alive", "a batch loop has stopped")
    return Response('{"status":"alive"}', media_type="application/json")


@router.get("/readyz", summary="Readiness: models loaded and warmed up")
async def readyz(registry: RegistryDep) -> Response:
    """200 with the served models, every loaded version and why (serving; kept for which collections or
    jobs), and the bundles left out as broken; 503 while models load."""
    if not registry.ready:
        return error_response(503, "not_ready", "models are still loading", headers={"Retry-After": "2"})
    body = {
        "status": "ready",
        "models": [m.ref for m in registry.models()],
        "loaded": [{"model": m.ref, "why": why} for m, why in registry.loaded()],
        "left_out": registry.left_out,
    }
    return JSONResponse(body)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(metrics: MetricsDep) -> Response:
    """Prometheus text format: request latency per route, batch sizes, queue depth, cache hits."""
    return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
