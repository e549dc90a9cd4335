"""Named label sets: definitions, their class matrices, and the builds that make them.

A label set is a name, its labels and templates, and the model it is bound to. Its class matrix
(one vector per label, `ModelEngine.class_matrix(..., stored=True)`) is computed once per embedding
space and shared through the cache, so any replica serving the same bundle classifies against it
with zero text-encoder calls. Definitions live in Redis:

    clipserve:v1:labelset:<name>                      definition (JSON: labels, templates, model)
    clipserve:v1:labelset-digest:<name>               digest of the current definition

A set of at most `SYNC_BUILD_TEXTS` prompts is built within the request; a larger one builds in
the background (`status: building`, with progress), and classification against it answers
`Conflict` (`labelset_building`) until it is ready.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np

from service.cache import KEY_PREFIX, VectorCache
from service.engine import ModelEngine, classes_digest
from service.errors import Conflict, NotFound, ServiceError, Unavailable
from service.limits import check_labels, check_name
from service.registry import ModelRegistry
from service.settings import Settings
from service.templates import resolve_templates

log = logging.getLogger("clipserve.labelsets")
DEF_PREFIX = f"{KEY_PREFIX}:labelset:"
DIGEST_PREFIX = f"{KEY_PREFIX}:labelset-digest:"
SYNC_BUILD_TEXTS = 4096
_KNOWN_DEFINITIONS = 32


@dataclass
class LabelSet:
    name: str
    model: str
    labels: list[str]
    templates: tuple[str, ...]
    created_at: str

    @property
    def digest(self) -> str:
        return classes_digest(self.labels, self.templates)

    @property
    def prompts(self) -> int:
        return len(self.labels) * len(self.templates)

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
class LabelSetStatus:
    labelset: LabelSet
    status: str
    progress: float
    error: str | None = None


@dataclass
class Build:
    """A running build of one set's matrix on one engine, with its progress (also in the log)."""

    labelset: LabelSet
    engine: str
    task: asyncio.Task | None = None
    done: int = 0
    error: str | None = None
    started: float = field(default_factory=time.monotonic)
    logged: float = 0.0

    @property
    def progress(self) -> float:
        total = len(self.labelset.labels)
        return self.done / total if total else 1.0

    def advance(self, done: int) -> None:
        self.done = done
        now = time.monotonic()
        if now - self.logged > 5 or done == len(self.labelset.labels):
            self.logged = now
            log.info(
                "label set %s on %s: %d/%d labels (%d templates) in %.1f s",
                self.labelset.name,
                self.engine,
                done,
                len(self.labelset.labels),
                len(self.labelset.templates),
                now - self.started,
            )


class LabelSetStore:
    """Definitions in Redis, plus a digest key per set so a classify reads 64 bytes, not the labels."""

    def __init__(self, cache: VectorCache):
        self.cache = cache
        self._by_digest: collections.OrderedDict[str, LabelSet] = collections.OrderedDict()

    def _keep(self, labelset: LabelSet) -> LabelSet:
        self._by_digest[labelset.digest] = labelset
        self._by_digest.move_to_end(labelset.digest)
        while len(self._by_digest) > _KNOWN_DEFINITIONS:
            self._by_digest.popitem(last=False)
        return labelset

    async def get(self, name: str) -> LabelSet:
        current = await self.cache.get_blob(DIGEST_PREFIX + name, kind="labelset")
        if current is not None and (known := self._by_digest.get(current.decode())) is not None:
            return known
        raw = await self.cache.get_blob(DEF_PREFIX + name, kind="labelset")
        if raw is None:
            raise NotFound(f"label set {name!r} does not exist", code="labelset_not_found")
        return self._keep(LabelSet.from_json(raw))

    async def put(self, labelset: LabelSet) -> None:
        await self.cache.set_blob(DEF_PREFIX + labelset.name, labelset.to_json())
        await self.cache.set_blob(DIGEST_PREFIX + labelset.name, labelset.digest.encode())
        self._keep(labelset)

    async def delete(self, name: str) -> bool:
        return await self.cache.delete(DEF_PREFIX + name, DIGEST_PREFIX + name) > 0

    async def names(self) -> list[str]:
        return [key[len(DEF_PREFIX) :] for key in await self.cache.scan(DEF_PREFIX)]


