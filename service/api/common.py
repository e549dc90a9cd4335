"""Helpers shared by the routers: dependencies, input limits, vector encoding, disconnect guard."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable
from typing import TypeVar

import numpy as np
from fastapi import Request

from service.errors import ApiError
from service.inputs import ImageFetcher
from service.labelsets import ClassMatrices, LabelSetStore
from service.settings import Settings

T = TypeVar("T")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_fetcher(request: Request) -> ImageFetcher:
    return request.app.state.fetcher


def get_labelsets(request: Request) -> LabelSetStore:
    return request.app.state.labelsets


def get_matrices(request: Request) -> ClassMatrices:
    return request.app.state.matrices


def check_texts(texts: list[str], settings: Settings, field: str = "texts") -> None:
    if len(texts) > settings.max_texts_per_request:
        raise ApiError(
            413,
            "too_many_texts",
            f"{field}: {len(texts)} given, at most {settings.max_texts_per_request} per request",
        )
    for index, text in enumerate(texts):
        if not text.strip():
            raise ApiError(422, "invalid_request", f"{field}[{index}] is an empty string", index=index)
        if len(text) > settings.max_text_chars:
            raise ApiError(
                413,
                "text_too_long",
                f"{field}[{index}] has {len(text)} characters, at most {settings.max_text_chars} allowed",
                index=index,
            )


def check_images(count: int, settings: Settings, field: str = "images") -> None:
    if count > settings.max_images_per_request:
        raise ApiError(
            413,
            "too_many_images",
            f"{field}: {count} given, at most {settings.max_images_per_request} per request",
        )


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
    raise ApiError(499, "client_closed", "the client closed the connection")
