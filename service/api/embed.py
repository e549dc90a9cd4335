"""POST /v1/embed: texts and/or images to L2-normalized vectors, as JSON, as a multipart upload,
or one image as the whole body."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from clipserve.service.api.bodies import body_of, documented, validated
from clipserve.service.api.common import (
    VectorResponse,
    error_responses,
    model_header,
    unless_disconnected,
    vector_payload,
)
from clipserve.service.api.deps import EmbedderDep
from clipserve.service.api.schemas import EmbedRequest, EmbedResponse
from clipserve.service.errors import InvalidInput

router = APIRouter(tags=["embeddings"])

_QUERY_FIELDS = ("model", "encoding_format", "dimensions")
_read_json_or_form = body_of(EmbedRequest).dependency


async def _image_body(request: Request) -> EmbedRequest:
    """One image as the request body (`Content-Type: image/...`), the other fields in the query."""
    unknown = sorted(set(request.query_params) - set(_QUERY_FIELDS))
    if unknown:
        raise InvalidInput(
            f"unknown query parameters: {', '.join(unknown)} (an image body takes {', '.join(_QUERY_FIELDS)})"
        )
    fields = {k: request.query_params[k] for k in _QUERY_FIELDS if k in request.query_params}
    return validated(EmbedRequest, {**fields, "images": [await request.body()]})


async def _embed_body(request: Request) -> EmbedRequest:
    if request.headers.get("content-type", "").lower().startswith("image/"):
        return await _image_body(request)
    return await _read_json_or_form(request)


def _openapi() -> dict:
    extra = documented(EmbedRequest, {"images": "image files, one per image"})
    extra["requestBody"]["content"]["image/*"] = {
        "schema": {"type": "string", "format": "binary"},
        "description": "one encoded image as the whole body (no base64, no JSON to parse); "
        "model, encoding_format and dimensions as query parameters",
    }
    return extra


_ROUTE = dict(
    response_model=EmbedResponse,
    responses=error_responses(400, 401, 404, 413, 422, 429, 503),
    openapi_extra=_openapi(),
)


@router.post("/v1/embed", summary="Embed texts and/or images", **_ROUTE)
@router.post("/embed", summary="Embed texts and/or images (the card's path: same as /v1/embed)", **_ROUTE)
async def embed(
    request: Request, embedder: EmbedderDep, body: Annotated[EmbedRequest, Depends(_embed_body)]
) -> JSONResponse:
    """Vectors in input order, L2-normalized; `base64` gives float32 little-endian per vector.
    JSON (images as base64, data URIs or URLs), a multipart form (image files under `images`,
    one `texts` field per text), or one image as the body (`Content-Type: image/jpeg`, ...)."""
    work = embedder.embed(body.model, body.texts or [], images=body.images or [], dimensions=body.dimensions)
    result = await unless_disconnected(request, work)
    return VectorResponse(
        {
            **model_header(result.engine, result.dim),
            "text_embeddings": vector_payload(result.text_vectors, body.encoding_format),
            "image_embeddings": vector_payload(result.image_vectors, body.encoding_format),
            "truncated": result.truncated,
        }
    )
