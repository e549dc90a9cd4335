"""POST /v1/admin/reload (admin key): load new versions now, verified and warmed, then swap."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Depends

from service.registry import ModelRegistry, get_registry
from service.schemas import ErrorResponse, ReloadResponse

router = APIRouter(tags=["admin"])


@router.post(
    "/v1/admin/reload",
    response_model=ReloadResponse,
    responses={code: {"model": ErrorResponse} for code in (401, 403)},
    summary="Reload models",
)
async def reload(force: bool = False, registry: ModelRegistry = Depends(get_registry)) -> dict:
    """`force=true` retries versions refused before (after they were fixed in place)."""
    return asdict(await registry.reload(force=force))
