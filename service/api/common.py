"""What several routes do with HTTP itself: cancel work when the client leaves, shape vectors, head
an answer with the model that made it."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable
from typing import TypeVar

import numpy as np
import orjson
from fastapi import Request
from fastapi.responses import JSONResponse

from clipserve.service.api.schemas import Candidate, ErrorResponse, Query
from clipserve.service.embedding import Input
from clipserve.service.errors import ClientGone
from clipserve.service.inference.engine import ModelEngine

T = TypeVar("T")


def as_input(given: Query | Candidate) -> Input:
    """A query or candidate of a request as the plain value the embedder takes."""
    return Input(text=given.text, image=given.image, vector=getattr(given, "vector", None))


def model_header(engine: ModelEngine, dim: int | None = None) -> dict[str, str | int]:
    """The fields every answer made by a model starts with (`schemas.ModelHeader`): the model, its
    version and the dim of the vectors given (the engine's own unless they were reduced)."""
    return {"model": engine.name, "version": engine.version, "dim": engine.dim if dim is None else dim}


def encode_vectors(vectors: np.ndarray, encoding_format: str) -> list[list[float]] | list[str]:
    if encoding_format == "base64":
        little = np.ascontiguousarray(vectors, dtype="<f4")
        return [base64.b64encode(row.tobytes()).decode("ascii") for row in little]
    return vectors.astype(np.float32).tolist()


def vector_payload(vectors: np.ndarray, encoding_format: str) -> np.ndarray | list[str]:
    """Vectors for a `VectorResponse`: float32 rows written by orjson as they are (no Python
    floats in between), or base64 strings."""
    if encoding_format == "base64":
        return encode_vectors(vectors, encoding_format)  # type: ignore[return-value]
    if len(vectors) == 0:
        return []  # type: ignore[return-value]
    return np.ascontiguousarray(vectors, dtype=np.float32)


class VectorResponse(JSONResponse):
    """JSON written by orjson, numpy arrays included: each float32 is written in its shortest form
    that reads back as the same float32, with no Python float per component."""

    def render(self, content: object) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run `work` in this task; if the client goes away first, cancel it (so its queued items are
    dropped) and raise ClientGone. One watcher task per request, nothing else in between."""
    current = asyncio.current_task()
    assert current is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone = True
        current.cancel()

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if not gone:
            raise
        current.uncancel()  # the cancellation was ours, and is answered by ClientGone
        raise ClientGone("the client closed the connection") from None
    finally:
        watcher.cancel()


def error_responses(*codes: int) -> dict[int | str, dict]:
    """The OpenAPI `responses` of a route: every listed status answers with the error body."""
    return {code: {"model": ErrorResponse} for code in codes}
