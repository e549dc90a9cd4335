"""Named label sets: PUT computes the class matrix once and stores it in Redis for every replica."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Response

from service.api.common import get_labelsets, get_matrices, get_settings
from service.errors import ApiError
from service.labelsets import (
    SYNC_BUILD_TEXTS,
    ClassMatrices,
    LabelSet,
    LabelSetStore,
    validate_labels,
    validate_name,
)
from service.registry import ModelRegistry, get_registry
from service.schemas import ErrorResponse, LabelSetInfo, LabelSetList, LabelSetRequest
from service.settings import Settings
from service.templates import resolve_templates

router = APIRouter(tags=["label sets"])
_ERRORS = {code: {"model": ErrorResponse} for code in (401, 404, 413, 422, 503)}


async def _info(
    labelset: LabelSet,
    registry: ModelRegistry,
    store: LabelSetStore,
    matrices: ClassMatrices,
    with_labels: bool,
) -> LabelSetInfo:
    try:
        model = registry.resolve(labelset.model)
    except ApiError:
        status, progress, error = "failed", 0.0, f"model {labelset.model!r} is not served here"
    else:
        ready = await matrices.lookup(model, labelset.digest) is not None
        status, progress, error = store.status(model, labelset, ready)
    return LabelSetInfo(
        name=labelset.name,
        model=labelset.model,
        labels=len(labelset.labels),
        templates=list(labelset.templates),
        status=status,
        progress=progress,
        error=error,
        created_at=labelset.created_at,
        label_names=labelset.labels if with_labels else None,
    )


@router.put(
    "/v1/labelsets/{name}",
    response_model=LabelSetInfo,
    responses={202: {"model": LabelSetInfo}, **_ERRORS},
    summary="Create or replace a label set",
)
async def put_labelset(
    name: str,
    body: LabelSetRequest,
    response: Response,
    registry: ModelRegistry = Depends(get_registry),
    store: LabelSetStore = Depends(get_labelsets),
    matrices: ClassMatrices = Depends(get_matrices),
    settings: Settings = Depends(get_settings),
) -> LabelSetInfo:
    """200 when the class matrix is ready; 202 while a large set builds in the background."""
    validate_name(name)
    validate_labels(body.labels, settings.max_labelset_labels, settings.max_text_chars)
    templates = resolve_templates(body.templates, settings.max_templates)
    model = registry.resolve(body.model)
    labelset = store.new(name, model, body.labels, templates)
    await store.put(labelset)
    build = await matrices.build_and_store(model, labelset)
    if len(body.labels) * len(templates) <= SYNC_BUILD_TEXTS:
        try:
            await asyncio.shield(build.task)
        except Exception as exc:
            raise ApiError(
                503, "labelset_failed", f"label set {name!r} could not be built: {build.error}"
            ) from exc
    info = await _info(labelset, registry, store, matrices, with_labels=False)
    response.status_code = 200 if info.status == "ready" else 202
    return info


@router.get("/v1/labelsets", response_model=LabelSetList, responses=_ERRORS, summary="List label sets")
async def list_labelsets(
    registry: ModelRegistry = Depends(get_registry),
    store: LabelSetStore = Depends(get_labelsets),
    matrices: ClassMatrices = Depends(get_matrices),
) -> LabelSetList:
    found = []
    for name in await store.names():
        try:
            labelset = await store.get(name)
        except ApiError:
            continue  # deleted between the scan and the read
        found.append(await _info(labelset, registry, store, matrices, with_labels=False))
    return LabelSetList(labelsets=found)


@router.get("/v1/labelsets/{name}", response_model=LabelSetInfo, responses=_ERRORS, summary="Get a label set")
async def get_labelset(
    name: str,
    registry: ModelRegistry = Depends(get_registry),
    store: LabelSetStore = Depends(get_labelsets),
    matrices: ClassMatrices = Depends(get_matrices),
) -> LabelSetInfo:
    validate_name(name)
    return await _info(await store.get(name), registry, store, matrices, with_labels=True)


@router.delete("/v1/labelsets/{name}", status_code=204, responses=_ERRORS, summary="Delete a label set")
async def delete_labelset(name: str, store: LabelSetStore = Depends(get_labelsets)) -> Response:
    validate_name(name)
    if not await store.delete(name):
        raise ApiError(404, "labelset_not_found", f"label set {name!r} does not exist")
    return Response(status_code=204)
