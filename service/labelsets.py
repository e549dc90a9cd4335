"""Class matrices for zero-shot classification, and named label sets shared through Redis.

A class vector is the mean of the L2-normalized embeddings of `template.replace("{}", label)` over
the templates, renormalized. Matrices are float32 [labels, dim], keyed by the embedding space
(the bundle's content hash) and a digest of (labels, templates):

    clipserve:v1:labelset:<name>                      definition (JSON: labels, templates, model)
    clipserve:v1:labelset-digest:<name>               digest of the current definition
    clipserve:v1:<space>:classes:<digest>             class matrix, float32 bytes

So any replica serving the same bundle classifies against a stored label set with zero text-encoder
calls. Builds run in chunks of `labelset_chunk_texts` texts on the text tower's inference thread,
with progress in the log; a label set too large to build within a request builds in the
background (`status: building`) and classification answers 409 until it is ready.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

from service.cache import KEY_PREFIX, VectorCache
from service.errors import ApiError
from service.registry import ServedModel, normalize
from service.settings import Settings
from service.templates import fill

log = logging.getLogger("clipserve.labelsets")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
DEF_PREFIX = f"{KEY_PREFIX}:labelset:"
DIGEST_PREFIX = f"{KEY_PREFIX}:labelset-digest:"
SYNC_BUILD_TEXTS = 4096
_LOCAL_MATRICES = 32


def digest(labels: list[str], templates: tuple[str, ...]) -> str:
    return hashlib.sha256(json.dumps([labels, list(templates)], ensure_ascii=False).encode()).hexdigest()


def validate_labels(labels: list[str], limit: int, max_chars: int, field: str = "labels") -> None:
    if not labels:
        raise ApiError(422, "invalid_request", f"{field}: the list is empty; give at least one label")
    if len(labels) > limit:
        raise ApiError(422, "too_many_labels", f"{field}: {len(labels)} given, at most {limit} allowed")
    seen: dict[str, int] = {}
    for index, label in enumerate(labels):
        if not label.strip():
            raise ApiError(422, "invalid_request", f"{field}[{index}] is empty", index=index)
        if len(label) > max_chars:
            raise ApiError(
                422,
                "text_too_long",
                f"{field}[{index}] has {len(label)} characters, at most {max_chars} allowed",
                index=index,
            )
        if label in seen:
            raise ApiError(
                422,
                "invalid_request",
                f"{field}[{index}] {label!r} duplicates {field}[{seen[label]}]",
                index=index,
            )
        seen[label] = index


def validate_name(name: str) -> None:
    if not _NAME.match(name):
        raise ApiError(
            422,
            "invalid_request",
            f"label set name {name!r}: use letters, digits, '.', '_' or '-' "
            "(at most 128), starting with a letter or digit",
        )


@dataclass
class LabelSet:
    name: str
    model: str
    labels: list[str]
    templates: tuple[str, ...]
    created_at: str

    @property
    def digest(self) -> str:
        return digest(self.labels, self.templates)

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "name": self.name,
                "model": self.model,
                "labels": self.labels,
                "templates": list(self.templates),
                "created_at": self.created_at,
            }
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> LabelSet:
        data = json.loads(raw)
        return cls(data["name"], data["model"], data["labels"], tuple(data["templates"]), data["created_at"])


@dataclass
class Build:
    task: asyncio.Task
    total: int
    done: int = 0
    error: str | None = None

    @property
    def progress(self) -> float:
        return self.done / self.total if self.total else 1.0


class ClassMatrices:
    """Computes, caches and shares class matrices; keeps the running builds of this replica."""

    def __init__(self, cache: VectorCache, settings: Settings):
        self.cache, self.settings = cache, settings
        self._local: collections.OrderedDict[tuple[str, str], np.ndarray] = collections.OrderedDict()
        self.builds: dict[tuple[str, str], Build] = {}

    @staticmethod
    def matrix_key(model: ServedModel, key_digest: str) -> str:
        return f"{KEY_PREFIX}:{model.space_id}:classes:{key_digest}"

    def _remember(self, key: tuple[str, str], matrix: np.ndarray) -> None:
        self._local[key] = matrix
        self._local.move_to_end(key)
        while len(self._local) > _LOCAL_MATRICES:
            self._local.popitem(last=False)

    async def lookup(self, model: ServedModel, key_digest: str) -> np.ndarray | None:
        key = (model.space_id, key_digest)
        matrix = self._local.get(key)
        if matrix is not None:
            self._local.move_to_end(key)
            return matrix
        raw = await self.cache.get_blob(self.matrix_key(model, key_digest), kind="class_matrix")
        if raw is None or len(raw) % (4 * model.dim):
            return None
        matrix = np.frombuffer(raw, dtype=np.float32).reshape(-1, model.dim)
        self._remember(key, matrix)
        return matrix

    async def compute(
        self,
        model: ServedModel,
        labels: list[str],
        templates: tuple[str, ...],
        build: Build | None = None,
        name: str = "",
    ) -> np.ndarray:
        """Encode every label x template in chunks, on the text tower's thread, with progress in the log.

        Ad-hoc label lists (no `build`) read and fill the per-text cache; stored sets only keep
        their matrix."""
        per_chunk = max(1, self.settings.labelset_chunk_texts // len(templates))
        matrix = np.empty((len(labels), model.dim), dtype=np.float32)
        started, last_log = time.monotonic(), time.monotonic()
        for start in range(0, len(labels), per_chunk):
            chunk = labels[start : start + per_chunk]
            texts = [fill(t, label) for label in chunk for t in templates]
            vectors = await self._encode(model, texts, cache_texts=build is None)
            means = vectors.reshape(len(chunk), len(templates), model.dim).mean(axis=1)
            matrix[start : start + len(chunk)] = normalize(means)
            if build is not None:
                build.done = start + len(chunk)
            if time.monotonic() - last_log > 5 or start + per_chunk >= len(labels):
                last_log = time.monotonic()
                log.info(
                    "label set %s on %s: %d/%d labels (%d templates) in %.1f s",
                    name or "(request)",
                    model.ref,
                    start + len(chunk),
                    len(labels),
                    len(templates),
                    last_log - started,
                )
        return matrix

    @staticmethod
    async def _encode(model: ServedModel, texts: list[str], cache_texts: bool) -> np.ndarray:
        batch = await model.tokenize(texts)
        rows = model.token_rows(batch)
        if cache_texts:
            return await model.embed_token_rows(rows, bulk=True)
        return await model.run_bulk(rows)  # a stored set keeps its matrix, not one cache entry per text

    async def for_labels(
        self, model: ServedModel, labels: list[str], templates: tuple[str, ...]
    ) -> np.ndarray:
        """The class matrix of an ad-hoc label list (classify with `labels`)."""
        key_digest = digest(labels, templates)
        matrix = await self.lookup(model, key_digest)
        if matrix is None:
            matrix = await self.compute(model, labels, templates)
            self._remember((model.space_id, key_digest), matrix)
        return matrix

    async def build_and_store(self, model: ServedModel, labelset: LabelSet) -> Build:
        """Start (or join) the build of a label set's matrix; returns the running build."""
        key = (model.space_id, labelset.digest)
        build = self.builds.get(key)
        if build is not None and build.error is None:
            return build
        total = len(labelset.labels)

        async def run() -> np.ndarray:
            try:
                with model.using():
                    matrix = await self.compute(
                        model, labelset.labels, labelset.templates, build, labelset.name
                    )
                await self.cache.set_blob(self.matrix_key(model, labelset.digest), matrix.tobytes())
                self._remember(key, matrix)
                self.builds.pop(key, None)
                return matrix
            except Exception as exc:
                build.error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, ApiError) else exc.message
                log.exception("label set %s build on %s failed", labelset.name, model.ref)
                raise

        build = Build(task=asyncio.get_running_loop().create_task(run()), total=total)
        build.task.add_done_callback(lambda t: t.cancelled() or t.exception())
        self.builds[key] = build
        return build

    async def cancel_all(self) -> None:
        for build in self.builds.values():
            build.task.cancel()
        self.builds.clear()


