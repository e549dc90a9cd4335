"""From a published bundle to runtimes that are ready to serve: verify, open, warm up.

`load_version(repository, name, version, settings)` is blocking (hashing, session creation and a
first pass through each tower): the registry runs it in a thread. It picks each tower's file from
the settings (`precision`, `engine`), opens one runtime per tower and the bundle's tokenizer, and
fails a graph whose output does not match the manifest before it ever serves a request. The
tokenizer is the kind the manifest names: CLIP BPE, or a Hugging Face tokenizer.json.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from export.bundle import Bundle, BundleError, ModelRepository
from export.tokenizer import TextTokenizer, load_tokenizer
from service.runtime import Runtime, open_runtime, tower_options
from service.runtime.tensorrt import select_engine
from service.settings import Settings

log = logging.getLogger("clipserve.loading")


@dataclass
class LoadedBundle:
    """Everything a version needs before it can serve, built off the event loop."""

    bundle: Bundle
    image_runtime: Runtime
    text_runtime: Runtime
    tokenizer: TextTokenizer
    text_precision: str
    image_precision: str
    providers: list[str] = field(default_factory=list)
    # median milliseconds of the text tower on one short text, measured at warm-up (None without it)
    text_encode_ms: float | None = None


def tower_file(bundle: Bundle, tower: str, settings: Settings) -> tuple[Path, str]:
    """The file that runs `tower` under these settings, and its precision."""
    if settings.engine == "tensorrt":
        return select_engine(bundle, tower)
    if bundle.manifest.file(tower, settings.precision) is not None:
        return bundle.file_path(tower, settings.precision), settings.precision
    log.warning("%s has no %s %s graph; serving its fp32 graph", bundle.ref, settings.precision, tower)
    return bundle.file_path(tower, "fp32"), "fp32"


def load_version(
    repository: ModelRepository, name: str, version: int | None, settings: Settings
) -> LoadedBundle:
    """Load, verify every hash, open both runtimes and warm them up."""
    bundle = repository.load(name, version, verify=True)
    image_path, image_precision = tower_file(bundle, "image", settings)
    text_path, text_precision = tower_file(bundle, "text", settings)
    opened: list[Runtime] = []
    try:
        opened.append(open_runtime(image_path, tower_options(settings, bundle.manifest, "image")))
        opened.append(open_runtime(text_path, tower_options(settings, bundle.manifest, "text")))
        tokenizer = load_tokenizer(bundle.manifest.tokenizer, bundle.path)
        loaded = LoadedBundle(
            bundle,
            opened[0],
            opened[1],
            tokenizer,
            text_precision,
            image_precision,
            providers=list(opened[0].active_providers),
        )
        if settings.warmup:
            warm_up(loaded)
        release_free_memory()
    except BaseException:
        for runtime in opened:  # a refused version must not keep device memory or streams
            runtime.close()
        raise
    return loaded


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
_MMAP_THRESHOLD_BYTES = 128 * 1024


def keep_large_buffers_out_of_the_heap() -> None:
    """Large buffers (activations, decoded images) in their own mappings, returned to the system when
    freed. glibc's default raises this threshold after each large free, after which such buffers
    live in the heap and the heap's high-water mark stays in RSS (ViT-B-32: ~100 MB under load).
    Call once, before loading models. A no-op off glibc."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)


def release_free_memory() -> None:
    """Hand the memory that loading used and freed (model protobufs, graph transforms) back to the
    system: glibc keeps freed memory in the process otherwise. A no-op off glibc."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


_TEXT_TIMINGS = 3


def warm_up(loaded: LoadedBundle) -> None:
    """One real pass through each tower: fails a broken graph before it serves, and primes kernels.
    A few more passes of the text tower time it (`text_encode_ms`: what a cache look-up must beat)."""
    manifest = loaded.bundle.manifest
    height, width = manifest.image.size
    image_out = loaded.image_runtime.run(np.zeros((1, 3, height, width), dtype=np.float32))
    ids = loaded.tokenizer.encode(["a photo of a cat"])
    text_ids = ids.trimmed() if manifest.text.dynamic_length else ids.ids
    text_out = loaded.text_runtime.run(text_ids)
    timings = []
    for _ in range(_TEXT_TIMINGS):
        started = time.perf_counter()
        loaded.text_runtime.run(text_ids)
        timings.append((time.perf_counter() - started) * 1000)
    loaded.text_encode_ms = statistics.median(timings)
    for tower, output in (("image", image_out), ("text", text_out)):
        if output.shape != (1, manifest.embed_dim) or not np.all(np.isfinite(output)):
            raise BundleError(
                f"{loaded.bundle.ref}: the {tower} graph gave shape {output.shape} or non-finite values; "
                f"the manifest says [1, {manifest.embed_dim}]"
            )
