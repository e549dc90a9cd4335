"""One served model version and its whole path: tokenize, cache, batch, infer, normalize, score.

Everything that asks a model for vectors or scores goes through these public methods:

    engine.encode_texts(["a dog"])          -> TextVectors(vectors [N, D], truncated, tokens)
    engine.encode_images([png_bytes, ...])  -> float32 [N, D]   (bad image -> InvalidImage naming it)
    engine.encode_items(texts, images, n)   -> float32 [n, D]   (items given by position, both towers)
    engine.class_matrix(labels, templates)  -> float32 [labels, D], cached by the embedding space
    engine.classify(images, labels, classes, top_k) -> one ranked list of labels per image
    engine.rank(query, candidates, top_k, probabilities) -> candidates ranked by cosine

Each tower (`clipserve.service.inference.towers`) owns its runtime and its rows; the engine owns
the caches, the batchers and the scores. Vectors are L2-normalized. Requests go through the
model's dynamic batchers (`Overloaded` when a queue is full, `TimedOut` past the request timeout).
Text vectors are cached by the bundle's content hash (Redis shared by replicas, else in process),
class matrices likewise; scoring follows the bundle (`clipserve.contract.scoring`: softmax for CLIP,
sigmoid for SigLIP).

An engine stays usable for `retire_grace_s` after a newer version replaced it, and until its last
in-flight call ends (`using()`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import inspect
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from clipserve.contract.bundle import Manifest
from clipserve.contract.scoring import Scoring, class_vectors, normalize, prompts, top_k
from clipserve.contract.tokenizer import TokenizedBatch
from clipserve.service.errors import InvalidInput, TooLarge
from clipserve.service.inference.batching import Batcher
from clipserve.service.inference.cache import KEY_PREFIX, VectorCache
from clipserve.service.inference.loading import LoadedBundle
from clipserve.service.inference.preprocess import ImagePreprocessor
from clipserve.service.inference.towers import ImageTower, TextTower, TowerStats
from clipserve.service.metrics import Metrics
from clipserve.service.settings import Settings

log = logging.getLogger("clipserve.engine")
# Texts tokenized on the event loop rather than in the pool: a millisecond at most (uncached words)
_INLINE_TOKENIZE = 16
_INLINE_CHARS = 512
# a Redis look-up's cost when it could not be measured at start (Redis down then)
_UNMEASURED_ROUND_TRIP_MS = 1.0
# how many look-ups one encoding must be worth before text vectors go through Redis
SHARED_TEXT_CACHE_FACTOR = 10


def shares_text_vectors(mode: str, cache: VectorCache, encode_ms: float | None) -> bool:
    """Whether a model's text vectors go through the shared cache (Redis) or stay in this process.

    `auto` shares them when encoding a text costs at least SHARED_TEXT_CACHE_FACTOR Redis look-ups.
    A look-up costs the event loop, which every request of the process shares, about its round trip
    in CPU, and it is paid on every miss; an encoding runs beside the loop on the tower's thread, in
    batches. A tiny student encodes a text in 2-4 round trips and serves 1.2-1.3x more new texts per
    second from its in-process LRU than through Redis; ViT-B-32's text tower takes ~100."""
    if mode == "local" or not cache.configured:
        return False
    if mode == "shared" or encode_ms is None:
        return True
    round_trip = cache.round_trip_ms if cache.round_trip_ms is not None else _UNMEASURED_ROUND_TRIP_MS
    return encode_ms >= SHARED_TEXT_CACHE_FACTOR * round_trip


def prompt_chars(labels: Sequence[str], templates: Sequence[str]) -> int:
    """Characters of all the prompts of `labels` x `templates`, counted without building them."""
    slots = [template.count("{}") for template in templates]
    fixed = sum(len(template) for template in templates) - 2 * sum(slots)
    return len(labels) * fixed + sum(map(len, labels)) * sum(slots)


def classes_digest(labels: Sequence[str], templates: Sequence[str]) -> str:
    """Identity of a class matrix within one embedding space: its labels and templates, in order."""
    return hashlib.sha256(
        json.dumps([list(labels), list(templates)], ensure_ascii=False).encode()
    ).hexdigest()


