"""POST /v1/embeddings, compatible with OpenAI's embeddings API (the official client works as is).

Extra field `modality`: "text" (default) or "image", where each input is a data URI or base64.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from clipserve.service.api.common import encode_vectors, error_responses, unless_disconnected
from clipserve.service.api.deps import EmbedderDep
from clipserve.service.api.schemas import EmbeddingItem, EmbeddingsRequest, EmbeddingsResponse, Usage

router = APIRouter(tags=["openai"])


@router.post(
    "/v1/embeddings",
    response_model=EmbeddingsResponse,
    responses=error_responses(400, 401, 404, 413, 422, 429, 503),
    summary="OpenAI-compatible embeddings",
)
async def embeddings(body: EmbeddingsRequest, request: Request, embedder: EmbedderDep) -> EmbeddingsResponse:
    """OpenAI's embeddings API: texts (or images with `modality: image`) to vectors; the official clients work unchanged."""
    inputs = [body.input] if isinstance(body.input, str) else body.input
    work = embedder.embeddings(body.model, inputs, body.modality, body.dimensions)
    result = await unless_disconnected(request, work)
    vectors = result.image_vectors if body.modality == "image" else result.text_vectors
    return EmbeddingsResponse(
        data=[
            EmbeddingItem(index=i, embedding=e)
            for i, e in enumerate(encode_vectors(vectors, body.encoding_format))
        ],
        model=result.engine.name,
        usage=Usage(prompt_tokens=result.tokens, total_tokens=result.tokens),
    )
