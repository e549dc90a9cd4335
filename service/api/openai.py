"""POST /v1/embeddings, compatible with OpenAI's embeddings API (the official client works as is).

Extra field `modality`: "text" (default) or "image", where each input is a data URI or base64.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from service.api.common import (
    check_images,
    check_texts,
    encode_vectors,
    get_fetcher,
    get_settings,
    unless_disconnected,
)
from service.errors import ApiError
from service.inputs import ImageFetcher
from service.registry import ModelRegistry, get_registry
from service.schemas import EmbeddingsRequest, EmbeddingsResponse, ErrorResponse
from service.settings import Settings

router = APIRouter(tags=["openai"])
_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 422, 429, 503)}


@router.post(
    "/v1/embeddings",
    response_model=EmbeddingsResponse,
    responses=_ERRORS,
    summary="OpenAI-compatible embeddings",
)
async def embeddings(
    body: EmbeddingsRequest,
    request: Request,
    registry: ModelRegistry = Depends(get_registry),
    fetcher: ImageFetcher = Depends(get_fetcher),
    settings: Settings = Depends(get_settings),
) -> dict:
    inputs = [body.input] if isinstance(body.input, str) else body.input
    if not inputs:
        raise ApiError(422, "invalid_request", "input: the list is empty")
    model = registry.resolve(body.model)
    if body.dimensions is not None and body.dimensions != model.dim:
        raise ApiError(422, "invalid_request", f"dimensions: {model.ref} gives {model.dim}-dim vectors only")
    if body.modality == "image":
        check_images(len(inputs), settings, field="input")
        images = await fetcher.load(inputs)
        vectors = await unless_disconnected(request, model.embed_images(images))
        tokens = 0
    else:
        check_texts(inputs, settings, field="input")
        batch = await model.tokenize(inputs)
        vectors = await unless_disconnected(request, model.embed_tokenized(batch))
        tokens = int(batch.lengths.sum())
    encoded = encode_vectors(vectors, body.encoding_format)
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(encoded)],
        "model": model.name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
