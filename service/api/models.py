"""GET /v1/models: the served models with their versions, dims and content hashes, and the older
versions kept loaded for the collections bound to them."""

from __future__ import annotations

from fastapi import APIRouter

from clipserve.service.api.deps import RegistryDep
from clipserve.service.api.schemas import ModelInfo, ModelList

router = APIRouter(tags=["models"])


@router.get("/v1/models", response_model=ModelList, summary="Served models")
async def list_models(registry: RegistryDep) -> ModelList:
    """The served models in OpenAI's shape (`id`, `object`, `created`, `owned_by`) plus version, dim, hash,
    precision, providers and scoring; then the older versions kept loaded for the collections bound to them."""
    default = registry.default_name
    served = [
        ModelInfo(**m.describe(), default=m.name == default, status="serving", kept_for=why[1:])
        for m, why in registry.loaded()
        if why[:1] == ["serving"]
    ]
    kept = [
        ModelInfo(**{**m.describe(), "id": m.ref}, default=False, status="kept", kept_for=why)
        for m, why in registry.loaded()
        if why[:1] != ["serving"]
    ]
    tasks = [ModelInfo(**m.describe(), default=False, status="serving") for m in registry.tasks()]
    return ModelList(data=served + tasks + kept)
