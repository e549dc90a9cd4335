"""One way to send a request body to every route that takes images: JSON, or `multipart/form-data`.

A route declares `body: Annotated[Model, body_of(Model)]` (and `openapi_extra=documented(Model)`).
JSON is validated against the model as it is. A form is turned into the same model, field by
field, by these rules:

- a file goes where an image goes: `images` / `image` get its bytes; a file given as `query` or as
  one of `candidates` is an image query or candidate; a file in `items` is an image item whose id
  is the file name (and `metadata.file` too);
- a repeated field is a list (`-F texts=a -F texts=b`); a field of a list type given once is a
  list of one;
- a text field of a structured type (`filter`, `metadata`, a `query` vector) may be JSON.

Both then go through the same validation, so a form and a JSON body answer the same errors.
"""

from __future__ import annotations

import json
import types
import typing
from typing import Any, TypeVar

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from starlette.datastructures import UploadFile

from clipserve.service.errors import InvalidInput

M = TypeVar("M", bound=BaseModel)
# URL-encoded forms are refused before a route is reached (clipserve.service.api.guards.ContentTypes)
FORM_TYPES = ("multipart/form-data",)
IMAGE_FIELDS = ("images", "image")


def _kinds(info: FieldInfo) -> list[Any]:
    annotation = info.annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    return [annotation]


def _takes_list(info: FieldInfo) -> bool:
    return all(typing.get_origin(kind) is list for kind in _kinds(info))


def _may_take_list(info: FieldInfo) -> bool:
    return any(typing.get_origin(kind) is list for kind in _kinds(info))


def _textual(info: FieldInfo) -> bool:
    """Whether every value the field takes is a string (so a form value is never read as JSON)."""
    for kind in _kinds(info):
        inner = typing.get_args(kind) if typing.get_origin(kind) is list else (kind,)
        if any(item is not str for item in inner):
            return False
    return True


async def _file_value(name: str, upload: UploadFile) -> object:
    data = await upload.read()
    if name in IMAGE_FIELDS:
        return data
    if name == "items":
        filename = upload.filename or "upload"
        return {"id": filename, "image": data, "metadata": {"file": filename}}
    return {"image": data}


def _text_value(value: str, info: FieldInfo) -> object:
    if not _textual(info) and value.lstrip()[:1] in ("{", "["):
        try:
            return json.loads(value)
        except ValueError:
            return value  # validation names the field
    return value


async def form_fields(request: Request, model: type[BaseModel], max_files: int, max_fields: int) -> dict:
    """The form as the dict a JSON body would have been; unknown names are left to the model to name."""
    form = await request.form(max_files=max_files, max_fields=max_fields)
    data: dict[str, object] = {}
    for name in dict.fromkeys(form.keys()):
        info = model.model_fields.get(name)
        values: list[object] = []
        for raw in form.getlist(name):
            if isinstance(raw, UploadFile):
                values.append(await _file_value(name, raw))
            else:
                values.append(_text_value(raw, info) if info is not None else raw)
        if info is None:
            data[name] = values[0]  # the model names it as unknown
        elif _takes_list(info) or (_may_take_list(info) and len(values) > 1):
            data[name] = values
        elif len(values) > 1:
            raise InvalidInput(f"{name}: give it once, not {len(values)} times")
        else:
            data[name] = values[0]
    return data


def validated(model: type[M], data: object) -> M:
    """`data` (JSON bytes, or a dict from a form) as `model`, or the 422 a JSON body would get."""
    try:
        return model.model_validate_json(data) if isinstance(data, bytes) else model.model_validate(data)
    except ValidationError as exc:
        errors = [{**error, "loc": ("body", *error["loc"])} for error in exc.errors()]
        raise RequestValidationError(errors) from exc


def is_form(request: Request) -> bool:
    return request.headers.get("content-type", "").lower().startswith(FORM_TYPES)


def body_of(model: type[M]) -> Any:
    """A dependency that reads the body as JSON or as a form, into `model`."""

    async def read(request: Request) -> M:
        if is_form(request):
            settings = request.app.state.settings
            data = await form_fields(
                request,
                model,
                max_files=settings.max_images_per_request + 1,
                max_fields=max(settings.max_texts_per_request, settings.max_labels_per_request) + 16,
            )
            return validated(model, data)
        raw = await request.body()
        if not raw.strip():
            raise InvalidInput(
                "the request has no body: send JSON (Content-Type: application/json) or a form"
            )
        return validated(model, raw)

    read.__name__ = f"read_{model.__name__}"
    return Depends(read)


def _schema(model: type[BaseModel]) -> dict:
    return model.model_json_schema(ref_template="#/components/schemas/{model}")


def form_schema(model: type[BaseModel], files: dict[str, str]) -> dict:
    """The form version of `model`'s schema: the fields named in `files` are file uploads
    (described by their value), the others the same as in JSON (a form field each)."""
    schema = _schema(model)
    properties = dict(schema.get("properties", {}))
    for name, description in files.items():
        binary = {"type": "string", "format": "binary"}
        info = model.model_fields[name]
        properties[name] = {
            **({"type": "array", "items": binary} if _may_take_list(info) else binary),
            "description": description,
        }
    schema.pop("examples", None)
    return {**schema, "title": f"{model.__name__} (form)", "properties": properties}


def documented(model: type[BaseModel], files: dict[str, str]) -> dict:
    """`openapi_extra` of a route whose body `body_of(model)` reads: JSON, and the form."""
    form = form_schema(model, files)
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": _schema(model)},
                "multipart/form-data": {"schema": form},
            },
        }
    }
