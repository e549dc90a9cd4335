"""Named label sets: definitions (data, in the durable store), their class matrices (cache), and the
builds that make them.

A label set is a name, its labels and templates, and the model it is bound to. The definition lives
in the label-set store beside the collections (`clipserve.service.stores.labelset_store`: SQLite under the data dir,
or PostgreSQL shared by replicas); it is acknowledged once committed, and losing Redis never loses it.
Its class matrix (one vector per label, `ModelEngine.class_matrix(..., stored=True)`) is computed
once per embedding space and shared through Redis, so any replica serving the same bundle classifies
against it with zero text-encoder calls; when Redis is down, the replica's own copy serves, else the
matrix is rebuilt.

Builds: a set of at most `SYNC_BUILD_TEXTS` prompts is built within the request that needs it; a
larger one builds in the background (`status: building`, with progress) under a lease in the store:
the owner's heartbeat tells the other replicas to wait (classification answers `labelset_building`)
and, once it stops for `labelset_lease_s`, another replica takes the build over. Changing a set
(`PUT` again) commits a new definition; its matrix is keyed by a digest of its labels and templates,
so a request pairs labels and classes of one definition, never a mix.

Sets written to Redis by earlier versions (`clipserve:v1:labelset:<name>`) are moved into the store
on start, once (retried until Redis answers), with the count in the log.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio.to_thread
import numpy as np
from clipserve.service.errors import Conflict, NotFound, ServiceError, Unavailable
from clipserve.service.inference.cache import KEY_PREFIX, VectorCache
from clipserve.service.inference.engine import ModelEngine, classes_digest
from clipserve.service.inference.registry import ModelRegistry
from clipserve.service.limits import check_labels, check_name, check_prompts
from clipserve.service.metrics import Metrics
from clipserve.service.settings import Settings
from clipserve.service.stores import BackendUnavailableError
from clipserve.service.stores.labelset_store import LabelSetRecord, LabelSetStore, open_labelsets
from clipserve.service.templates import resolve_templates

log = logging.getLogger("clipserve.labelsets")
LEGACY_DEF_PREFIX = f"{KEY_PREFIX}:labelset:"
LEGACY_DIGEST_PREFIX = f"{KEY_PREFIX}:labelset-digest:"
SYNC_BUILD_TEXTS = 4096
_KNOWN_DEFINITIONS = 64
T = TypeVar("T")


@dataclass(frozen=True)
class LabelSet:
    name: str
    model: str
    labels: list[str]
    templates: tuple[str, ...]
    created_at: str
    updated_at: str

    @property
    def digest(self) -> str:
        return classes_digest(self.labels, self.templates)

    @property
    def prompts(self) -> int:
        return len(self.labels) * len(self.templates)

    @classmethod
    def from_record(cls, record: LabelSetRecord) -> LabelSet:
        return cls(
            record.name, record.model, record.labels, record.templates, record.created_at, record.updated_at
        )

    def record(self) -> LabelSetRecord:
        return LabelSetRecord(
            self.name, self.model, self.labels, self.templates, self.digest, self.created_at, self.updated_at
        )


@dataclass
class LabelSetStatus:
    labelset: LabelSet
    status: str
    progress: float
    error: str | None = None


@dataclass
class Build:
    """A build of one set's matrix on one engine in this replica, with its progress (also logged)."""

    labelset: LabelSet
    engine: str
    leased: bool
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


