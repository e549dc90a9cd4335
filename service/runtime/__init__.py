"""One adapter per inference engine behind one small protocol.

A `Runtime` runs one tower: `run(batch) -> float32 [B, D]`, where `batch` is `pixel_values`
float32 [B, 3, H, W] for the image tower or `input_ids` int64 [B, L] for the text tower.
`open_runtime(path, options)` picks the adapter from the file: `.onnx` -> ONNX Runtime,
`.plan` -> TensorRT engine (GPU only, imported lazily).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np


class RuntimeConfigError(RuntimeError):
    """The runtime cannot run as configured (a requested provider is missing, a bad engine...)."""


class ProviderUnavailableError(RuntimeConfigError):
    """This machine cannot run what the settings ask for, whatever the bundle: start-up must fail."""


@dataclass(frozen=True)
class RuntimeOptions:
    providers: tuple[str, ...] = ("cpu",)
    intra_op_threads: int = 1
    device_id: int = 0
    extra: dict = field(default_factory=dict)


class Runtime(Protocol):
    input_name: str
    active_providers: list[str]

    def run(self, batch: np.ndarray) -> np.ndarray: ...


def open_runtime(path: Path, options: RuntimeOptions) -> Runtime:
    if path.suffix == ".plan":
        from service.runtime.tensorrt import TensorRTRuntime

        return TensorRTRuntime(path, options)
    from service.runtime.onnx import OnnxRuntime

    return OnnxRuntime(path, options)
