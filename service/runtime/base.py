"""What every runtime adapter shares: the `Runtime` protocol, its options, and its errors.

Kept apart from the package's `open_runtime`, which imports the adapters, so that the adapters import
this module and nothing imports in a circle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from clipserve.contract.shapes import ShapeRange, image_shapes, text_shapes

if TYPE_CHECKING:
    from clipserve.contract.bundle import Manifest
    from clipserve.service.settings import Settings


class RuntimeConfigError(RuntimeError):
    """The runtime cannot run as configured (a requested provider is missing, a bad engine...)."""


class ProviderUnavailableError(RuntimeConfigError):
    """This machine cannot run what the settings ask for, whatever the bundle: start-up must fail."""


@dataclass(frozen=True)
class RuntimeOptions:
    providers: tuple[str, ...] = ("cpu",)
    intra_op_threads: int = 1
    # ONNX Runtime's CPU memory arena (off: activations are freed after each run, see runtime/onnx.py)
    cpu_arena: bool = False
    device_id: int = 0
    # The input shapes the service will feed this tower (TensorRT optimization profiles).
    shapes: ShapeRange | None = None
    # Where ONNX Runtime's TensorRT provider keeps the engines it builds for this tower.
    engine_cache_dir: Path | None = None
    extra: dict = field(default_factory=dict)


def tower_options(settings: Settings, manifest: Manifest, tower: str) -> RuntimeOptions:
    """Options for one tower of a bundle: the batch sizes it will see (live batches, and label-set
    chunks for the text tower) and its engine cache folder, keyed by the bundle's content hash."""
    if tower == "image":
        live = settings.max_batch_size_image
        shapes = image_shapes(*manifest.image.size, batches=(1, live, live))
    else:
        live = settings.max_batch_size_text
        batches = (1, live, max(live, settings.labelset_chunk_texts))
        shapes = text_shapes(manifest.tokenizer.context_length, manifest.text.dynamic_length, batches)
    cache_root = settings.engine_cache_dir or settings.data_dir / "engine-cache"
    return RuntimeOptions(
        providers=tuple(settings.providers),
        intra_op_threads=settings.intra_op_threads,
        cpu_arena=settings.cpu_arena,
        shapes=shapes,
        engine_cache_dir=cache_root / f"{manifest.content_hash[:16]}-{tower}",
    )


class Runtime(Protocol):
    input_name: str
    active_providers: list[str]

    def run(self, batch: np.ndarray) -> np.ndarray: ...

    def close(self) -> None: ...