@dataclass
class TextVectors:
    vectors: np.ndarray
    truncated: list[bool]
    tokens: int


@dataclass
class LabelScore:
    label: str
    score: float
    similarity: float | None  # None from a task model: no embedding space, no cosine


@dataclass
class Ranked:
    index: int
    score: float
    probability: float | None = None


class ModelEngine:
    def __init__(
        self,
        loaded: LoadedBundle,
        settings: Settings,
        metrics: Metrics,
        cache: VectorCache,
        pool: ThreadPoolExecutor,
    ):
        self.loaded = loaded
        self.bundle = loaded.bundle
        self.manifest: Manifest = loaded.bundle.manifest
        self.name = self.manifest.name
        self.version = self.manifest.version
        self.dim = self.manifest.embed_dim
        self.content_hash = self.manifest.content_hash
        self.scoring: Scoring = self.manifest.scorer
        self._tokenizer = loaded.tokenizer
        self._settings, self._metrics, self._cache, self._pool = settings, metrics, cache, pool
        self._preprocess_seconds = metrics.preprocess_seconds.labels(model=self.ref, tower="image")
        self.image_tower = ImageTower(
            loaded.image_runtime,
            metrics.encoder_calls.labels(model=self.ref, tower="image"),
            ImagePreprocessor(
                self.manifest.image,
                settings.max_image_pixels,
                settings.jpeg_draft_margin,
                settings.image_formats,
            ),
            self._preprocess_seconds,
        )
        self.text_tower = TextTower(
            loaded.text_runtime,
            metrics.encoder_calls.labels(model=self.ref, tower="text"),
            self.manifest.tokenizer.pad_token_id,
            self.manifest.text.dynamic_length,
        )
        self.in_flight = 0
        variant = "" if loaded.text_precision == "fp32" else f"-{loaded.text_precision}"
        # Vectors of an int8 or fp16 text graph differ slightly: they get a space of their own.
        self.space_id = f"{self.content_hash}{variant}"
        self._text_key_prefix = f"{KEY_PREFIX}:{self.space_id}:text:"
        self.shares_text_vectors = shares_text_vectors(settings.text_cache, cache, loaded.text_encode_ms)
        common = dict(
            max_wait_ms=settings.max_wait_ms,
            max_queue=settings.max_queue,
            timeout_s=settings.request_timeout_s,
            metrics=metrics,
        )
        self.image_batcher = Batcher(
            self.ref, "image", self.image_tower.run, max_batch=settings.max_batch_size_image, **common
        )
        self.text_batcher = Batcher(
            self.ref, "text", self.text_tower.run, max_batch=settings.max_batch_size_text, **common
        )

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def text_stats(self) -> TowerStats:
        return self.text_tower.stats

    @property
    def image_stats(self) -> TowerStats:
        return self.image_tower.stats

    def describe(self) -> dict:
        """What this version is: the fields `/v1/models` lists (the API adds OpenAI's own)."""
        return {
            "name": self.name,
            "version": self.version,
            "dim": self.dim,
            "content_hash": self.content_hash,
            "precision": {"image": self.loaded.image_precision, "text": self.loaded.text_precision},
            "providers": self.loaded.providers,
            "scoring": self.scoring.kind,
            "logit_scale": self.scoring.logit_scale,
            "logit_bias": self.manifest.logit_bias,
            "image_size": list(self.manifest.image.size),
            "context_length": self.manifest.tokenizer.context_length,
            "text_cache": self.text_cache,
            "source": self.manifest.source.model_dump(exclude_none=True, exclude={"config"}),
        }

    @property
    def text_cache(self) -> str:
        """Where this model's text vectors are cached: `shared` (Redis) or `local` (this process)."""
        return "shared" if self.shares_text_vectors else "local"

    def reduce(self, vectors: np.ndarray, dimensions: int | None) -> np.ndarray:
        """The first `dimensions` components of unit vectors, renormalized (exact for Matryoshka-
        trained models, an approximation for others); all of them when None."""
        if self.output_dim(dimensions) == self.dim:
            return vectors
        return normalize(vectors[..., :dimensions])

    def output_dim(self, dimensions: int | None) -> int:
        """The dim of vectors reduced to `dimensions`; refused when out of this model's range."""
        if dimensions is None:
            return self.dim
        if not 1 <= dimensions <= self.dim:
            raise InvalidInput(
                f"dimensions: {dimensions} is out of range; {self.ref} gives {self.dim}-dim vectors, "
                f"so use 1 to {self.dim}"
            )
        return dimensions

    # Texts ------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def using(self) -> Iterator[None]:
        """Hold this version while working with it: retirement waits until no one holds it."""
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    async def _tokenize(self, texts: Sequence[str]) -> TokenizedBatch:
        if len(texts) <= _INLINE_TOKENIZE and sum(map(len, texts)) <= _INLINE_CHARS:
            return self._tokenizer.encode(list(texts))
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, self._tokenizer.encode, list(texts)
        )

    async def _tokenize_prompts(self, labels: Sequence[str], templates: Sequence[str]) -> TokenizedBatch:
        """The prompts of `labels` x `templates`, built and tokenized in the pool unless trivially small."""
        if (
            len(labels) * len(templates) <= _INLINE_TOKENIZE
            and prompt_chars(labels, templates) <= _INLINE_CHARS
        ):
            return self._tokenizer.encode(prompts(labels, templates))
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, lambda: self._tokenizer.encode(prompts(labels, templates))
        )

    def _text_key(self, row: np.ndarray) -> str:
        digest = hashlib.sha256(np.ascontiguousarray(row, dtype=np.int64).tobytes()).hexdigest()
        return self._text_key_prefix + digest

    async def encode_texts(self, texts: Sequence[str]) -> TextVectors:
        """Unit vectors of `texts`, each from the cache or the text tower's batcher."""
        with self.using():
            batch = await self._tokenize(texts)
            vectors = await self._vectors_for_rows(self.text_tower.rows(batch), self._encode_text_rows)
            return TextVectors(vectors, [bool(t) for t in batch.truncated], int(batch.lengths.sum()))

    async def _encode_text_rows(self, rows: list[np.ndarray]) -> np.ndarray:
        """Token rows through the text tower: straight to its thread when it is idle, else queued."""
        if len(rows) <= self.text_batcher.max_batch:
            direct = await self.text_batcher.run_if_idle(lambda: rows)
            if direct is not None:
                return direct
        return await self.text_batcher.submit(rows)

    async def _vectors_for_rows(
        self, rows: list[np.ndarray], encode: Callable[[list[np.ndarray]], object]
    ) -> np.ndarray:
        """Vectors for token-id rows: from the cache where present, the rest with `encode` (cached)."""
        keys = [self._text_key(r) for r in rows]
        cached = await self._cache.get_vectors(keys, shared=self.shares_text_vectors)
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        missing: dict[str, list[int]] = {}
        for i, value in enumerate(cached):
            if value is not None and len(value) == 4 * self.dim:
                out[i] = np.frombuffer(value, dtype=np.float32)
            else:
                missing.setdefault(keys[i], []).append(i)
        if missing:
            vectors = await encode([rows[positions[0]] for positions in missing.values()])  # type: ignore[misc]
            for positions, vector in zip(missing.values(), vectors, strict=True):
                out[positions] = vector
            await self._cache.set_vectors(
                {k: v.tobytes() for k, v in zip(missing, vectors, strict=True)},
                shared=self.shares_text_vectors,
            )
        return out

    async def _encode_bulk(self, rows: list[np.ndarray]) -> np.ndarray:
        """Token rows on the text tower's inference thread, without the request queue: bulk work
        (class matrices) takes turns with live batches instead of filling their queue."""
        return await self.text_batcher.run_directly(rows)

    # Images -----------------------------------------------------------------------------------------

    async def encode_images(self, images: Sequence[bytes]) -> np.ndarray:
        """Unit vectors of encoded images (decoded and preprocessed in the pool, then batched).

        Before anything is decoded: the queue's room for them (`Overloaded`, a 429), then, for more
        than one image, their pixels together from their headers (`max_request_pixels`)."""
        with self.using():
            if len(images) == 1:
                prepare = functools.partial(self.image_tower.prepare_one, images[0])
                direct = await self.image_batcher.run_if_idle(prepare)
                if direct is not None:
                    return direct
            self.image_batcher.admit(len(images))
            loop = asyncio.get_running_loop()
            started = time.perf_counter()
            self.image_batcher.announce(len(images))
            try:
                if len(images) > 1:
                    await self._check_pixels(images)
                rows = await asyncio.gather(
                    *(
                        loop.run_in_executor(self._pool, self.image_tower.prepare, data, i)
                        for i, data in enumerate(images)
                    )
                )
            finally:
                self.image_batcher.withdraw(len(images))
            if images:
                self._preprocess_seconds.observe((time.perf_counter() - started) / len(images))
            return await self.image_batcher.submit(rows)

    async def _check_pixels(self, images: Sequence[bytes]) -> None:
        """The images' pixels together, read from their headers in the pool, within the budget of
        one request (one image is within it by `max_image_pixels`, which is never larger)."""
        read = self.image_tower.preprocessor.size
        sizes = await asyncio.get_running_loop().run_in_executor(
            self._pool, lambda: [read(data, i) for i, data in enumerate(images)]
        )
        total, budget = sum(width * height for width, height in sizes), self._settings.max_request_pixels
        if total > budget:
            raise TooLarge(
                f"images: {len(images)} images of {total} pixels together, at most {budget} per request "
                "(max_request_pixels); send them in several requests",
                code="too_many_pixels",
            )

    async def encode_items(
        self, texts: Mapping[int, str], images: Mapping[int, bytes], count: int
    ) -> np.ndarray:
        """Vectors for positions 0..count-1, each given as a text or an image; both towers at once.
        Positions given neither stay zero (the caller fills them, e.g. with vectors it was given).
        An image error's `index` is its place among `images`, in position order."""
        out = np.zeros((count, self.dim), dtype=np.float32)

        async def text_part() -> None:
            if texts:
                out[list(texts)] = (await self.encode_texts(list(texts.values()))).vectors

        async def image_part() -> None:
            if images:
                out[list(images)] = await self.encode_images(list(images.values()))

        await asyncio.gather(text_part(), image_part())
        return out

    # Classes and scores -----------------------------------------------------------------------------

    @property
    def matrix_prefix(self) -> str:
        """Cache keys of this space's class matrices start with this."""
        return f"{KEY_PREFIX}:{self.space_id}:classes:"

    def matrix_key(self, digest: str) -> str:
        return self.matrix_prefix + digest

    async def cached_class_matrix(self, digest: str) -> np.ndarray | None:
        """A class matrix already computed for this space: this replica's copy (kept in the cache's
        LRU of class matrices, by bytes, for every model), else the shared cache's."""
        raw = await self._cache.get_blob(self.matrix_key(digest), kind="class_matrix")
        if raw is None or len(raw) % (4 * self.dim):
            return None
        return np.frombuffer(raw, dtype=np.float32).reshape(-1, self.dim)

    async def class_matrix(
        self,
        labels: Sequence[str],
        templates: Sequence[str],
        *,
        stored: bool = False,
        progress: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """[labels, D] class vectors (`clipserve.contract.scoring.class_vectors` of the filled templates).

        Found in the caches when this space has computed it before; else encoded in chunks of
        `labelset_chunk_texts` texts on the text tower's thread, calling `progress(labels_done)` after
        each chunk. The caching policy, in one place: a `stored` label set's matrix is
        shared through the cache for every replica (and its prompts are not cached one by one); an
        ad-hoc label list keeps its matrix in this replica and caches each prompt's vector, since the
        same labels come back in other combinations. Prompts are built and tokenized a chunk at a
        time, off the event loop."""
        digest = classes_digest(labels, templates)
        matrix = await self.cached_class_matrix(digest)
        if matrix is not None:
            return matrix
        return await self.build_class_matrix(labels, templates, digest, stored=stored, progress=progress)

    async def build_class_matrix(
        self,
        labels: Sequence[str],
        templates: Sequence[str],
        digest: str,
        *,
        stored: bool = False,
        progress: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """`class_matrix` for a caller that has just looked the cache up itself (`digest` is
        `classes_digest(labels, templates)`): computed and cached, without a second look-up."""
        with self.using():
            matrix = await self._compute_classes(list(labels), list(templates), not stored, progress)
        await self._cache.set_blob(self.matrix_key(digest), matrix.tobytes(), shared=stored)
        return matrix

    async def _compute_classes(
        self,
        labels: list[str],
        templates: list[str],
        cache_texts: bool,
        progress: Callable[[int], None] | None,
    ) -> np.ndarray:
        per_chunk = max(1, self._settings.labelset_chunk_texts // len(templates))
        matrix = np.empty((len(labels), self.dim), dtype=np.float32)
        for start in range(0, len(labels), per_chunk):
            chunk = labels[start : start + per_chunk]
            rows = self.text_tower.rows(await self._tokenize_prompts(chunk, templates))
            if cache_texts:
                vectors = await self._vectors_for_rows(rows, self._encode_bulk)
            else:
                vectors = await self._encode_bulk(rows)
            matrix[start : start + len(chunk)] = class_vectors(vectors, len(templates))
            if progress is not None:
                progress(start + len(chunk))
        return matrix

    def score(
        self, image_vectors: np.ndarray, labels: Sequence[str], matrix: np.ndarray, k: int
    ) -> list[list[LabelScore]]:
        """Top-k labels per image, scored as the model was trained (`self.scoring`)."""
        similarity = image_vectors @ matrix.T
        orders, probabilities = self.scoring.ranked(similarity, k)
        return [
            [LabelScore(labels[j], float(probs[j]), float(sims[j])) for j in order]
            for order, probs, sims in zip(orders, probabilities, similarity, strict=True)
        ]

    async def classify(
        self,
        images: Sequence[bytes],
        labels: Sequence[str],
        classes: np.ndarray | Awaitable[np.ndarray],
        k: int,
    ) -> list[list[LabelScore]]:
        """Top-k of `labels` for each image. `classes` is their class matrix, or the work that makes
        it, which then runs while the images are encoded (when one fails, the other stops). A full
        image queue refuses the request before either starts."""
        try:
            self.image_batcher.admit_when_busy(len(images))
        except BaseException:
            if inspect.iscoroutine(classes):
                classes.close()  # never started
            raise
        if isinstance(classes, np.ndarray):
            return self.score(await self.encode_images(images), labels, classes, k)
        loop = asyncio.get_running_loop()
        work = [loop.create_task(_awaited(classes)), loop.create_task(self.encode_images(images))]
        try:
            matrix, vectors = await asyncio.gather(*work)
        finally:
            for task in work:
                task.cancel()
        return self.score(vectors, labels, matrix, k)

    def rank(
        self, query: np.ndarray, candidates: np.ndarray, k: int | None, probabilities: bool
    ) -> list[Ranked]:
        """Candidates by cosine to the query, highest first; optionally the model's probabilities."""
        scores = candidates @ query
        order = top_k(scores, k or len(scores))[0]
        probs = self.scoring.probabilities(scores[None, :])[0] if probabilities else None
        return [Ranked(int(i), float(scores[i]), None if probs is None else float(probs[i])) for i in order]

    # Lifecycle --------------------------------------------------------------------------------------

    def start(self) -> None:
        self.image_batcher.start()
        self.text_batcher.start()

    @property
    def alive(self) -> bool:
        return self.image_batcher.alive and self.text_batcher.alive

    @property
    def idle(self) -> bool:
        """Nothing holds this version and neither tower has work queued or running."""
        return not self.in_flight and self.image_batcher.idle and self.text_batcher.idle

    async def close(self) -> None:
        """Stop the batchers, then release the runtimes (TensorRT buffers and streams, sessions)."""
        await self.image_batcher.close()
        await self.text_batcher.close()
        for batcher in (self.image_batcher, self.text_batcher):  # no batch may still be running
            await asyncio.to_thread(batcher.executor.shutdown, wait=True)
        self.loaded.image_runtime.close()
        self.loaded.text_runtime.close()


async def _awaited(work: Awaitable[np.ndarray]) -> np.ndarray:
    return await work
