"""POST /v1/embed: texts and/or images to L2-normalized vectors, as JSON or as a multipart upload."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service.api.bodies import body_of, documented
from service.api.common import encode_vectors, error_responses, unless_disconnected
from service.api.deps import EmbedderDep
from service.schemas import EmbedRequest, EmbedResponse

router = APIRouter(tags=["embeddings"])

_ROUTE = dict(
    response_model=EmbedResponse,
    responses=error_responses(400, 401, 404, 413, 422, 429, 503),
    openapi_extra=documented(EmbedRequest, {"images": "image files, one per image"}),
)


@router.post("/v1/embed", summary="Embed texts and/or images", **_ROUTE)
@router.post("/embed", summary="Embed texts and/or images (the card's path: same as /v1/embed)", **_ROUTE)
async def embed(
    request: Request, embedder: EmbedderDep, body: Annotated[EmbedRequest, body_of(EmbedRequest)]
) -> JSONResponse:
    """Vectors in input order, L2-normalized; `base64` gives float32 little-endian per vector.
    JSON (images as base64, data URIs or URLs) or a multipart form (image files under `images`,
    one `texts` field per text)."""
    work = embedder.embed(body.model, body.texts or [], images=body.images or [], dimensions=body.dimensions)
    result = await unless_disconnected(request, work)
    engine = result.engine
    return JSONResponse(
        {
            "model": engine.name,
            "version": engine.version,
            "dim": result.dim,
            "text_embeddings": encode_vectors(result.text_vectors, body.encoding_format),
            "image_embeddings": encode_vectors(result.image_vectors, body.encoding_format),
            "truncated": result.truncated,
        }
    )
