"""POST /v1/rank: one query (text, image or vector) against candidates given in the request.

Scores are cosine similarities, highest first; with `"probabilities": true` each result also gets
softmax(logit_scale * cosine) over all the candidates. Query and candidates go through the same
batchers as /v1/embed. The query helpers here are shared with the collection search.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.api.common import check_images, check_texts, get_fetcher, get_settings, unless_disconnected
from service.errors import ApiError
from service.inputs import ImageFetcher
from service.registry import ModelRegistry, ServedModel, get_registry
from service.schemas import ErrorResponse
from service.settings import Settings

router = APIRouter(tags=["retrieval"])

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 409, 413, 422, 429, 503)
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Query(_Strict):
    """Exactly one of text, image (base64, data URI or URL) or vector."""

    text: str | None = None
    image: str | None = None
    vector: list[float] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Query:
        given = [name for name in ("text", "image", "vector") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of text, image or vector (got {', '.join(given) or 'none'})")
        return self


class Candidate(_Strict):
    """Exactly one of text or image."""

    text: str | None = None
    image: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Candidate:
        if (self.text is None) == (self.image is None):
            raise ValueError("give exactly one of text or image")
        return self


class RankRequest(_Strict):
    model: str | None = Field(None, description="name or name@version; the default model when absent")
    query: Query
    candidates: list[Candidate] = Field(min_length=1)
    top_k: int | None = Field(None, description="results to return; all candidates when absent")
    probabilities: bool = Field(
        False, description="also give softmax(logit_scale * cosine) over the candidates"
    )


class RankResult(BaseModel):
    index: int
    score: float
    probability: float | None = None


class RankResponse(BaseModel):
    model: str
    version: int
    dim: int
    results: list[RankResult]


def check_top_k(top_k: int | None, settings: Settings) -> None:
    if top_k is None:
        return
    if top_k < 1:
        raise ApiError(422, "invalid_request", f"top_k must be at least 1, got {top_k}")
    if top_k > settings.max_top_k:
        raise ApiError(422, "invalid_request", f"top_k {top_k} is over the limit of {settings.max_top_k}")


def check_item_texts(texts: dict[int, str], settings: Settings, field: str) -> None:
    """Limits of /v1/embed for texts that are items of a list; errors name the item's position."""
    if len(texts) > settings.max_texts_per_request:
        raise ApiError(
            413,
            "too_many_texts",
            f"{field}: {len(texts)} texts given, at most {settings.max_texts_per_request} per request",
        )
    for position, text in texts.items():
        if not text.strip():
            raise ApiError(
                422, "invalid_request", f"{field}[{position}].text is an empty string", index=position
            )
        if len(text) > settings.max_text_chars:
            raise ApiError(
                413,
                "text_too_long",
                f"{field}[{position}].text has {len(text)} characters, at most "
                f"{settings.max_text_chars} allowed",
                index=position,
            )


def query_vector(values: list[float], dim: int, field: str = "vector") -> np.ndarray:
    """A caller's vector as a unit float32 row; 422 for a wrong dim, NaN/inf or all zeros."""
    vector = np.asarray(values, dtype=np.float32)
    if vector.shape != (dim,):
        raise ApiError(
            422, "invalid_vector", f"{field} has {vector.size} dimensions, the model's space has {dim}"
        )
    if not np.isfinite(vector).all():
        raise ApiError(422, "invalid_vector", f"{field} contains NaN or infinity")
    norm = float(np.linalg.norm(vector))
    if norm == 0:
        raise ApiError(422, "invalid_vector", f"{field} is all zeros and has no direction")
    return vector / norm


async def embed_query(
    model: ServedModel, query: Query, fetcher: ImageFetcher, settings: Settings
) -> np.ndarray:
    """The query as a unit vector of `model`'s space."""
    if query.vector is not None:
        return query_vector(query.vector, model.dim, "query vector")
    if query.text is not None:
        check_texts([query.text], settings, field="query.text")
        vectors, _ = await model.embed_texts([query.text])
        return vectors[0]
    images = await fetcher.load([query.image or ""])
    return (await model.embed_images(images))[0]


async def embed_mixed(
    model: ServedModel,
    texts: dict[int, str],
    images: dict[int, str],
    count: int,
    fetcher: ImageFetcher,
    field: str,
) -> np.ndarray:
    """Vectors for positions 0..count-1 given as texts or images, in position order, both towers at once."""
    out = np.zeros((count, model.dim), dtype=np.float32)
    text_positions, image_positions = list(texts), list(images)

    async def text_part() -> None:
        if text_positions:
            vectors, _ = await model.embed_texts([texts[p] for p in text_positions])
            out[text_positions] = vectors

    async def image_part() -> None:
        if image_positions:
            try:
                data = await fetcher.load([images[p] for p in image_positions])
            except ApiError as exc:
                if exc.index is not None:  # name the item, not its position among the images
                    position = image_positions[exc.index]
                    exc.message = exc.message.replace(f"image {exc.index}", f"{field}[{position}].image", 1)
                    exc.index = position
                raise
            out[image_positions] = await model.embed_images(data)

    await asyncio.gather(text_part(), image_part())
    return out


def rank_scores(
    query: np.ndarray, candidates: np.ndarray, logit_scale: float, top_k: int | None, probabilities: bool
) -> list[RankResult]:
    scores = candidates @ query
    order = np.argsort(-scores, kind="stable")[: top_k or len(scores)]
    probs = None
    if probabilities:
        logits = logit_scale * scores
        exp = np.exp(logits - logits.max())
        probs = exp / exp.sum()
    return [
        RankResult(
            index=int(i), score=float(scores[i]), probability=None if probs is None else float(probs[i])
        )
        for i in order
    ]


@router.post(
    "/v1/rank",
    response_model=RankResponse,
    response_model_exclude_none=True,
    responses=ERRORS,
    summary="Rank candidates against a query",
)
async def rank(
    body: RankRequest,
    request: Request,
    registry: ModelRegistry = Depends(get_registry),
    fetcher: ImageFetcher = Depends(get_fetcher),
    settings: Settings = Depends(get_settings),
) -> RankResponse:
    """Cosine similarity of each candidate to the query, highest first; `index` is the candidate's position."""
    check_top_k(body.top_k, settings)
    texts = {i: c.text for i, c in enumerate(body.candidates) if c.text is not None}
    images = {i: c.image for i, c in enumerate(body.candidates) if c.image is not None}
    check_item_texts(texts, settings, field="candidates")
    check_images(
        len(images) + (body.query.image is not None), settings, field="images (query and candidates)"
    )
    model = registry.resolve(body.model)

    async def work() -> tuple[np.ndarray, np.ndarray]:
        query_job = embed_query(model, body.query, fetcher, settings)
        candidate_job = embed_mixed(model, texts, images, len(body.candidates), fetcher, "candidates")
        return tuple(await asyncio.gather(query_job, candidate_job))  # type: ignore[return-value]

    query, candidates = await unless_disconnected(request, work())
    results = rank_scores(query, candidates, model.logit_scale, body.top_k, body.probabilities)
    return RankResponse(model=model.name, version=model.version, dim=model.dim, results=results)
