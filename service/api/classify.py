"""POST /v1/classify: zero-shot classification of images against labels or a stored label set."""

from __future__ import annotations

from fastapi import APIRouter, Request

from service.api.common import error_responses, unless_disconnected
from service.api.deps import ClassifierDep
from service.schemas import ClassifyRequest, ClassifyResponse, ClassifyResult, LabelScore

router = APIRouter(tags=["classification"])


@router.post(
    "/v1/classify",
    response_model=ClassifyResponse,
    responses=error_responses(400, 401, 404, 409, 413, 422, 429, 503),
    summary="Zero-shot classification",
)
async def classify(body: ClassifyRequest, request: Request, classifier: ClassifierDep) -> ClassifyResponse:
    outcome = await unless_disconnected(request, classifier.classify(body))
    engine = outcome.engine
    return ClassifyResponse(
        model=engine.name,
        version=engine.version,
        dim=engine.dim,
        results=[
            ClassifyResult(index=i, labels=[LabelScore(**vars(s)) for s in scores])
            for i, scores in enumerate(outcome.results)
        ],
    )
