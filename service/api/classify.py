"""POST /v1/classify: zero-shot classification of images against labels or a stored label set."""

from __future__ import annotations

import asyncio

import numpy as np
from fastapi import APIRouter, Depends, Request

from service.api.common import (
    check_images,
    get_fetcher,
    get_labelsets,
    get_matrices,
    get_settings,
    unless_disconnected,
)
from service.errors import ApiError
from service.inputs import ImageFetcher
from service.labelsets import ClassMatrices, LabelSetStore, validate_labels
from service.registry import ModelRegistry, get_registry
from service.schemas import ClassifyRequest, ClassifyResponse, ErrorResponse
from service.settings import Settings
from service.templates import resolve_templates

router = APIRouter(tags=["classification"])
_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 409, 413, 422, 429, 503)}


def rank(
    image_vectors: np.ndarray, classes: np.ndarray, labels: list[str], logit_scale: float, top_k: int
) -> list[dict]:
    """Top-k labels per image: score = softmax(logit_scale * cosine) over all labels."""
    similarity = image_vectors @ classes.T
    logits = logit_scale * similarity
    logits -= logits.max(axis=1, keepdims=True)
    probabilities = np.exp(logits)
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    k = min(top_k, len(labels))
    results = []
    for index, (probs, sims) in enumerate(zip(probabilities, similarity, strict=True)):
        top = np.argpartition(-probs, k - 1)[:k] if k < len(labels) else np.arange(len(labels))
        top = top[np.argsort(-probs[top], kind="stable")]
        results.append(
            {
                "index": index,
                "labels": [
                    {"label": labels[j], "score": float(probs[j]), "similarity": float(sims[j])} for j in top
                ],
            }
        )
    return results


@router.post(
    "/v1/classify", response_model=ClassifyResponse, responses=_ERRORS, summary="Zero-shot classification"
)
async def classify(
    body: ClassifyRequest,
    request: Request,
    registry: ModelRegistry = Depends(get_registry),
    fetcher: ImageFetcher = Depends(get_fetcher),
    settings: Settings = Depends(get_settings),
    labelsets: LabelSetStore = Depends(get_labelsets),
    matrices: ClassMatrices = Depends(get_matrices),
) -> dict:
    if not body.images:
        raise ApiError(422, "invalid_request", "images: the list is empty; give at least one image")
    check_images(len(body.images), settings)
    if (body.labels is None) == (body.labelset is None):
        raise ApiError(422, "invalid_request", "give exactly one of labels or labelset")
    if body.labels is not None:
        validate_labels(body.labels, settings.max_labels_per_request, settings.max_text_chars)
        templates = resolve_templates(body.templates, settings.max_templates)
    elif body.templates is not None:
        raise ApiError(
            422, "invalid_request", "templates apply to labels; a label set keeps its own templates"
        )
    if body.top_k > settings.max_top_k:
        raise ApiError(422, "invalid_request", f"top_k: at most {settings.max_top_k}")
    images = await fetcher.load(body.images)
    labelset = await labelsets.get(body.labelset) if body.labelset is not None else None
    model = registry.resolve(body.model or (labelset.model if labelset else None))

    async def classes() -> tuple[np.ndarray, list[str]]:
        if labelset is not None:
            return await labelsets.matrix(model, labelset, wait=False), labelset.labels
        assert body.labels is not None
        return await matrices.for_labels(model, body.labels, templates), body.labels

    async def work() -> list[dict]:
        (matrix, labels), vectors = await asyncio.gather(classes(), model.embed_images(images))
        return rank(vectors, matrix, labels, model.logit_scale, body.top_k)

    results = await unless_disconnected(request, work())
    return {"model": model.name, "version": model.version, "dim": model.dim, "results": results}
