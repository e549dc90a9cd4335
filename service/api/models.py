"""GET /v1/models: the served models with their versions, dims and content hashes."""

from __future__ import annotations

from fastapi import APIRouter

from clipserve.service.api.deps import RegistryDep
from clipserve.service.api.schemas import ModelInfo, ModelList

router = APIRouter(tags=["models"])


@router.get("/v1/models", response_model=ModelList, summary="Served models")
async def list_models(registry: RegistryDep) -> ModelList:
    """The served models in OpenAI's shape (`id`, `object`, `created`, `owned_by`) plus version, dim, hash, precision, providers and scoring."""
    default = registry.default_name
    return ModelList(data=[ModelInfo(**m.describe(), default=m.name == default) for m in registry.models()])
