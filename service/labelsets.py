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

Builds are kept under control: at most `labelset_builds` background builds run at once in a replica
(the others are `queued`, with their place; a build takes its lease only when it runs); a `PUT` stops
the builds of the definition it replaces and a `DELETE` stops the set's builds and removes its class
matrices (this replica's copies and Redis's; a replica building it elsewhere notices at its next
heartbeat); a build that runs past `labelset_build_timeout_s` stops, releases its lease and leaves
the set `failed` with the reason, for every replica (a marker beside the matrix in the cache), until
the set is `PUT` again.

A newly published version never makes a set answer `labelset_building`: before it replaces the
served one, every set whose class matrix the served version holds starts building on the new one in
the background (`warm`), and classification by the set keeps using the previous version, which the
registry keeps loaded for it, until the new matrix is ready (here or on any replica, through the
shared cache); then the set moves and the previous version is let go. A request naming a version
(`tiny@3`) gets that version, as ever; ad-hoc labels use the served version.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import anyio.to_thread
import numpy as np

from clipserve.service.builds import BuildSlots
from clipserve.service.errors import Conflict, NotFound, ServiceError, Unavailable
from clipserve.service.inference.cache import KEY_PREFIX, VectorCache
from clipserve.service.inference.engine import ModelEngine, classes_digest
from clipserve.service.inference.registry import ModelRegistry
from clipserve.service.limits import check_labels, check_name, check_prompts
from clipserve.service.metrics import Metrics
from clipserve.service.settings import Settings
from clipserve.service.stores import BackendUnavailableError
from clipserve.service.stores.labelset_store import LabelSet, LabelSetStore, open_labelsets
from clipserve.service.templates import resolve_templates

log = logging.getLogger("clipserve.labelsets")
SYNC_BUILD_TEXTS = 4096
_KNOWN_DEFINITIONS = 64
_WARM_POLL_S = 0.5  # how often the sets moving to a new version look for their new matrix
_FAILED_BUILDS = 64  # failed builds remembered, with their reasons, for the status of their sets
T = TypeVar("T")
Restart = Literal["any", "transient", "none"]


@dataclass
class Classes:
    """What a stored set classifies with: the engine, the set's labels and their class matrix, or
    the build that makes it within the request (a small set not built yet in this space)."""

    engine: ModelEngine
    labels: list[str]
    matrix: np.ndarray | Awaitable[np.ndarray]


@dataclass
class LabelSetStatus:
    labelset: LabelSet
    status: str  # ready, queued, building or failed
    progress: float
    error: str | None = None
    queue_position: int | None = None
    serving: str | None = None  # name@version classifying by this set now, once it is ready
    warming: LabelSetStatus | None = None  # its build on a newly served version, while it moves
    version: str | None = None  # of a warming status: the name@version it builds on


@dataclass
class Warming:
    """A stored set moving to a newly served version: it classifies with `previous`, whose class
    matrix is built, until `target`'s is."""

    name: str
    digest: str
    previous: str  # name@version
    target: str  # name@version


