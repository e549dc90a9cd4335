"""The embedding operations: texts and images to vectors (`/v1/embed`, `/v1/embeddings`), one query
against candidates (`/v1/rank`), and the queries and items the collections embed.

Each operation checks the server's limits first, then fetches images, then asks one engine. They
take plain values (the API layer turns its request models into calls) and give plain results.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from clipserve.service.errors import InvalidImage, InvalidInput, TooLarge
from clipserve.service.inference.engine import ModelEngine, Ranked
from clipserve.service.inference.inputs import ImageFetcher
from clipserve.service.inference.registry import ModelRegistry
from clipserve.service.limits import check_images, check_item_texts, check_texts, check_top_k, unit_vector
from clipserve.service.settings import Settings


@dataclass(frozen=True)
class Input:
    """One text, image (an API string: base64, data URI or URL; or bytes uploaded) or vector: a query,
    or a candidate to rank (text or image)."""

    text: str | None = None
    image: str | bytes | None = None
    vector: Sequence[float] | None = None


@dataclass
class Embedded:
    engine: ModelEngine
    text_vectors: np.ndarray
    truncated: list[bool]
    image_vectors: np.ndarray
    tokens: int = 0

    @property
    def dim(self) -> int:
        return int(self.text_vectors.shape[1] if len(self.text_vectors) else self.image_vectors.shape[1])


@dataclass
class RankOutcome:
    engine: ModelEngine
    results: list[Ranked]


class Embedder:
    def __init__(self, registry: ModelRegistry, fetcher: ImageFetcher, settings: Settings):
        self.registry, self.fetcher, self.settings = registry, fetcher, settings

    async def embed(
        self,
        model: str | None,
        texts: Sequence[str],
        images: Sequence[str | bytes] = (),
        dimensions: int | None = None,
    ) -> Embedded:
        """Texts and images (as API strings, or bytes already uploaded) to vectors, both towers at once,
        optionally reduced to their first `dimensions` components."""
        check_images(len(images), self.settings)
        check_texts(texts, self.settings)
        if not texts and not images:
            raise InvalidInput("nothing to embed: give at least one text or image")
        engine = self.registry.resolve(model)
        engine.output_dim(dimensions)
        data = await self.fetcher.load(list(images))
        return await self._encode(engine, texts, data, dimensions)

    async def _encode(
        self, engine: ModelEngine, texts: Sequence[str], data: Sequence[bytes], dimensions: int | None
    ) -> Embedded:
        empty = np.zeros((0, engine.dim), dtype=np.float32)

        async def text_part() -> tuple[np.ndarray, list[bool], int]:
            if not texts:
                return empty, [], 0
            encoded = await engine.encode_texts(texts)
            return encoded.vectors, encoded.truncated, encoded.tokens

        async def image_part() -> np.ndarray:
            return await engine.encode_images(data) if data else empty

        if texts and data:  # both towers at once
            (text_vectors, truncated, tokens), image_vectors = await asyncio.gather(text_part(), image_part())
        else:  # one tower: no tasks to spawn
            (text_vectors, truncated, tokens), image_vectors = await text_part(), await image_part()
        return Embedded(
            engine,
            engine.reduce(text_vectors, dimensions),
            truncated,
            engine.reduce(image_vectors, dimensions),
            tokens,
        )

    async def embeddings(
        self, model: str | None, inputs: Sequence[str], modality: str = "text", dimensions: int | None = None
    ) -> Embedded:
        """The OpenAI-compatible call: `inputs` are texts, or images with `modality` "image"."""
        if not inputs:
            raise InvalidInput("input: the list is empty")
        engine = self.registry.resolve(model)
        engine.output_dim(dimensions)
        if modality == "image":
            check_images(len(inputs), self.settings, field="input")
            return await self._encode(engine, [], await self.fetcher.load(list(inputs)), dimensions)
        check_texts(inputs, self.settings, field="input")
        return await self._encode(engine, inputs, [], dimensions)

    async def rank(
        self,
        query: Input,
        candidates: Sequence[Input],
        *,
        model: str | None = None,
        top_k: int | None = None,
        probabilities: bool = False,
    ) -> RankOutcome:
        """Cosine of each candidate (a text or an image) to the query, highest first (and the
        model's probabilities)."""
        check_top_k(top_k, self.settings)
        texts = {i: c.text for i, c in enumerate(candidates) if c.text is not None}
        images = {i: c.image for i, c in enumerate(candidates) if c.image is not None}
        check_item_texts(texts, self.settings, field="candidates")
        check_images(
            len(images) + (query.image is not None), self.settings, field="images (query and candidates)"
        )
        engine = self.registry.resolve(model)
        query_vector, vectors = await asyncio.gather(
            self.query(engine, query),
            self.items(engine, texts, images, len(candidates), "candidates"),
        )
        return RankOutcome(engine, engine.rank(query_vector, vectors, top_k, probabilities))

    async def query(self, engine: ModelEngine, query: Input, dim: int | None = None) -> np.ndarray:
        """A query (text, image or vector) as a unit vector of the engine's space, reduced to `dim`
        components when given (a collection made with fewer dimensions)."""
        if query.vector is not None:
            return unit_vector(query.vector, dim or engine.dim, "query vector")
        if query.text is not None:
            check_texts([query.text], self.settings, field="query.text")
            vector = (await engine.encode_texts([query.text])).vectors[0]
        else:
            vector = (await engine.encode_images(await self.fetcher.load([query.image or ""])))[0]
        return engine.reduce(vector, dim)

    async def items(
        self,
        engine: ModelEngine,
        texts: Mapping[int, str],
        images: Mapping[int, str | bytes],
        count: int,
        field: str,
    ) -> np.ndarray:
        """Vectors for positions 0..count-1 given as texts or API image strings; an image's error
        names its item (`candidates[3].image`), not its place among the images."""
        return await self.encode_items(engine, texts, await self.load_images(images, field), count, field)

    async def load_images(self, images: Mapping[int, str | bytes], field: str) -> dict[int, bytes]:
        """The bytes of items' images (API strings decoded or fetched), by position; an error names
        its item."""
        positions = list(images)
        with _naming_items(positions, field):
            data = await self.fetcher.load(list(images.values()))
        return dict(zip(positions, data, strict=True))

    async def encode_items(
        self,
        engine: ModelEngine,
        texts: Mapping[int, str],
        images: Mapping[int, bytes],
        count: int,
        field: str,
    ) -> np.ndarray:
        """Vectors for positions 0..count-1 given as texts or image bytes; an error names its item."""
        with _naming_items(list(images), field):
            return await engine.encode_items(texts, images, count)


@contextlib.contextmanager
def _naming_items(positions: list[int], field: str) -> Iterator[None]:
    """An image error (`image 2 ...`, its place among the images) renamed after its item
    (`items[5].image ...`)."""
    try:
        yield
    except (InvalidImage, TooLarge) as exc:
        if exc.index is None or exc.index >= len(positions):
            raise
        position = positions[exc.index]
        raise exc.at(
            position, exc.message.replace(f"image {exc.index}", f"{field}[{position}].image", 1)
        ) from exc
