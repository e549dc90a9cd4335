"""GET /v1/models: the served models with their versions, dims and content hashes, and the older
versions kept loaded for the collections bound to them. OpenAI's field names live here: each
entry is the engine's own description (`ModelEngine.describe`) in OpenAI's shape."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter

from clipserve.service.api.deps import RegistryDep
from clipserve.service.api.schemas import ModelInfo, ModelList
from clipserve.service.inference.engine import ModelEngine
from clipserve.service.inference.task_engine import TaskEngine

router = APIRouter(tags=["models"])


def _model_info(engine: ModelEngine | TaskEngine, model_id: str, **ours: Any) -> ModelInfo:
    """One entry: OpenAI's `id`, `object`, `created` (the version's publish time) and `owned_by`,
    then the engine's description and `ours`."""
    created = int(datetime.fromisoformat(engine.manifest.created_at).timestamp())
    return ModelInfo(
        id=model_id, object="model", created=created, owned_by="clipserve", **engine.describe(), **ours
    )


@router.get("/v1/models", response_model=ModelList, summary="Served models")
async def list_models(registry: RegistryDep) -> ModelList:
    """The served models in OpenAI's shape (`id`, `object`, `created`, `owned_by`) plus version, dim, hash,
    precision, providers and scoring; then the older versions kept loaded for the collections bound to them."""
    default = registry.default_name
    served = [
        _model_info(m, m.name, default=m.name == default, status="serving", kept_for=why[1:])
        for m, why in registry.loaded()
        if why[:1] == ["serving"]
    ]
    kept = [
        _model_info(m, m.ref, default=False, status="kept", kept_for=why)
        for m, why in registry.loaded()
        if why[:1] != ["serving"]
    ]
    tasks = [_model_info(m, m.name, default=False, status="serving") for m in registry.tasks()]
    return ModelList(data=served + tasks + kept)
