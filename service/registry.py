"""Served models: discover in the repository, load, verify, warm up, hot-swap.

Internal API for routers (the retrieval routers use it too)::

    registry = get_registry(request)          # FastAPI dependency
    model = registry.resolve(body.model)      # None -> default; "name" or "name@version";
                                              # unknown -> ApiError 404
    model.name, model.version, model.dim, model.content_hash, model.manifest, model.logit_scale
    vectors, truncated = await model.embed_texts(["a dog"])    # float32 [N, D], L2-normalized
    vectors = await model.embed_images([png_bytes, ...])       # float32 [N, D]; bad image -> ApiError
                                                               # 400/413 naming its index

Both calls go through the model's dynamic batchers (429 when full, 503 on timeout). Text vectors
are cached by the bundle's content hash. A `ServedModel` stays usable for `retire_grace_s` after a
newer version replaced it, and until its last in-flight call ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fastapi import Request

from export.bundle import Bundle, BundleError, Manifest, ModelRepository, parse_model_ref
from export.tokenizer import ClipTokenizer, TokenizedBatch
from service.batching import Batcher
from service.cache import KEY_PREFIX, VectorCache
from service.errors import ApiError
from service.metrics import Metrics
from service.preprocess import ImagePreprocessor
from service.runtime import (
    ProviderUnavailableError,
    Runtime,
    RuntimeConfigError,
    open_runtime,
    tower_options,
)
from service.runtime.tensorrt import select_engine
from service.settings import Settings

log = logging.getLogger("clipserve.registry")
_INLINE_TOKENIZE = 16


def normalize(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def pad_rows(rows: Sequence[np.ndarray], pad_id: int) -> np.ndarray:
    width = max(len(r) for r in rows)
    batch = np.full((len(rows), width), pad_id, dtype=np.int64)
    for i, row in enumerate(rows):
        batch[i, : len(row)] = row
    return batch


@dataclass
class TowerStats:
    calls: int = 0
    items: int = 0


@dataclass
class LoadedBundle:
    """Everything a version needs before it can serve, built off the event loop."""

    bundle: Bundle
    image_runtime: Runtime
    text_runtime: Runtime
    tokenizer: ClipTokenizer
    text_precision: str
    image_precision: str
    providers: list[str] = field(default_factory=list)


class ServedModel:
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
        self.logit_scale = self.manifest.logit_scale
        self.tokenizer = loaded.tokenizer
        self.preprocessor = ImagePreprocessor(
            self.manifest.image, settings.max_image_pixels, settings.jpeg_draft_margin
        )
        self.settings, self.metrics, self.cache, self.pool = settings, metrics, cache, pool
        self.text_stats, self.image_stats = TowerStats(), TowerStats()
        self.in_flight = 0
        variant = "" if loaded.text_precision == "fp32" else f"-{loaded.text_precision}"
        self.text_key_prefix = f"{KEY_PREFIX}:{self.content_hash}{variant}:text:"
        self.space_id = f"{self.content_hash}{variant}"
        common = dict(
            max_wait_ms=settings.max_wait_ms,
            max_queue=settings.max_queue,
            timeout_s=settings.request_timeout_s,
            metrics=metrics,
        )
        label = f"{self.name}@{self.version}"
        self.image_batcher = Batcher(
            label, "image", self.run_images, max_batch=settings.max_batch_size_image, **common
        )
        self.text_batcher = Batcher(
            label, "text", self.run_texts, max_batch=settings.max_batch_size_text, **common
        )

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def describe(self) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "dim": self.dim,
            "content_hash": self.content_hash,
            "precision": {"image": self.loaded.image_precision, "text": self.loaded.text_precision},
            "providers": self.loaded.providers,
            "logit_scale": self.logit_scale,
            "image_size": list(self.manifest.image.size),
            "context_length": self.manifest.tokenizer.context_length,
            "source": self.manifest.source.model_dump(exclude_none=True, exclude={"config"}),
        }

    # Inference, in the towers' own threads ------------------------------------------------------

    def run_images(self, rows: Sequence[np.ndarray]) -> np.ndarray:
        output = self.loaded.image_runtime.run(np.stack(rows))
        self._count("image", self.image_stats, len(rows))
        return normalize(output)

    def run_texts(self, rows: Sequence[np.ndarray]) -> np.ndarray:
        output = self.loaded.text_runtime.run(pad_rows(rows, self.manifest.tokenizer.pad_token_id))
        self._count("text", self.text_stats, len(rows))
        return normalize(output)

    def _count(self, tower: str, stats: TowerStats, items: int) -> None:
        stats.calls += 1
        stats.items += items
        self.metrics.encoder_calls.labels(model=self.ref, tower=tower).inc()

    # Public calls -----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def using(self) -> Iterator[None]:
        """Hold this version while working with it: retirement waits until no one holds it."""
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    def token_rows(self, batch: TokenizedBatch) -> list[np.ndarray]:
        if self.manifest.text.dynamic_length:
            return [batch.ids[i, : int(n)] for i, n in enumerate(batch.lengths)]
        return list(batch.ids)

    async def tokenize(self, texts: Sequence[str]) -> TokenizedBatch:
        if len(texts) <= _INLINE_TOKENIZE:
            return self.tokenizer.encode(list(texts))
        return await asyncio.get_running_loop().run_in_executor(self.pool, self.tokenizer.encode, list(texts))

    def text_key(self, row: np.ndarray) -> str:
        return (
            self.text_key_prefix
            + hashlib.sha256(np.ascontiguousarray(row, dtype=np.int64).tobytes()).hexdigest()
        )

    async def embed_texts(self, texts: Sequence[str]) -> tuple[np.ndarray, list[bool]]:
        with self.using():
            batch = await self.tokenize(texts)
            return await self.embed_token_rows(self.token_rows(batch)), list(batch.truncated)

    async def embed_tokenized(self, batch: TokenizedBatch) -> np.ndarray:
        with self.using():
            return await self.embed_token_rows(self.token_rows(batch))

    async def embed_token_rows(self, rows: list[np.ndarray], bulk: bool = False) -> np.ndarray:
        """Vectors for token-id rows: from the cache where present, the rest through the model.

        `bulk` (class matrices) bypasses the request queue and runs on the text tower's inference
        thread directly, so it takes turns with live batches instead of filling their queue.
        """
        keys = [self.text_key(r) for r in rows]
        cached = await self.cache.get_vectors(keys)
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        missing: dict[str, list[int]] = {}
        for i, value in enumerate(cached):
            if value is not None and len(value) == 4 * self.dim:
                out[i] = np.frombuffer(value, dtype=np.float32)
            else:
                missing.setdefault(keys[i], []).append(i)
        if missing:
            todo = [rows[positions[0]] for positions in missing.values()]
            if bulk:
                vectors = await self.run_bulk(todo)
            else:
                vectors = await self.text_batcher.submit(todo)
            for positions, vector in zip(missing.values(), vectors, strict=True):
                out[positions] = vector
            await self.cache.set_vectors({k: v.tobytes() for k, v in zip(missing, vectors, strict=True)})
        return out

    async def run_bulk(self, rows: list[np.ndarray]) -> np.ndarray:
        """Encode token rows on the text tower's inference thread, without the request queue."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.text_batcher.executor, self.run_texts, rows)

    async def embed_images(self, images: Sequence[bytes]) -> np.ndarray:
        with self.using():
            loop = asyncio.get_running_loop()
            started = time.perf_counter()
            self.image_batcher.announce(len(images))
            try:
                rows = await asyncio.gather(
                    *(
                        loop.run_in_executor(self.pool, self.preprocessor, data, i)
                        for i, data in enumerate(images)
                    )
                )
            finally:
                self.image_batcher.withdraw(len(images))
            if images:
                per_item = (time.perf_counter() - started) / len(images)
                self.metrics.preprocess_seconds.labels(model=self.ref, tower="image").observe(per_item)
            return await self.image_batcher.submit(rows)

    # Lifecycle --------------------------------------------------------------------------------------

    def start(self) -> None:
        self.image_batcher.start()
        self.text_batcher.start()

    @property
    def alive(self) -> bool:
        return self.image_batcher.alive and self.text_batcher.alive

    async def close(self) -> None:
        await self.image_batcher.close()
        await self.text_batcher.close()


