"""GET /v1/models: the served models with their versions, dims and content hashes."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from service.registry import ModelRegistry, get_registry
from service.schemas import ModelList

router = APIRouter(tags=["models"])


@router.get("/v1/models", response_model=ModelList, summary="Served models")
async def list_models(registry: ModelRegistry = Depends(get_registry)) -> dict:
    default = registry.default_name
    return {
        "object": "list",
        "data": [{**m.describe(), "default": m.name == default} for m in registry.models()],
    }
