"""POST /v1/embed: texts and/or images to L2-normalized vectors, as JSON or as a multipart upload."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from service.api.common import VectorResponse, error_responses, unless_disconnected, vector_payload
from service.api.deps import EmbedderDep, SettingsDep
from service.errors import InvalidInput
from service.schemas import EmbedForm, EmbedRequest, EmbedResponse
from service.settings import Settings

router = APIRouter(tags=["embeddings"])


def _schema(model: type[BaseModel]) -> dict:
    return model.model_json_schema(ref_template="#/components/schemas/{model}")


# The route reads its body itself (JSON or multipart), so both bodies are published from their models.
_BODY_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": _schema(EmbedRequest)},
            "multipart/form-data": {"schema": _schema(EmbedForm)},
            "image/*": {
                "schema": {"type": "string", "format": "binary"},
                "description": "one encoded image as the whole body (no base64, no JSON to parse); "
                "model, encoding_format and dimensions as query parameters",
            },
        },
    }
}
_QUERY_FIELDS = ("model", "encoding_format", "dimensions")


def _validated(model: type[BaseModel], data: object) -> BaseModel:
    try:
        return model.model_validate_json(data) if isinstance(data, bytes) else model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from exc


async def _form(request: Request, settings: Settings) -> EmbedForm:
    form = await request.form(
        max_files=settings.max_images_per_request + 1, max_fields=settings.max_texts_per_request + 8
    )
    unknown = sorted(set(form.keys()) - set(EmbedForm.model_fields))
    if unknown:
        raise InvalidInput(f"unknown form fields: {', '.join(unknown)}")
    images: list[bytes] = []
    for index, item in enumerate(form.getlist("images")):
        if not isinstance(item, UploadFile):
            raise InvalidInput(f"images[{index}] must be a file upload", index=index)
        images.append(await item.read())
    texts = form.getlist("texts")
    if any(not isinstance(t, str) for t in texts):
        raise InvalidInput("texts must be form fields, not files")
    fields = {k: form.get(k) for k in ("model", "encoding_format", "dimensions") if form.get(k) is not None}
    return _validated(EmbedForm, {**fields, "texts": texts, "images": images})  # type: ignore[return-value]


async def _binary(request: Request) -> EmbedForm:
    """One image as the request body (`Content-Type: image/...`), the other fields in the query."""
    unknown = sorted(set(request.query_params) - set(_QUERY_FIELDS))
    if unknown:
        raise InvalidInput(
            f"unknown query parameters: {', '.join(unknown)} (an image body takes {', '.join(_QUERY_FIELDS)})"
        )
    fields = {k: request.query_params[k] for k in _QUERY_FIELDS if k in request.query_params}
    return _validated(EmbedForm, {**fields, "images": [await request.body()]})  # type: ignore[return-value]


_ROUTE = dict(
    response_model=EmbedResponse,
    responses=error_responses(400, 401, 404, 413, 422, 429, 503),
    openapi_extra=_BODY_DOC,
)


@router.post("/v1/embed", summary="Embed texts and/or images", **_ROUTE)
@router.post("/embed", summary="Embed texts and/or images (the card's path: same as /v1/embed)", **_ROUTE)
async def embed(request: Request, embedder: EmbedderDep, settings: SettingsDep) -> JSONResponse:
    """Vectors in input order, L2-normalized; `base64` gives float32 little-endian per vector.
    The body is JSON, a multipart form, or one image (`Content-Type: image/jpeg`, `image/png`, ...)."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded", "image/")):
        form = await (_binary(request) if content_type.startswith("image/") else _form(request, settings))
        work = embedder.embed(form.model, form.texts, image_bytes=form.images, dimensions=form.dimensions)
        encoding = form.encoding_format
    else:
        body: EmbedRequest = _validated(EmbedRequest, await request.body())  # type: ignore[assignment]
        work = embedder.embed(
            body.model, body.texts or [], images=body.images or [], dimensions=body.dimensions
        )
        encoding = body.encoding_format
    result = await unless_disconnected(request, work)
    engine = result.engine
    return VectorResponse(
        {
            "model": engine.name,
            "version": engine.version,
            "dim": result.dim,
            "text_embeddings": vector_payload(result.text_vectors, encoding),
            "image_embeddings": vector_payload(result.image_vectors, encoding),
            "truncated": result.truncated,
        }
    )
