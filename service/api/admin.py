"""POST /v1/admin/reload (admin key): load new versions now, verified and warmed, then swap."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter

from clipserve.service.api.common import error_responses
from clipserve.service.api.deps import RegistryDep
from clipserve.service.api.schemas import ReloadResponse

router = APIRouter(tags=["admin"])


@router.post(
    "/v1/admin/reload",
    response_model=ReloadResponse,
    responses=error_responses(401, 403),
    summary="Reload models",
)
async def reload(registry: RegistryDep, force: bool = False) -> ReloadResponse:
    """`force=true` retries versions refused before (after they were fixed in place)."""
    return ReloadResponse(**asdict(await registry.reload(force=force)))