def _tower_file(bundle: Bundle, tower: str, settings: Settings) -> tuple[Path, str]:
    if settings.engine == "tensorrt":
        return select_engine(bundle, tower)
    if bundle.manifest.file(tower, settings.precision) is not None:
        return bundle.file_path(tower, settings.precision), settings.precision
    log.warning("%s has no %s %s graph; serving its fp32 graph", bundle.ref, settings.precision, tower)
    return bundle.file_path(tower, "fp32"), "fp32"


def load_version(
    repository: ModelRepository, name: str, version: int | None, settings: Settings
) -> LoadedBundle:
    """Load, verify every hash, open both runtimes and warm them up. Blocking: run it in a thread."""
    bundle = repository.load(name, version, verify=True)
    image_path, image_precision = _tower_file(bundle, "image", settings)
    text_path, text_precision = _tower_file(bundle, "text", settings)
    image_runtime = open_runtime(image_path, tower_options(settings, bundle.manifest, "image"))
    text_runtime = open_runtime(text_path, tower_options(settings, bundle.manifest, "text"))
    tokenizer = ClipTokenizer.from_spec(bundle.manifest.tokenizer, bundle.path)
    loaded = LoadedBundle(
        bundle,
        image_runtime,
        text_runtime,
        tokenizer,
        text_precision,
        image_precision,
        providers=list(image_runtime.active_providers),
    )
    if settings.warmup:
        warm_up(loaded)
    return loaded


