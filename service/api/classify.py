"""POST /v1/classify: zero-shot classification of images against labels or a stored label set."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Request

from clipserve.service.api.bodies import body_of, documented
from clipserve.service.api.common import error_responses, model_header, unless_disconnected
from clipserve.service.api.deps import ClassifierDep
from clipserve.service.api.schemas import ClassifyRequest, ClassifyResponse, ClassifyResult, LabelScore

router = APIRouter(tags=["classification"])


_ROUTE = dict(
    response_model=ClassifyResponse,
    responses=error_responses(400, 401, 404, 409, 413, 422, 429, 503),
    openapi_extra=documented(ClassifyRequest, {"images": "image files, one per image"}),
)


@router.post("/v1/classify", summary="Zero-shot classification", **_ROUTE)
@router.post(
    "/classify", summary="Zero-shot classification (the card's path: same as /v1/classify)", **_ROUTE
)
async def classify(
    request: Request, classifier: ClassifierDep, body: Annotated[ClassifyRequest, body_of(ClassifyRequest)]
) -> ClassifyResponse:
    """Top-k labels per image, given as `labels` (with optional `templates`) or a stored `labelset`;
    `score` follows the model's own scoring (softmax over the labels, or sigmoid per label).
    JSON (images as base64, data URIs or URLs) or a multipart form (image files under `images`,
    one `labels` field per label)."""
    work = classifier.classify(
        body.images,
        labels=body.labels,
        templates=body.templates,
        labelset=body.labelset,
        model=body.model,
        top_k=body.top_k,
    )
    outcome = await unless_disconnected(request, work)
    return ClassifyResponse(
        **model_header(outcome.engine),
        scoring=outcome.engine.scoring.kind,
        results=[
            ClassifyResult(index=i, labels=[LabelScore(**vars(s)) for s in scores])
            for i, scores in enumerate(outcome.results)
        ],
    )