@dataclass(eq=False)
class Build:
    """A build of one set's matrix on one engine in this replica, with its progress (also logged)."""

    labelset: LabelSet
    engine: str
    key: tuple[str, str]  # (embedding space, digest)
    leased: bool  # a background build: it waits for a slot, then builds under the store's lease
    task: asyncio.Task | None = None
    done: int = 0
    error: str | None = None
    final: bool = False  # failed for good (over its time budget): only a PUT starts it again
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
        self.slots = BuildSlots(settings.labelset_builds)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._warming: dict[str, Warming] = {}
        self._watcher: asyncio.Task | None = None
        self._let_go: set[asyncio.Task] = set()

    # The store ----------------------------------------------------------------------------------

    async def _get_store(self) -> LabelSetStore:
        """Opened on first use: an app that never touches label sets creates no files."""
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

    async def _definition(self, name: str) -> LabelSet:
        check_name(name, "label set")
        head = await self._call("head", name)
        known = self._known.get(name)
        if known is not None and (head is None or head[0] != known.digest):
            self._forget_matrices(known.digest)  # changed or deleted on another replica
        if head is None or known is None or (known.digest, known.model) != head:
            known = await self._call("get", name) if head is not None else None
            if known is None:
                raise NotFound(f"label set {name!r} does not exist", code="labelset_not_found")
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
        labelset = await self._call(
            "put", LabelSet(name, engine.name, labels, resolved, classes_digest(labels, resolved))
        )
        self._known[name] = labelset
        self._stop_builds(name, keep=labelset.digest)
        await self._forget_failure(engine, labelset)  # a PUT is how a failed set is tried again
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
        """Delete the definition, stop its builds and remove its class matrices here and in Redis."""
        check_name(name, "label set")
        head = await self._call("head", name)
        if not await self._call("delete", name):
            raise NotFound(f"label set {name!r} does not exist", code="labelset_not_found")
        self._known.pop(name, None)
        self._stop_builds(name)
        if head is not None:
            engines = self.registry.models()
            await self.cache.delete(
                *(engine.matrix_key(head[0]) for engine in engines),
                *(self._failure_key(engine, head[0]) for engine in engines),
            )

    async def classes(self, name: str, model: str | None) -> Classes:
        """A stored set's classes on the engine to classify with (the request's model, else the set's;
        while the set moves to a newly served version, the previous one unless the request names a
        version), looked up in the cache once: the matrix, or the build that makes it now (a set being
        built in the background answers `labelset_building`)."""
        labelset = await self._definition(name)
        engine = self.registry.resolve(model or labelset.model)
        matrix = None
        if model is None or "@" not in model:
            engine, matrix = await self._while_warming(engine, labelset)
        if matrix is None:
            matrix = await engine.cached_class_matrix(labelset.digest)
        if matrix is None:
            build = await self._build(engine, labelset, refuse_while_building=True)
            assert build is not None
            return Classes(engine, labelset.labels, build)
        return Classes(engine, labelset.labels, matrix)

    # A new version ------------------------------------------------------------------------------

    async def warm(self, previous: ModelEngine, new: ModelEngine) -> None:
        """Called by the registry before `new` replaces `previous`: each stored set of that model whose
        matrix `previous` holds and `new` lacks starts building on `new` in the background and keeps
        classifying with `previous` until it is ready."""
        if previous.space_id == new.space_id:
            return
        try:
            names = await self._call("names")
        except BackendUnavailableError as exc:
            log.warning(
                "label sets cannot warm up on %s (%s): they build when first used", new.ref, exc.message
            )
            return
        for name in names:
            try:
                labelset = await self._definition(name)
            except NotFound:
                continue
            if labelset.model.partition("@")[0] != new.name:
                continue
            if await new.cached_class_matrix(labelset.digest) is not None:
                continue
            if await previous.cached_class_matrix(labelset.digest) is None:
                continue  # built nowhere yet: nothing to keep serving, it builds as any set does
            self._warming[name] = Warming(name, labelset.digest, previous.ref, new.ref)
            await self._background(new, labelset, restart="transient")
            log.info(
                "label set %s: building on %s, classifying with %s until then", name, new.ref, previous.ref
            )
        if self._warming and (self._watcher is None or self._watcher.done()):
            self._watcher = asyncio.get_running_loop().create_task(
                self._watch_warming(), name="labelset-warming"
            )

    def versions_in_use(self) -> dict[str, list[str]]:
        """The versions sets still classify with while they move (for the registry to keep loaded)."""
        needs: dict[str, list[str]] = {}
        for warming in self._warming.values():
            needs.setdefault(warming.previous, []).append(f"label set {warming.name} until {warming.target}")
        return needs

    def _warm(self, engine: ModelEngine, labelset: LabelSet) -> Warming | None:
        """The set's move to `engine`, if it is moving there."""
        warming = self._warming.get(labelset.name)
        if warming is None or warming.target != engine.ref or warming.digest != labelset.digest:
            return None
        return warming

    async def _while_warming(
        self, engine: ModelEngine, labelset: LabelSet
    ) -> tuple[ModelEngine, np.ndarray | None]:
        """`engine`, or the previous version while the set's matrix on `engine` is not built yet; with
        the matrix on `engine` when this had to look it up and found it (no second look-up)."""
        warming = self._warm(engine, labelset)
        if warming is None:
            return engine, None
        matrix = await engine.cached_class_matrix(labelset.digest)
        if matrix is not None:
            await self._moved([warming])
            return engine, matrix
        try:
            return self.registry.resolve(warming.previous), None
        except ServiceError:  # let go meanwhile: the set moves now
            await self._moved([warming])
            return engine, None

    async def _watch_warming(self) -> None:
        """Until every moving set has moved: move those whose new matrix is ready (built here or on
        another replica), whose build failed for good, or that were changed or deleted; keep their
        builds going (a replica that held the lease and died is taken over)."""
        while self._warming:
            await asyncio.sleep(_WARM_POLL_S)
            done = []
            for warming in list(self._warming.values()):
                try:
                    target = self.registry.resolve(warming.target)
                    labelset = await self._definition(warming.name)
                except NotFound:
                    done.append(warming)
                    continue
                except ServiceError:
                    continue  # the store is down: look again later
                if labelset.digest != warming.digest:
                    done.append(warming)
                    continue
                if await target.cached_class_matrix(labelset.digest) is not None:
                    done.append(warming)
                    continue
                try:
                    state = await self._background(target, labelset, restart="transient")
                except ServiceError:
                    continue
                if state.status == "failed":
                    done.append(warming)
            if done:
                await self._moved(done)

    async def _moved(self, moved: list[Warming]) -> None:
        """These sets classify with their new version from now on; versions nothing needs any more
        are let go."""
        gone = [w for w in moved if self._warming.get(w.name) is w]
        for warming in gone:
            del self._warming[warming.name]
            log.info("label set %s: now classifying with %s", warming.name, warming.target)
        if gone:
            task = asyncio.get_running_loop().create_task(self.registry.keep_needed(), name="labelset-moved")
            self._let_go.add(task)
            task.add_done_callback(self._let_go.discard)

    # Builds -------------------------------------------------------------------------------------

    async def _built(
        self, engine: ModelEngine, labelset: LabelSet, refuse_while_building: bool = True
    ) -> np.ndarray | None:
        """The set's matrix for this engine. The one rule for building now or in the background:
        a set of at most SYNC_BUILD_TEXTS prompts is built and awaited here; a larger one builds in
        the background (here, or on the replica holding its lease), and the caller gets
        `labelset_building` (or None when `refuse_while_building` is off, as for a PUT, which also
        starts a failed build again)."""
        matrix = await engine.cached_class_matrix(labelset.digest)
        if matrix is not None:
            return matrix
        build = await self._build(engine, labelset, refuse_while_building)
        return None if build is None else await build

    async def _build(
        self, engine: ModelEngine, labelset: LabelSet, refuse_while_building: bool
    ) -> Awaitable[np.ndarray] | None:
        """For a set whose matrix the cache has not got (the caller just looked): the build to await
        for a small one; for a large one, its background build made sure of and, as `_built` says,
        `labelset_building` or None."""
        if labelset.prompts <= SYNC_BUILD_TEXTS:
            return self._built_now(engine, labelset)
        state = await self._background(
            engine, labelset, restart="any" if not refuse_while_building else "transient"
        )
        if not refuse_while_building:
            return None
        if state.status == "failed":
            raise Conflict(
                f"label set {labelset.name!r} failed to build for {engine.ref}: {state.error}",
                code="labelset_failed",
            )
        where = (
            f"queued behind {state.queue_position - 1} other build(s)"
            if state.queue_position is not None
            else f"{state.progress:.0%} done"
        )
        raise Conflict(
            f"label set {labelset.name!r} is being built for {engine.ref} ({where}); retry shortly",
            code="labelset_building",
            retry_after_s=5,
        )

    async def _built_now(self, engine: ModelEngine, labelset: LabelSet) -> np.ndarray:
        """A small set's matrix, built within the request; one that a listing queued for the
        background is taken out of the queue and built now instead."""
        queued = self.builds.get((engine.space_id, labelset.digest))
        if queued is not None and self.slots.place(queued) is not None:
            self._cancel(queued)
        build = self._local_build(engine, labelset, leased=False)
        assert build.task is not None
        try:
            matrix = await asyncio.shield(build.task)
        except ServiceError:
            raise
        except Exception as exc:
            raise Unavailable(
                f"label set {labelset.name!r} could not be built on {engine.ref}: {build.error}",
                code="labelset_failed",
            ) from exc
        if matrix is None:  # a background build that gave way to another replica's
            raise Conflict(
                f"label set {labelset.name!r} is being built on another replica; retry shortly",
                code="labelset_building",
                retry_after_s=1,
            )
        return matrix

    async def _background(
        self, engine: ModelEngine, labelset: LabelSet, restart: Restart = "none"
    ) -> LabelSetStatus:
        """Make sure a large set is being built somewhere: here (queued or running), or on the replica
        that holds a live lease; its status. A failed build starts again when `restart` says so:
        `any` (a PUT), `transient` (a classify: not one stopped for its time budget), `none`."""
        build = self.builds.get((engine.space_id, labelset.digest))
        if build is not None and build.error is None:
            return self._local_status(build)
        lease = await self._call("build", engine.space_id, labelset.digest)
        if lease is not None and lease.owner != self.owner and lease.age_s < self.settings.labelset_lease_s:
            return LabelSetStatus(labelset, "building", lease.done / lease.total if lease.total else 0.0)
        if restart != "any":
            failure = (
                build.error if build is not None and build.final else await self._failure(engine, labelset)
            )
            if failure is not None:
                return LabelSetStatus(labelset, "failed", build.progress if build else 0.0, failure)
            if build is not None and restart == "none":
                return self._local_status(build)
        return self._local_status(self._local_build(engine, labelset, leased=True))

    def _local_status(self, build: Build) -> LabelSetStatus:
        if build.error is not None:
            return LabelSetStatus(build.labelset, "failed", build.progress, build.error)
        place = self.slots.place(build)
        if place is not None:
            return LabelSetStatus(build.labelset, "queued", 0.0, queue_position=place)
        return LabelSetStatus(build.labelset, "building", build.progress)

    def _local_build(self, engine: ModelEngine, labelset: LabelSet, leased: bool) -> Build:
        """Start (or join) this replica's build of a set's matrix on one engine: a background one
        (`leased`) runs when a slot is free (queued till then), a small one at once."""
        key = (engine.space_id, labelset.digest)
        build = self.builds.get(key)
        if build is not None and build.error is None:
            return build
        build = Build(labelset, engine.ref, key, leased)
        turn = self.slots.join(build) if leased else None
        self._count_builds()

        async def run() -> np.ndarray | None:
            if not leased:
                return await self._run(engine, build)
            try:
                if turn is not None:
                    await turn
                    build.started = time.monotonic()
                return await self._run_leased(engine, build)
            finally:
                self.slots.leave(build)
                self._count_builds()

        build.task = asyncio.get_running_loop().create_task(run(), name=f"labelset-build-{labelset.name}")
        build.task.add_done_callback(lambda t: t.cancelled() or t.exception())
        self.builds[key] = build
        return build

    async def _run_leased(self, engine: ModelEngine, build: Build) -> np.ndarray | None:
        """A background build once it has its slot: unless its set changed meanwhile, or another
        replica built it or builds it now, it takes the lease and builds with a heartbeat. The lease
        is released when it ends, except after a failure another replica may get past (it takes the
        build over once the lease expires)."""
        labelset = build.labelset
        matrix = await engine.cached_class_matrix(labelset.digest)
        head = await self._call("head", labelset.name) if matrix is None else None
        if matrix is not None or head is None or head[0] != labelset.digest:
            self._drop(build)
            return matrix
        lease = await self._call(
            "claim_build",
            engine.space_id,
            labelset.digest,
            self.owner,
            len(labelset.labels),
            self.settings.labelset_lease_s,
        )
        if lease.owner != self.owner:
            self._drop(build)
            return None
        beat = asyncio.get_running_loop().create_task(self._heartbeat(engine, build))
        release = True
        try:
            return await self._run(engine, build)
        except Exception:
            release = build.final
            raise
        finally:
            beat.cancel()
            if release:
                await self._release(engine, labelset)

    async def _run(self, engine: ModelEngine, build: Build) -> np.ndarray:
        """Build within `labelset_build_timeout_s`; one over it fails for good, for every replica."""
        labelset, budget = build.labelset, self.settings.labelset_build_timeout_s
        try:
            async with asyncio.timeout(budget):
                matrix = await engine.build_class_matrix(
                    labelset.labels, labelset.templates, labelset.digest, stored=True, progress=build.advance
                )
        except TimeoutError:
            build.error = (
                f"the build took longer than {budget:g} s (labelset_build_timeout_s) and was stopped after "
                f"{build.done} of {len(labelset.labels)} labels; PUT the set again to retry"
            )
            build.final = True
            log.error("label set %s build on %s: %s", labelset.name, engine.ref, build.error)
            await self.cache.set_blob(
                self._failure_key(engine, labelset.digest), build.error.encode(), keep=False
            )
            self._keep_failed(build)
            raise
        except asyncio.CancelledError:
            self._drop(build)
            raise
        except Exception as exc:
            build.error = exc.message if isinstance(exc, ServiceError) else f"{type(exc).__name__}: {exc}"
            log.exception("label set %s build on %s failed", labelset.name, engine.ref)
            self._keep_failed(build)
            raise
        self._drop(build)
        return matrix

    def _count_builds(self) -> None:
        self.metrics.labelset_builds.labels(state="running").set(self.slots.running)
        self.metrics.labelset_builds.labels(state="queued").set(self.slots.waiting)

    def _drop(self, build: Build) -> None:
        if self.builds.get(build.key) is build:
            del self.builds[build.key]

    def _keep_failed(self, build: Build) -> None:
        """A failed build stays for its set's status; past _FAILED_BUILDS, the oldest are forgotten."""
        failed = [b for b in self.builds.values() if b.error is not None and b is not build]
        for old in failed[: max(0, len(failed) + 1 - _FAILED_BUILDS)]:
            self._drop(old)

    def _cancel(self, build: Build) -> None:
        """Stop a build, queued or running; its slot or place goes to the next in line now (a task
        cancelled before it ever ran would not leave it)."""
        self._drop(build)
        self.slots.leave(build)
        self._count_builds()
        if build.task is not None:
            build.task.cancel()

    def _stop_builds(self, name: str, keep: str | None = None) -> None:
        """Stop this replica's builds of set `name`, queued or running, but those of digest `keep`."""
        for build in list(self.builds.values()):
            if build.labelset.name != name or build.labelset.digest == keep:
                continue
            running = build.task is not None and not build.task.done()
            self._cancel(build)
            if running:
                log.info(
                    "label set %s: stopped its build on %s (%s)",
                    name,
                    build.engine,
                    "deleted" if keep is None else "replaced",
                )

    def _failure_key(self, engine: ModelEngine, digest: str) -> str:
        return f"{KEY_PREFIX}:{engine.space_id}:classes-failed:{digest}"

    async def _failure(self, engine: ModelEngine, labelset: LabelSet) -> str | None:
        """Why the set's build failed for good on some replica, if it did (the cache's marker)."""
        raw = await self.cache.get_blob(
            self._failure_key(engine, labelset.digest), kind="labelset_failure", keep=False
        )
        return None if raw is None else raw.decode(errors="replace")

    async def _forget_failure(self, engine: ModelEngine, labelset: LabelSet) -> None:
        build = self.builds.get((engine.space_id, labelset.digest))
        if build is not None and build.error is not None:
            self._drop(build)
        await self.cache.delete(self._failure_key(engine, labelset.digest))

    def _forget_matrices(self, digest: str) -> None:
        for engine in self.registry.models():
            self.cache.forget(engine.matrix_key(digest))

    async def _heartbeat(self, engine: ModelEngine, build: Build) -> None:
        """Keep the lease fresh while the build runs, and stop the build once its set was changed or
        deleted (on any replica); a store outage only delays the heartbeat."""
        interval = max(0.2, self.settings.labelset_lease_s / 3)
        labelset = build.labelset
        while True:
            await asyncio.sleep(interval)
            try:
                ours = await self._call("heartbeat", engine.space_id, labelset.digest, self.owner, build.done)
                head = await self._call("head", labelset.name)
            except BackendUnavailableError as exc:
                log.warning("label set %s: lease heartbeat failed: %s", labelset.name, exc.message)
                continue
            if not ours:
                log.warning("label set %s: another replica took the build over", labelset.name)
            if head is None or head[0] != labelset.digest:
                self._stop_builds(labelset.name, keep=None if head is None else head[0])
                return

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
            return LabelSetStatus(labelset, "ready", 1.0, serving=engine.ref)
        warming = self._warm(engine, labelset)
        if warming is not None:
            serving, _ = await self._while_warming(engine, labelset)
            if serving is not engine:
                next_state = await self._background(engine, labelset, restart="transient")
                next_state.version = engine.ref
                return LabelSetStatus(labelset, "ready", 1.0, serving=serving.ref, warming=next_state)
        # Built nowhere here: make sure some replica builds it, so no set stays `building` forever.
        return await self._background(engine, labelset)

    async def close(self) -> None:
        """Stop the warming watcher and every build (their leases released, so another replica need
        not wait for them to expire), then close the store."""
        if self._watcher is not None:
            self._watcher.cancel()
        tasks = [b.task for b in self.builds.values() if b.task is not None and not b.task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        self.builds.clear()
        if self._store is not None:
            await anyio.to_thread.run_sync(self._store.close)
            self._store = None