def warm_up(loaded: LoadedBundle) -> None:
    """One real pass through each tower: fails a broken graph before it serves, and primes kernels."""
    manifest = loaded.bundle.manifest
    height, width = manifest.image.size
    image_out = loaded.image_runtime.run(np.zeros((1, 3, height, width), dtype=np.float32))
    ids = loaded.tokenizer.encode(["a photo of a cat"])
    text_ids = ids.trimmed() if manifest.text.dynamic_length else ids.ids
    text_out = loaded.text_runtime.run(text_ids)
    for tower, output in (("image", image_out), ("text", text_out)):
        if output.shape != (1, manifest.embed_dim) or not np.all(np.isfinite(output)):
            raise BundleError(
                f"{loaded.bundle.ref}: the {tower} graph gave shape {output.shape} or non-finite values; "
                f"the manifest says [1, {manifest.embed_dim}]"
            )


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
        self._served: dict[str, ServedModel] = {}
        self._pinned: dict[str, int | None] = {}
        self._refused: dict[tuple[str, int | None], str] = {}
        self._reload_lock = asyncio.Lock()
        self._retiring: dict[asyncio.Task, ServedModel] = {}
        self.ready = False

    # Resolution ----------------------------------------------------------------------------------

    @property
    def default_name(self) -> str | None:
        if self.settings.default_model:
            return parse_model_ref(self.settings.default_model)[0]
        return next(iter(sorted(self._served)), None)

    def models(self) -> list[ServedModel]:
        return [self._served[name] for name in sorted(self._served)]

    def resolve(self, model_ref: str | None) -> ServedModel:
        if not self._served:
            raise ApiError(503, "not_ready", "no model is loaded yet")
        ref = model_ref if model_ref is not None else self.default_name
        try:
            name, version = parse_model_ref(ref or "")
        except BundleError as exc:
            raise ApiError(422, "invalid_request", f"model: {exc}") from exc
        served = self._served.get(name)
        if served is None:
            raise ApiError(
                404, "model_not_found", f"model {ref!r} is not served here; served: {self._listing()}"
            )
        if version is not None and version != served.version:
            raise ApiError(
                404, "model_not_found", f"model {ref!r} is not served here; served: {self._listing()}"
            )
        return served

    def _listing(self) -> str:
        return ", ".join(m.ref for m in self.models()) or "none"

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
        for name, pinned in self._pinned.items():
            served = await self._load_first_good(name, pinned)
            if served is not None:
                self._install(served)
        if not self._served:
            refused = "; ".join(f"{n}@{v}: {why}" for (n, v), why in self._refused.items())
            raise BundleError(f"no model in {self.repository.root} could be loaded: {refused}")
        if (
            self.settings.default_model
            and parse_model_ref(self.settings.default_model)[0] not in self._served
        ):
            raise BundleError(f"default model {self.settings.default_model!r} is not among the served models")
        self.ready = True

    async def _load(self, name: str, version: int | None) -> ServedModel:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        loaded = await loop.run_in_executor(None, load_version, self.repository, name, version, self.settings)
        served = ServedModel(loaded, self.settings, self.metrics, self.cache, self.pool)
        served.start()
        log.info(
            "loaded %s (%s, providers %s) in %.2f s",
            served.ref,
            served.content_hash[:12],
            loaded.providers,
            time.perf_counter() - started,
        )
        return served

    def _install(self, served: ServedModel) -> ServedModel | None:
        """The atomic swap: one dict assignment on the event loop."""
        previous = self._served.get(served.name)
        self._served[served.name] = served
        self.metrics.model_info.labels(
            model=served.name, version=str(served.version), content_hash=served.content_hash
        ).set(1)
        if previous is not None:
            self.metrics.model_info.labels(
                model=previous.name, version=str(previous.version), content_hash=previous.content_hash
            ).set(0)
        self.metrics.reloads.labels(model=served.name, result="loaded").inc()
        return previous

    async def reload(self, force: bool = False) -> ReloadReport:
        """Serve the latest version of every unpinned model (and any new model when serving the whole
        repository); a failing version is refused and logged, and the previous one keeps serving."""
        report = ReloadReport()
        async with self._reload_lock:
            if not self.settings.models:  # serving the whole repository: new models join too
                for name in self.repository.models():
                    self._pinned.setdefault(name, None)
            for name, pinned in self._pinned.items():
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
                    report.failed.append(
                        {"model": f"{name}@{latest}", "error": self._refused[(name, latest)]}
                    )
                    continue
                await self._replace(name, latest, report)
        return report

    async def _try_load(self, name: str, version: int | None) -> ServedModel | str:
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
            log.error("refused %s@%s: %s", name, version if version is not None else "latest", message)
            return message

    async def _load_first_good(self, name: str, pinned: int | None) -> ServedModel | None:
        # With no published version, loading "latest" fails and records why.
        candidates = [pinned] if pinned is not None else sorted(self.repository.versions(name), reverse=True)
        for version in candidates or [None]:
            loaded = await self._try_load(name, version)
            if isinstance(loaded, ServedModel):
                return loaded
        return None

    async def _replace(self, name: str, version: int, report: ReloadReport) -> None:
        served = await self._try_load(name, version)
        if isinstance(served, str):
            report.failed.append({"model": f"{name}@{version}", "error": served})
            return
        previous = self._install(served)
        report.loaded.append(served.ref)
        log.info("now serving %s%s", served.ref, f" (was {previous.ref})" if previous else "")
        if previous is not None:
            task = asyncio.get_running_loop().create_task(self._retire(previous))
            self._retiring[task] = previous
            task.add_done_callback(lambda done: self._retiring.pop(done, None))

    async def _retire(self, old: ServedModel) -> None:
        await asyncio.sleep(self.settings.retire_grace_s)
        deadline = time.monotonic() + self.settings.request_timeout_s
        while old.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await old.close()
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
        return bool(self._served) and all(m.alive for m in self._served.values())

    async def close(self) -> None:
        retiring = list(self._retiring.items())
        for task, _ in retiring:
            task.cancel()
        for served in [*self._served.values(), *(model for _, model in retiring)]:
            await served.close()
        self._served.clear()
        self.pool.shutdown(wait=False, cancel_futures=True)


def get_registry(request: Request) -> ModelRegistry:
    """FastAPI dependency: the app's model registry."""
    return request.app.state.registry
