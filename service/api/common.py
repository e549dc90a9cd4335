"""What several routes do with HTTP itself: cancel work when the client leaves, shape vectors."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable
from typing import TypeVar

import numpy as np
from fastapi import Request

from service.errors import ClientGone
from service.schemas import ErrorResponse

T = TypeVar("T")


def encode_vectors(vectors: np.ndarray, encoding_format: str) -> list[list[float]] | list[str]:
    if encoding_format == "base64":
        little = np.ascontiguousarray(vectors, dtype="<f4")
        return [base64.b64encode(row.tobytes()).decode("ascii") for row in little]
    return vectors.astype(np.float32).tolist()


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run `work`; if the client goes away first, cancel it so its queued items are dropped."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    raise ClientGone("the client closed the connection")


def error_responses(*codes: int) -> dict[int | str, dict]:
    """The OpenAPI `responses` of a route: every listed status answers with the error body."""
    return {code: {"model": ErrorResponse} for code in codes}
