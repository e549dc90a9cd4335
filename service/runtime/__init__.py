"""One adapter per inference engine behind one small protocol.

A `Runtime` runs one tower: `run(batch) -> float32 [B, D]`, where `batch` is `pixel_values`
float32 [B, 3, H, W] for the image tower or `input_ids` int64 [B, L] for the text tower.
`open_runtime(path, options)` picks the adapter from the file: `.onnx` -> ONNX Runtime,
`.plan` -> TensorRT engine (GPU only, imported lazily). `close()` releases what a runtime holds on
the device; call it once no batch can reach the runtime any more.
"""

from __future__ import annotations

from pathlib import Path

from clipserve.service.runtime.base import (
    ProviderUnavailableError,
    Runtime,
    RuntimeConfigError,
    RuntimeOptions,
    tower_options,
)

__all__ = [
    "ProviderUnavailableError",
    "Runtime",
    "RuntimeConfigError",
    "RuntimeOptions",
    "open_runtime",
    "tower_options",
]


def open_runtime(path: Path, options: RuntimeOptions) -> Runtime:
    if path.suffix == ".plan":
        from clipserve.service.runtime.tensorrt import TensorRTRuntime

        return TensorRTRuntime(path, options)
    from clipserve.service.runtime.onnx import OnnxRuntime

    return OnnxRuntime(path, options)