class LabelSets:
    """The label-set operations: create or replace, read, list, delete, and a set's classes."""

    def __init__(
        self,
        registry: ModelRegistry,
        cache: VectorCache,
        settings: Settings,
        metrics: Metrics,
        open_store: Callable[[], LabelSetStore] | None = None,
    ):
        self.registry, self.cache, self.settings, self.metrics = registry, cache, settings, metrics
        self._open_store = open_store or (
            lambda: open_labelsets(
                settings.collections_backend, data_dir=settings.data_dir, dsn=settings.postgres_dsn
            )
        )
        self._store: LabelSetStore | None = None
        self._opening = asyncio.Lock()
        self._known: collections.OrderedDict[str, LabelSet] = collections.OrderedDict()
        self.builds: dict[tuple[str, str], Build] = {}
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._migration: asyncio.Task | None = None

    # The store ----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Move sets of the legacy Redis layout into the store, in the background. The store itself
        opens on first use (an app that never touches label sets creates no files)."""
        self._migration = asyncio.get_running_loop().create_task(self._migrate(), name="labelset-migration")

    async def _get_store(self) -> LabelSetStore:
        if self._store is None:
            async with self._opening:
                if self._store is None:
                    self._store = await self._blocking(self._open_store)
        return self._store

    async def _blocking(self, function: Callable[..., T], *args: Any) -> T:
        try:
            return await anyio.to_thread.run_sync(function, *args)
        except BackendUnavailableError:
            self.metrics.store_errors.labels(store="labelsets").inc()
            raise

    async def _call(self, method: str, *args: Any) -> Any:
        store = await self._get_store()
        return await self._blocking(getattr(store, method), *args)

    async def _migrate(self) -> None:
        """Move sets of the Redis layout into the store: retried until both answer, then done."""
        while True:
            try:
                moved, total = await self._migrate_once()
            except BackendUnavailableError:
                moved = None
            if moved is not None:
                if total:
                    log.info(
                        "moved %d label set(s) from Redis into the label-set store (%d already there)",
                        moved,
                        total - moved,
                    )
                return
            await asyncio.sleep(max(1.0, self.settings.redis_retry_s))

    async def _migrate_once(self) -> tuple[int | None, int]:
        if not self.cache.configured:
            return 0, 0
        keys = await self.cache.scan(LEGACY_DEF_PREFIX)
        if not self.cache.using_redis:
            return None, 0  # Redis is down: try again later
        records = []
        for key in keys:
            raw = await self.cache.get_blob(key, kind="labelset")
            if raw is None:
                continue
            data = json.loads(raw)
            templates = tuple(data["templates"])
            records.append(
                LabelSetRecord(
                    data["name"],
                    data["model"],
                    list(data["labels"]),
                    templates,
                    classes_digest(data["labels"], templates),
                    data["created_at"],
                    data["created_at"],
                )
            )
        if not records:
            return 0, 0
        moved = await self._call("put_missing", records)
        names = [r.name for r in records]
        await self.cache.delete(
            *(LEGACY_DEF_PREFIX + n for n in names), *(LEGACY_DIGEST_PREFIX + n for n in names)
        )
        return moved, len(records)

    async def _definition(self, name: str) -> LabelSet:
        check_name(name, "label set")
        head = await self._call("head", name)
        known = self._known.get(name)
        if head is None or known is None or (known.digest, known.model) != head:
            record = await self._call("get", name) if head is not None else None
            if record is None:
                raise NotFound(f"label set {name!r} does not exist", code="labelset_not_found")
            known = LabelSet.from_record(record)
        self._known[name] = known
        self._known.move_to_end(name)
        while len(self._known) > _KNOWN_DEFINITIONS:
            self._known.popitem(last=False)
        return known

    # Operations ---------------------------------------------------------------------------------

    async def put(
        self, name: str, labels: list[str], templates: list[str] | str | None, model: str | None
    ) -> LabelSetStatus:
        """Commit the definition, then build its classes: within the call for a set small enough,
        else in the background (the status then says `building`)."""
        check_name(name, "label set")
        check_labels(labels, self.settings.max_labelset_labels, self.settings.max_text_chars)
        resolved = resolve_templates(templates, self.settings)
        check_prompts(len(labels), len(resolved), self.settings.max_labelset_prompts, "max_labelset_prompts")
        engine = self.registry.resolve(model)
        record = LabelSetRecord(name, engine.name, labels, resolved, classes_digest(labels, resolved), "", "")
        labelset = LabelSet.from_record(await self._call("put", record))
        self._known[name] = labelset
        await self._built(engine, labelset, refuse_while_building=False)
        return await self._status(labelset)

    async def get(self, name: str) -> LabelSetStatus:
        return await self._status(await self._definition(name))

    async def list_all(self) -> list[LabelSetStatus]:
        found = []
        for name in await self._call("names"):
            try:
                labelset = await self._definition(name)
            except NotFound:
                continue  # deleted between the listing and the read
            found.append(await self._status(labelset))
        return found

    async def delete(self, name: str) -> None:
        check_name(name, "label set")
        if not await self._call("delete", name):
            raise NotFound(f"label set {name!r} does not exist", code="labelset_not_found")
        self._known.pop(name, None)

    async def bound(self, name: str, model: str | None) -> tuple[ModelEngine, LabelSet]:
        """A stored set and the engine to classify with: the request's model, else the set's."""
        labelset = await self._definition(name)
        return self.registry.resolve(model or labelset.model), labelset

    async def matrix(self, engine: ModelEngine, labelset: LabelSet) -> np.ndarray:
        """The set's classes on this engine, built here when its embedding space has none yet."""
        matrix = await self._built(engine, labelset)
        assert matrix is not None
        return matrix

    # Builds -------------------------------------------------------------------------------------

    async def _built(
        self, engine: ModelEngine, labelset: LabelSet, refuse_while_building: bool = True
    ) -> np.ndarray | None:
        """The set's matrix for this engine. The one rule for building now or in the background:
        a set of at most SYNC_BUILD_TEXTS prompts is built and awaited here; a larger one builds in
        the background (here, or on the replica holding its lease), and the caller gets
        `labelset_building` (or None when `refuse_while_building` is off)."""
        matrix = await engine.cached_class_matrix(labelset.digest)
        if matrix is not None:
            return matrix
        if labelset.prompts <= SYNC_BUILD_TEXTS:
            build = self._local_build(engine, labelset, leased=False)
            assert build.task is not None
            try:
                return await asyncio.shield(build.task)
            except ServiceError:
                raise
            except Exception as exc:
                raise Unavailable(
                    f"label set {labelset.name!r} could not be built on {engine.ref}: {build.error}",
                    code="labelset_failed",
                ) from exc
        progress = await self._background(engine, labelset)
        if not refuse_while_building:
            return None
        raise Conflict(
            f"label set {labelset.name!r} is being built for {engine.ref} ({progress:.0%} done); retry shortly",
            code="labelset_building",
            retry_after_s=5,
        )

    async def _background(self, engine: ModelEngine, labelset: LabelSet) -> float:
        """Make sure a large set is being built somewhere: here (joining, or taking the lease when it
        is free or expired) or on the replica that holds a live lease. Returns the build's progress."""
        key = (engine.space_id, labelset.digest)
        build = self.builds.get(key)
        if build is not None and build.error is None:
            return build.progress
        lease = await self._call(
            "claim_build",
            engine.space_id,
            labelset.digest,
            self.owner,
            len(labelset.labels),
            self.settings.labelset_lease_s,
        )
        if lease.owner != self.owner:
            return lease.done / lease.total if lease.total else 0.0
        return self._local_build(engine, labelset, leased=True).progress

    def _local_build(self, engine: ModelEngine, labelset: LabelSet, leased: bool) -> Build:
        """Start (or join) this replica's build of a set's matrix on one engine."""
        key = (engine.space_id, labelset.digest)
        build = self.builds.get(key)
        if build is not None and build.error is None:
            return build
        build = Build(labelset, engine.ref, leased)

        async def run() -> np.ndarray:
            beat = asyncio.get_running_loop().create_task(self._heartbeat(engine, build)) if leased else None
            try:
                matrix = await engine.class_matrix(
                    labelset.labels, labelset.templates, stored=True, progress=build.advance
                )
            except Exception as exc:
                build.error = exc.message if isinstance(exc, ServiceError) else f"{type(exc).__name__}: {exc}"
                log.exception("label set %s build on %s failed", labelset.name, engine.ref)
                raise
            finally:
                if beat is not None:
                    beat.cancel()
            self.builds.pop(key, None)
            if leased:
                await self._release(engine, labelset)
            return matrix

        build.task = asyncio.get_running_loop().create_task(run(), name=f"labelset-build-{labelset.name}")
        build.task.add_done_callback(lambda t: t.cancelled() or t.exception())
        self.builds[key] = build
        return build

    async def _heartbeat(self, engine: ModelEngine, build: Build) -> None:
        """Keep the lease fresh while the build runs; a store outage only delays the heartbeat."""
        interval = max(0.2, self.settings.labelset_lease_s / 3)
        while True:
            await asyncio.sleep(interval)
            try:
                ours = await self._call(
                    "heartbeat", engine.space_id, build.labelset.digest, self.owner, build.done
                )
            except BackendUnavailableError as exc:
                log.warning("label set %s: lease heartbeat failed: %s", build.labelset.name, exc.message)
                continue
            if not ours:
                log.warning("label set %s: another replica took the build over", build.labelset.name)

    async def _release(self, engine: ModelEngine, labelset: LabelSet) -> None:
        try:
            await self._call("release_build", engine.space_id, labelset.digest, self.owner)
        except BackendUnavailableError as exc:
            log.warning("label set %s: releasing the build lease failed: %s", labelset.name, exc.message)

    async def _status(self, labelset: LabelSet) -> LabelSetStatus:
        try:
            engine = self.registry.resolve(labelset.model)
        except ServiceError:
            return LabelSetStatus(labelset, "failed", 0.0, f"model {labelset.model!r} is not served here")
        if await engine.cached_class_matrix(labelset.digest) is not None:
            return LabelSetStatus(labelset, "ready", 1.0)
        build = self.builds.get((engine.space_id, labelset.digest))
        if build is not None and build.error is not None:
            return LabelSetStatus(labelset, "failed", build.progress, build.error)
        if build is not None:
            return LabelSetStatus(labelset, "building", build.progress)
        # Built nowhere here: make sure some replica builds it, so no set stays `building` forever.
        return LabelSetStatus(labelset, "building", await self._background(engine, labelset))

    async def close(self) -> None:
        if self._migration is not None:
            self._migration.cancel()
        for build in self.builds.values():
            if build.task is not None:
                build.task.cancel()
        self.builds.clear()
        if self._store is not None:
            await anyio.to_thread.run_sync(self._store.close)
            self._store = None
