"""Health and metrics: /livez (batch loops alive), /readyz (models loaded and warm), /metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from service.errors import error_response
from service.registry import ModelRegistry, get_registry

router = APIRouter(tags=["health"])


@router.get("/livez", summary="Liveness: the batch loops are running")
async def livez(registry: ModelRegistry = Depends(get_registry)) -> Response:
    if registry.ready and not registry.alive:
        return error_response(503, "not_alive", "a batch loop has stopped")
    return Response('{"status":"alive"}', media_type="application/json")


@router.get("/readyz", summary="Readiness: models loaded and warmed up")
async def readyz(registry: ModelRegistry = Depends(get_registry)) -> Response:
    if not registry.ready:
        return error_response(503, "not_ready", "models are still loading")
    models = ",".join(f'"{m.ref}"' for m in registry.models())
    return Response(f'{{"status":"ready","models":[{models}]}}', media_type="application/json")


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    body = request.app.state.metrics.render()
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")