class LabelSets:
    """The label-set operations: create or replace, read, list, delete, and a set's classes."""

    def __init__(self, store: LabelSetStore, registry: ModelRegistry, settings: Settings):
        self.store, self.registry, self.settings = store, registry, settings
        self.builds: dict[tuple[str, str], Build] = {}

    async def put(
        self, name: str, labels: list[str], templates: list[str] | str | None, model: str | None
    ) -> LabelSetStatus:
        """Store the definition and build its classes: within the call for a set small enough,
        else in the background (the status then says `building`)."""
        check_name(name, "label set")
        check_labels(labels, self.settings.max_labelset_labels, self.settings.max_text_chars)
        resolved = resolve_templates(templates, self.settings.max_templates)
        engine = self.registry.resolve(model)
        created = datetime.now(UTC).isoformat(timespec="seconds")
        labelset = LabelSet(name, engine.name, labels, resolved, created)
        await self.store.put(labelset)
        await self._built(engine, labelset, wait=False, refuse_while_building=False)
        return await self._status(labelset)

    async def get(self, name: str) -> LabelSetStatus:
        check_name(name, "label set")
        return await self._status(await self.store.get(name))

    async def list_all(self) -> list[LabelSetStatus]:
        found = []
        for name in await self.store.names():
            try:
                labelset = await self.store.get(name)
            except NotFound:
                continue  # deleted between the scan and the read
            found.append(await self._status(labelset))
        return found

    async def delete(self, name: str) -> None:
        check_name(name, "label set")
        if not await self.store.delete(name):
            raise NotFound(f"label set {name!r} does not exist", code="labelset_not_found")

    async def bound(self, name: str, model: str | None) -> tuple[ModelEngine, LabelSet]:
        """A stored set and the engine to classify with: the request's model, else the set's."""
        labelset = await self.store.get(name)
        return self.registry.resolve(model or labelset.model), labelset

    async def matrix(self, engine: ModelEngine, labelset: LabelSet) -> np.ndarray:
        """The set's classes on this engine, built here when its embedding space has none yet."""
        matrix = await self._built(engine, labelset, wait=False)
        assert matrix is not None
        return matrix

    # Builds -------------------------------------------------------------------------------------

    async def _built(
        self, engine: ModelEngine, labelset: LabelSet, wait: bool, refuse_while_building: bool = True
    ) -> np.ndarray | None:
        """The set's matrix for this engine. The one rule for building now or in the background:
        a set of at most SYNC_BUILD_TEXTS prompts (or `wait`) is awaited; a larger one runs on, and
        the caller gets `labelset_building` (or None when `refuse_while_building` is off)."""
        matrix = await engine.cached_class_matrix(labelset.digest)
        if matrix is not None:
            return matrix
        build = self._start_build(engine, labelset)
        if wait or labelset.prompts <= SYNC_BUILD_TEXTS:
            try:
                assert build.task is not None
                return await asyncio.shield(build.task)
            except ServiceError:
                raise
            except Exception as exc:
                raise Unavailable(
                    f"label set {labelset.name!r} could not be built on {engine.ref}: {build.error}",
                    code="labelset_failed",
                ) from exc
        if not refuse_while_building:
            return None
        raise Conflict(
            f"label set {labelset.name!r} is being built for {engine.ref} "
            f"({build.progress:.0%} done); retry shortly",
            code="labelset_building",
            retry_after_s=5,
        )

    def _start_build(self, engine: ModelEngine, labelset: LabelSet) -> Build:
        """Start (or join) the build of a label set's matrix on one engine."""
        key = (engine.space_id, labelset.digest)
        build = self.builds.get(key)
        if build is not None and build.error is None:
            return build

        build = Build(labelset, engine.ref)

        async def run() -> np.ndarray:
            try:
                matrix = await engine.class_matrix(
                    labelset.labels, labelset.templates, stored=True, progress=build.advance
                )
            except Exception as exc:
                build.error = exc.message if isinstance(exc, ServiceError) else f"{type(exc).__name__}: {exc}"
                log.exception("label set %s build on %s failed", labelset.name, engine.ref)
                raise
            self.builds.pop(key, None)
            return matrix

        build.task = asyncio.get_running_loop().create_task(run())
        build.task.add_done_callback(lambda t: t.cancelled() or t.exception())
        self.builds[key] = build
        return build

    async def _status(self, labelset: LabelSet) -> LabelSetStatus:
        try:
            engine = self.registry.resolve(labelset.model)
        except ServiceError:
            return LabelSetStatus(labelset, "failed", 0.0, f"model {labelset.model!r} is not served here")
        if await engine.cached_class_matrix(labelset.digest) is not None:
            return LabelSetStatus(labelset, "ready", 1.0)
        build = self.builds.get((engine.space_id, labelset.digest))
        if build is None:
            return LabelSetStatus(labelset, "building", 0.0)
        if build.error is not None:
            return LabelSetStatus(labelset, "failed", build.progress, build.error)
        return LabelSetStatus(labelset, "building", build.progress)

    async def close(self) -> None:
        for build in self.builds.values():
            if build.task is not None:
                build.task.cancel()
        self.builds.clear()
