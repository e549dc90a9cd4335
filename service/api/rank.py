"""POST /v1/rank: one query (text, image or vector) against candidates given in the request.
A plain string is a text, as the query or as a candidate; as a multipart form, `query` and each of
`candidates` are text fields or image files.

Scores are cosine similarities, highest first; with `"probabilities": true` each result also gets
the model's probability over all the candidates. Query and candidates go through the same batchers
as /v1/embed.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Request

from clipserve.service.api.bodies import body_of, documented
from clipserve.service.api.common import as_input, error_responses, model_header, unless_disconnected
from clipserve.service.api.deps import EmbedderDep
from clipserve.service.api.schemas import RankRequest, RankResponse, RankResult

router = APIRouter(tags=["retrieval"])


@router.post(
    "/v1/rank",
    response_model=RankResponse,
    response_model_exclude_none=True,
    responses=error_responses(400, 401, 404, 409, 413, 422, 429, 503),
    summary="Rank candidates against a query",
    openapi_extra=documented(
        RankRequest,
        {"query": "the query: a text field or an image file", "candidates": "texts or image files, in order"},
    ),
)
async def rank(
    request: Request, embedder: EmbedderDep, body: Annotated[RankRequest, body_of(RankRequest)]
) -> RankResponse:
    """Cosine similarity of each candidate to the query, highest first; `index` is the candidate's position."""
    work = embedder.rank(
        as_input(body.query),
        [as_input(candidate) for candidate in body.candidates],
        model=body.model,
        top_k=body.top_k,
        probabilities=body.probabilities,
    )
    outcome = await unless_disconnected(request, work)
    return RankResponse(
        **model_header(outcome.engine),
        scoring=outcome.engine.scoring.kind if body.probabilities else None,
        results=[RankResult(**vars(r)) for r in outcome.results],
    )
