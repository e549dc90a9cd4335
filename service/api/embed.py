"""POST /v1/embed: texts and/or images to L2-normalized vectors, as JSON or multipart."""

from __future__ import annotations

import asyncio

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile

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
from service.registry import ModelRegistry, ServedModel, get_registry
from service.schemas import EmbedRequest, EmbedResponse, ErrorResponse
from service.settings import Settings

router = APIRouter(tags=["embeddings"])

_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 422, 429, 503)}
_BODY_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/EmbedRequest"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
                        "texts": {"type": "array", "items": {"type": "string"}},
                        "model": {"type": "string"},
                        "encoding_format": {"type": "string", "enum": ["float", "base64"]},
                    },
                }
            },
        },
    }
}


async def _from_multipart(request: Request, settings: Settings) -> tuple[EmbedRequest, list[bytes]]:
    form = await request.form(
        max_files=settings.max_images_per_request + 1, max_fields=settings.max_texts_per_request + 8
    )
    unknown = sorted(set(form.keys()) - {"images", "texts", "model", "encoding_format"})
    if unknown:
        raise ApiError(422, "invalid_request", f"unknown form fields: {', '.join(unknown)}")
    images: list[bytes] = []
    for index, item in enumerate(form.getlist("images")):
        if not isinstance(item, UploadFile):
            raise ApiError(422, "invalid_request", f"images[{index}] must be a file upload", index=index)
        images.append(await item.read())
    texts = form.getlist("texts")
    if any(not isinstance(t, str) for t in texts):
        raise ApiError(422, "invalid_request", "texts must be form fields, not files")
    fields = {k: form.get(k) for k in ("model", "encoding_format") if form.get(k) is not None}
    try:
        body = EmbedRequest.model_validate({**fields, "texts": texts or None})
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from exc
    return body, images


async def _from_json(
    request: Request, fetcher: ImageFetcher, settings: Settings
) -> tuple[EmbedRequest, list[bytes]]:
    try:
        body = EmbedRequest.model_validate_json(await request.body())
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from exc
    check_images(len(body.images or []), settings)
    check_texts(body.texts or [], settings)
    return body, await fetcher.load(body.images or [])


async def _embed(
    model: ServedModel, texts: list[str], images: list[bytes]
) -> tuple[np.ndarray, list[bool], np.ndarray]:
    empty = np.zeros((0, model.dim), dtype=np.float32)
    text_job = model.embed_texts(texts) if texts else None
    image_job = model.embed_images(images) if images else None
    jobs = [j for j in (text_job, image_job) if j is not None]
    results = list(await asyncio.gather(*jobs))
    text_vectors, truncated = results.pop(0) if text_job is not None else (empty, [])
    image_vectors = results.pop(0) if image_job is not None else empty
    return text_vectors, truncated, image_vectors


@router.post(
    "/v1/embed",
    response_model=EmbedResponse,
    responses=_ERRORS,
    openapi_extra=_BODY_DOC,
    summary="Embed texts and/or images",
)
async def embed(
    request: Request,
    registry: ModelRegistry = Depends(get_registry),
    fetcher: ImageFetcher = Depends(get_fetcher),
    settings: Settings = Depends(get_settings),
) -> JSONResponse:
    """Vectors in input order, L2-normalized; `base64` gives float32 little-endian per vector."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        body, images = await _from_multipart(request, settings)
        check_images(len(images), settings)
        check_texts(body.texts or [], settings)
    else:
        body, images = await _from_json(request, fetcher, settings)
    texts = body.texts or []
    if not texts and not images:
        raise ApiError(422, "invalid_request", "nothing to embed: give at least one text or image")
    model = registry.resolve(body.model)
    text_vectors, truncated, image_vectors = await unless_disconnected(request, _embed(model, texts, images))
    return JSONResponse(
        {
            "model": model.name,
            "version": model.version,
            "dim": model.dim,
            "text_embeddings": encode_vectors(text_vectors, body.encoding_format),
            "image_embeddings": encode_vectors(image_vectors, body.encoding_format),
            "truncated": truncated,
        }
    )