class LabelSetStore:
    """Definitions in Redis, plus a digest key per set so a classify reads 64 bytes, not the labels."""

    def __init__(self, cache: VectorCache, matrices: ClassMatrices):
        self.cache, self.matrices = cache, matrices
        self._by_digest: collections.OrderedDict[str, LabelSet] = collections.OrderedDict()

    def _keep(self, labelset: LabelSet) -> LabelSet:
        self._by_digest[labelset.digest] = labelset
        self._by_digest.move_to_end(labelset.digest)
        while len(self._by_digest) > _LOCAL_MATRICES:
            self._by_digest.popitem(last=False)
        return labelset

    async def get(self, name: str) -> LabelSet:
        current = await self.cache.get_blob(DIGEST_PREFIX + name, kind="labelset")
        if current is not None and (known := self._by_digest.get(current.decode())) is not None:
            return known
        raw = await self.cache.get_blob(DEF_PREFIX + name, kind="labelset")
        if raw is None:
            raise ApiError(404, "labelset_not_found", f"label set {name!r} does not exist")
        return self._keep(LabelSet.from_json(raw))

    async def put(self, labelset: LabelSet) -> None:
        await self.cache.set_blob(DEF_PREFIX + labelset.name, labelset.to_json())
        await self.cache.set_blob(DIGEST_PREFIX + labelset.name, labelset.digest.encode())
        self._keep(labelset)

    async def delete(self, name: str) -> bool:
        return await self.cache.delete(DEF_PREFIX + name, DIGEST_PREFIX + name) > 0

    async def names(self) -> list[str]:
        return [key[len(DEF_PREFIX) :] for key in await self.cache.scan(DEF_PREFIX)]

    @staticmethod
    def new(name: str, model: ServedModel, labels: list[str], templates: tuple[str, ...]) -> LabelSet:
        return LabelSet(name, model.name, labels, templates, datetime.now(UTC).isoformat(timespec="seconds"))

    def status(self, model: ServedModel, labelset: LabelSet, ready: bool) -> tuple[str, float, str | None]:
        build = self.matrices.builds.get((model.space_id, labelset.digest))
        if ready:
            return "ready", 1.0, None
        if build is None:
            return "building", 0.0, None
        if build.error is not None:
            return "failed", build.progress, build.error
        return "building", build.progress, None

    async def matrix(self, model: ServedModel, labelset: LabelSet, wait: bool) -> np.ndarray:
        """The stored matrix; built here when missing (for a model version the set was not built for)."""
        matrix = await self.matrices.lookup(model, labelset.digest)
        if matrix is not None:
            return matrix
        build = await self.matrices.build_and_store(model, labelset)
        texts = len(labelset.labels) * len(labelset.templates)
        if wait or texts <= SYNC_BUILD_TEXTS:
            try:
                return await asyncio.shield(build.task)
            except ApiError:
                raise
            except Exception as exc:
                raise ApiError(
                    503,
                    "labelset_failed",
                    f"label set {labelset.name!r} could not be built on {model.ref}: {build.error}",
                ) from exc
        raise ApiError(
            409,
            "labelset_building",
            f"label set {labelset.name!r} is being built for {model.ref} "
            f"({build.progress:.0%} done); retry shortly",
            headers={"Retry-After": "5"},
        )
