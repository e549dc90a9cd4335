"""The served models: discover them in the repository, load, verify, warm up, hot-swap, keep, retire.

    registry.resolve(None | "name" | "name@version") -> ModelEngine   (the default model for None)
    await registry.version("tiny", 1)                                 (loaded now if it must be)

Start-up serves each configured model at its newest loadable version (a broken newest version is
refused and the last good one serves; a model with none is left out), so one corrupt bundle never
keeps a replica down. `reload()` (polled, or `POST /v1/admin/reload`) loads new versions off the
event loop and swaps each in with one dict assignment; the replaced engine keeps serving the calls
that hold it and is closed after `retire_grace_s`.

Data outlives models: a version that a collection is still bound to (or that a re-embed job moves a
collection to) stays loaded beside the newest one, addressable as `name@version`, and is unloaded
once nothing needs it. What is needed comes from the data store (`needs`, read at start, on each
reload and by the job loop), so every replica keeps the same versions; a version asked for before
this replica read the store (a collection made on another replica) is loaded on first use.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from clipserve.contract.bundle import (
    BundleError,
    BundleIntegrityError,
    BundleNotFoundError,
    ModelRepository,
    parse_model_ref,
    read_manifest,
)
from clipserve.contract.tokenizer import TokenizerError
from clipserve.service.errors import InvalidInput, NotFound, ServiceError, Unavailable
from clipserve.service.inference.cache import VectorCache
from clipserve.service.inference.engine import ModelEngine
from clipserve.service.inference.loading import LoadedBundle, load_version, tower_file
from clipserve.service.inference.task_engine import TaskEngine, load_task
from clipserve.service.metrics import Metrics
from clipserve.service.runtime import ProviderUnavailableError, RuntimeConfigError
from clipserve.service.settings import Settings

log = logging.getLogger("clipserve.registry")
Needs = dict[str, list[str]]
"""Model versions something needs loaded, with why: `{"tiny@1": ["collection photos"]}`."""


def _resident_bytes() -> int | None:
    """This process's resident memory (Linux), to weigh what loading a version added."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


@dataclass(frozen=True)
class LeftOut:
    """A version that will not serve: `reason` in words for /readyz, `detail` (paths, exception
    text) for the log and the start-up error only."""

    model: str
    version: int | None
    reason: str
    detail: str


def refusal_reason(exc: BaseException) -> str:
    """Why a version was refused, in words that name no path and quote no exception."""
    if isinstance(exc, BundleIntegrityError):
        return "a file it lists is missing, corrupted, or outside the bundle"
    if isinstance(exc, TokenizerError):
        return "its tokenizer files cannot be used"
    if isinstance(exc, BundleNotFoundError):
        return "it is incomplete: no manifest, or no graph for a tower"
    if isinstance(exc, BundleError):
        return "its manifest is not valid"
    if isinstance(exc, RuntimeConfigError):
        return "the runtime cannot serve it with these settings (engine, precision or providers)"
    return "a graph failed to load or to run its warm-up"


@dataclass
class ReloadReport:
    loaded: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)


class ModelRegistry:
    def __init__(self, settings: Settings, metrics: Metrics, cache: VectorCache):
        self.settings, self.metrics, self.cache = settings, metrics, cache
        self.repository = ModelRepository(settings.models_dir)
        self.pool = ThreadPoolExecutor(
            max_workers=settings.preprocess_workers, thread_name_prefix="preprocess"
        )
        self._served: dict[str, ModelEngine] = {}
        # task models (bundle format 3): /v1/classify over their own labels only
        self._tasks: dict[str, TaskEngine] = {}
        # older versions kept loaded for what is bound to them, by name@version
        self._kept: dict[str, ModelEngine] = {}
        self._needed: Needs = {}
        self._loading: dict[str, asyncio.Task[ModelEngine]] = {}
        self.needs: Callable[[], Awaitable[Needs]] | None = None
        # told of each new version before it replaces the served one (label sets warm up on it)
        self.on_replace: Callable[[ModelEngine, ModelEngine], Awaitable[None]] | None = None
        self._pinned: dict[str, int | None] = {}
        self._refused: dict[tuple[str, int | None], str] = {}
        self._left_out: dict[str, LeftOut] = {}
        self._reload_lock = asyncio.Lock()
        self._retiring: dict[asyncio.Task, ModelEngine] = {}
        self.ready = False

    # Resolution ----------------------------------------------------------------------------------

    @property
    def default_name(self) -> str | None:
        if self.settings.default_model:
            return parse_model_ref(self.settings.default_model)[0]
        return next(iter(sorted(self._served)), None)

    def models(self) -> list[ModelEngine]:
        return [self._served[name] for name in sorted(self._served)]

    def tasks(self) -> list[TaskEngine]:
        return [self._tasks[name] for name in sorted(self._tasks)]

    def task(self, model_ref: str | None) -> TaskEngine | None:
        """The task model a request names (`name` or its served `name@version`), or None."""
        if model_ref is None or not self._tasks:
            return None
        try:
            name, version = parse_model_ref(model_ref)
        except BundleError:
            return None
        return self._task_named(name, version, model_ref)

    def _task_named(self, name: str, version: int | None, ref: str) -> TaskEngine | None:
        task = self._tasks.get(name)
        if task is not None and version not in (None, task.version):
            raise NotFound(f"model {ref!r} is not served here; served: {task.ref}", code="model_not_found")
        return task

    def resolve(self, model_ref: str | None) -> ModelEngine:
        if not self._served and (model_ref is None or not self._tasks):
            raise Unavailable("no model is loaded yet", code="not_ready", retry_after_s=1)
        ref = model_ref if model_ref is not None else self.default_name
        try:
            name, version = parse_model_ref(ref or "")
        except BundleError as exc:
            raise InvalidInput(f"model: {exc}") from exc
        task = self._task_named(name, version, ref or "") if model_ref is not None else None
        if task is not None:
            raise task.refuse_embedding()
        if not self._served:
            raise Unavailable("no model is loaded yet", code="not_ready", retry_after_s=1)
        served = self._served.get(name)
        if served is not None and (version is None or version == served.version):
            return served
        kept = self._kept.get(f"{name}@{version}")
        if kept is None:
            raise NotFound(
                f"model {ref!r} is not served here; served: {self._listing()}", code="model_not_found"
            )
        return kept

    def _listing(self) -> str:
        return ", ".join(m.ref for m, _ in self.loaded()) or "none"

    async def version(self, name: str, version: int) -> ModelEngine:
        """That exact version of a served model: the served one, a kept one, or loaded now and kept
        until the next look at what is needed. A version is loaded once, whoever asks for it at the
        same time (requests, a reload)."""
        ref = f"{name}@{version}"
        with contextlib.suppress(NotFound):
            return self.resolve(ref)
        if name not in self._served:
            raise NotFound(
                f"model {name!r} is not served here; served: {self._listing()}", code="model_not_found"
            )
        loaded = await asyncio.shield(self._load_once(name, version))
        if isinstance(loaded, str):
            raise NotFound(f"model {ref} cannot be loaded here: {loaded}", code="model_not_found")
        with contextlib.suppress(NotFound):
            return self.resolve(ref)  # a reload made it the served one meanwhile, or another caller kept it
        self._kept[ref] = loaded
        log.info("keeping %s loaded beside %s", ref, self._served[name].ref)
        return loaded

    def _load_once(self, name: str, version: int) -> asyncio.Task[ModelEngine | str]:
        """The one load of a version in progress, started if there is none."""
        ref = f"{name}@{version}"
        task = self._loading.get(ref)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._try_load(name, version), name=f"load-{ref}")
            self._loading[ref] = task
            task.add_done_callback(lambda _done: self._loading.pop(ref, None))
        return task

    def loaded(self) -> list[tuple[ModelEngine, list[str]]]:
        """Every loaded version and why: served ones first (`serving`), then those kept for data."""
        served = [(m, ["serving", *self._needed.get(m.ref, [])]) for m in self.models()]
        kept = [(self._kept[ref], self._needed.get(ref, ["asked for"])) for ref in sorted(self._kept)]
        return served + kept

    async def keep_needed(self) -> None:
        """Load what the data store says is needed, unload kept versions nothing needs any more. The
        store unreachable: everything stays as it is."""
        async with self._reload_lock:
            await self._keep_needed()

    async def _keep_needed(self) -> None:
        if self.needs is None:
            return
        try:
            self._needed = await self.needs()
        except ServiceError as exc:
            log.warning(
                "cannot tell which model versions collections need (%s); keeping them all", exc.message
            )
            return
        for ref in self._needed:
            name, version = parse_model_ref(ref)
            if name in self._served and version is not None:
                try:
                    await self.version(name, version)
                except ServiceError as exc:
                    log.error(
                        "%s is needed (%s) but cannot be loaded: %s", ref, ", ".join(self._needed[ref]), exc
                    )
        for ref in [ref for ref in self._kept if ref not in self._needed]:
            self._retire_later(self._kept.pop(ref))

    # Loading ----------------------------------------------------------------------------------------

    def _configured(self) -> dict[str, int | None]:
        if self.settings.models:
            try:
                return dict(parse_model_ref(ref) for ref in self.settings.models)
            except BundleError as exc:
                raise BundleError(f"setting models: {exc}") from exc
        names = self.repository.models()
        if not names:
            raise BundleError(f"no models in repository {self.repository.root}")
        return dict.fromkeys(names)

    async def start(self) -> None:
        """Load every configured model. A model whose newest version is broken starts on its last
        good version; a model with no loadable version is left out (logged) and the rest is served,
        so one corrupt bundle never keeps a replica down."""
        self._pinned = self._configured()
        for path, versions in self.repository.unpublished():
            detail = f"versions {', '.join(versions)} have no manifest.json"
            log.error("broken bundle left out: %s: %s", path, detail)
            for version in versions:
                self._left_out[str(path / version)] = LeftOut(
                    path.name, int(version), "no manifest.json: never published, or copied in part", detail
                )
        for name, pinned in self._pinned.items():
            if await self._serve_task(name, pinned):
                continue
            served = await self._load_first_good(name, pinned)
            if served is not None:
                self._install(served)
        if not self._served and not self._tasks:
            left_out = "; ".join(f"{path}: {entry.detail}" for path, entry in self._left_out.items())
            raise BundleError(f"no model in {self.repository.root} could be loaded; left out: {left_out}")
        if (
            self.settings.default_model
            and parse_model_ref(self.settings.default_model)[0] not in self._served
        ):
            raise BundleError(f"default model {self.settings.default_model!r} is not among the served models")
        self.ready = True

    def _is_task(self, name: str, version: int) -> bool:
        try:
            return read_manifest(self.repository.bundle_dir(name, version)).task is not None
        except BundleError:
            return False

    async def _serve_task(self, name: str, pinned: int | None, report: ReloadReport | None = None) -> bool:
        """Serve the newest (or pinned) version of `name` when it is a task model, in place of the one
        served (closed after `retire_grace_s`); False when it is not a task model."""
        try:
            latest = pinned or self.repository.latest(name)
        except BundleError:
            return False
        if not self._is_task(name, latest):
            return False
        current = self._tasks.get(name)
        if current is not None and current.version == latest:
            if report is not None:
                report.unchanged.append(current.ref)
            return True
        loop = asyncio.get_running_loop()
        try:
            engine = await loop.run_in_executor(
                None, load_task, self.repository, name, latest, self.settings, self.pool
            )
        except Exception as exc:  # a broken task bundle is left out like any other
            log.error("task model %s@%s left out: %s", name, latest, exc)
            if report is not None:
                report.failed.append({"model": f"{name}@{latest}", "error": refusal_reason(exc)})
            return True
        self._tasks[name] = engine
        log.info("loaded task model %s (%d labels)", engine.ref, len(engine.labels))
        if report is not None:
            report.loaded.append(engine.ref)
        if current is not None:
            loop.call_later(self.settings.retire_grace_s, lambda: loop.create_task(current.close()))
        return True

    def _load_measured(self, name: str, version: int | None) -> tuple[LoadedBundle, int | None]:
        before = _resident_bytes()
        loaded = load_version(self.repository, name, version, self.settings)
        after = _resident_bytes()
        return loaded, None if before is None or after is None else max(0, after - before)

    async def _load(self, name: str, version: int | None) -> ModelEngine:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        loaded, added = await loop.run_in_executor(None, self._load_measured, name, version)
        served = ModelEngine(loaded, self.settings, self.metrics, self.cache, self.pool)
        served.start()
        self._count_memory(served, added)
        log.info(
            "loaded %s (%s, providers %s) in %.2f s",
            served.ref,
            served.content_hash[:12],
            loaded.providers,
            time.perf_counter() - started,
        )
        return served

    def _count_memory(self, engine: ModelEngine, added: int | None) -> None:
        """/metrics: the bytes of a loaded version's graphs, and the resident memory its load added
        (measured around the load: other work at the same time blurs it)."""
        graphs = sum(
            tower_file(engine.bundle, tower, self.settings)[0].stat().st_size for tower in ("image", "text")
        )
        memory = self.metrics.model_memory
        memory.labels(model=engine.name, version=str(engine.version), kind="graphs").set(graphs)
        if added is not None:
            memory.labels(model=engine.name, version=str(engine.version), kind="rss_at_load").set(added)
        self.metrics.model_info.labels(
            model=engine.name, version=str(engine.version), content_hash=engine.content_hash
        ).set(1)

    def _uncount(self, engine: ModelEngine) -> None:
        for kind in ("graphs", "rss_at_load"):
            self.metrics.model_memory.labels(model=engine.name, version=str(engine.version), kind=kind).set(0)
        self.metrics.model_info.labels(
            model=engine.name, version=str(engine.version), content_hash=engine.content_hash
        ).set(0)

    def _install(self, served: ModelEngine) -> ModelEngine | None:
        """The atomic swap: one dict assignment on the event loop."""
        previous = self._served.get(served.name)
        self._served[served.name] = served
        self._kept.pop(served.ref, None)
        self._left_out.pop(str(served.bundle.path), None)
        self.metrics.reloads.labels(model=served.name, result="loaded").inc()
        return previous

    async def reload(self, force: bool = False) -> ReloadReport:
        """Serve the latest version of every unpinned model (and any new model when serving the whole
        repository); a failing version is refused and logged, and the previous one keeps serving."""
        report = ReloadReport()
        async with self._reload_lock:
            await self._reload(force, report)
            await self._keep_needed()
        return report

    async def _reload(self, force: bool, report: ReloadReport) -> None:
        if self.needs is not None:
            with contextlib.suppress(ServiceError):  # what is needed as of now decides what is kept
                self._needed = await self.needs()
        if not self.settings.models:  # serving the whole repository: new models join too
            for name in self.repository.models():
                self._pinned.setdefault(name, None)
        for name, pinned in self._pinned.items():
            if await self._serve_task(name, pinned, report):
                continue
            current = self._served.get(name)
            try:
                latest = pinned or self.repository.latest(name)
            except BundleError as exc:
                report.failed.append({"model": name, "error": str(exc)})
                continue
            if current is not None and current.version == latest:
                report.unchanged.append(current.ref)
                continue
            if (name, latest) in self._refused and not force:
                report.failed.append({"model": f"{name}@{latest}", "error": self._refused[(name, latest)]})
                continue
            await self._replace(name, latest, report)

    async def _try_load(self, name: str, version: int | None) -> ModelEngine | str:
        """The loaded model, or why the version was refused (remembered, logged, counted)."""
        try:
            return await self._load(name, version)
        except ProviderUnavailableError:
            raise  # a machine/settings problem, not this bundle's: never hide it behind another version
        except Exception as exc:  # onnxruntime and the tokenizer raise their own types for broken files
            message = (
                str(exc)
                if isinstance(exc, BundleError | RuntimeConfigError)
                else f"{type(exc).__name__}: {exc}"
            )
            self._refused[(name, version)] = message
            self.metrics.reloads.labels(model=name, result="refused").inc()
            path = self.repository.root / name / str(version if version is not None else "latest")
            self._leave_out(path, LeftOut(name, version, refusal_reason(exc), message))
            return message

    def _leave_out(self, path: object, entry: LeftOut) -> None:
        """A bundle that will not serve: named in the log and in /readyz, never a failed start."""
        log.error("broken bundle left out: %s: %s", path, entry.detail)
        self._left_out[str(path)] = entry

    @property
    def left_out(self) -> list[dict[str, object]]:
        """Versions refused since start (one fixed in place and loaded is taken off), for /readyz:
        model, version (None: no version at all) and the reason in words; paths and exception
        text are in the log only."""
        return [
            {"model": entry.model, "version": entry.version, "reason": entry.reason}
            for entry in self._left_out.values()
        ]

    async def _load_first_good(self, name: str, pinned: int | None) -> ModelEngine | None:
        # With no published version, loading "latest" fails and records why.
        candidates = [pinned] if pinned is not None else sorted(self.repository.versions(name), reverse=True)
        for version in candidates or [None]:
            loaded = await self._try_load(name, version)
            if isinstance(loaded, ModelEngine):
                return loaded
        return None

    async def _replace(self, name: str, version: int, report: ReloadReport) -> None:
        kept = self._kept.get(f"{name}@{version}")
        served = kept if kept is not None else await asyncio.shield(self._load_once(name, version))
        if isinstance(served, str):
            report.failed.append({"model": f"{name}@{version}", "error": served})
            return
        current = self._served.get(name)
        if current is not None and self.on_replace is not None and current.ref != served.ref:
            try:
                await self.on_replace(current, served)
            except Exception:  # warming is a courtesy: a failure of it never stops a new version
                log.exception("preparing %s to replace %s failed", served.ref, current.ref)
        previous = self._install(served)
        report.loaded.append(served.ref)
        log.info("now serving %s%s", served.ref, f" (was {previous.ref})" if previous else "")
        if previous is None:
            return
        if self.needs is not None:
            with contextlib.suppress(ServiceError):  # the hook above may have added needs
                self._needed = await self.needs()
        if previous.ref in self._needed:
            self._kept[previous.ref] = previous
            log.info("keeping %s loaded for %s", previous.ref, ", ".join(self._needed[previous.ref]))
        else:
            self._retire_later(previous)

    def _retire_later(self, old: ModelEngine) -> None:
        task = asyncio.get_running_loop().create_task(self._retire(old))
        self._retiring[task] = old
        task.add_done_callback(lambda done: self._retiring.pop(done, None))

    async def _retire(self, old: ModelEngine) -> None:
        await asyncio.sleep(self.settings.retire_grace_s)
        deadline = time.monotonic() + self.settings.request_timeout_s
        while old.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await old.close()
        self._uncount(old)
        if all(m.space_id != old.space_id for m in [*self._served.values(), *self._kept.values()]):
            # its class matrices would only age out of the cache's LRU: make room for the new space now
            self.cache.forget(old.matrix_prefix)
        log.info("retired %s", old.ref)

    async def poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reload_poll_s)
            try:
                await self.reload()
            except Exception:  # polling must survive anything the file system throws at it
                log.exception("repository poll failed")

    @property
    def alive(self) -> bool:
        return bool(self._served) and all(m.alive for m in [*self._served.values(), *self._kept.values()])

    @property
    def idle(self) -> bool:
        """No served, kept or retiring version has work in hand."""
        return all(m.idle for m in [*self._served.values(), *self._kept.values(), *self._retiring.values()])

    async def close(self) -> None:
        retiring = list(self._retiring.items())
        for task, _ in retiring:
            task.cancel()
        for loading in list(self._loading.values()):
            loading.cancel()
        for served in [*self._served.values(), *self._kept.values(), *(model for _, model in retiring)]:
            await served.close()
        for task in self._tasks.values():
            await task.close()
        self._tasks.clear()
        self._served.clear()
        self._kept.clear()
        self.pool.shutdown(wait=False, cancel_futures=True)
