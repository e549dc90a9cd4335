"""ONNX Runtime adapter: CPU, CUDA and TensorRT execution providers.

The providers asked for are compared with those the session really activated; a missing GPU
provider raises `RuntimeConfigError` at start-up instead of silently running on the CPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.runtime import ProviderUnavailableError, RuntimeOptions

PROVIDER_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def session_options(threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    # Spinning worker threads would take the cores from image decoding between batches.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def provider_list(options: RuntimeOptions) -> list[str | tuple[str, dict]]:
    requested: list[str | tuple[str, dict]] = []
    for name in options.providers:
        full = PROVIDER_NAMES.get(name)
        if full is None:
            raise ProviderUnavailableError(
                f"unknown execution provider {name!r}; known: {sorted(PROVIDER_NAMES)}"
            )
        if name in ("cuda", "tensorrt"):
            requested.append((full, {"device_id": options.device_id}))
        else:
            requested.append(full)
    return requested


def check_providers(requested: list[str], active: list[str]) -> None:
    missing = [name for name in requested if name not in active]
    if missing:
        raise ProviderUnavailableError(
            f"execution providers {missing} were requested but are not active (active here: {active}; "
            f"available in this onnxruntime build: {ort.get_available_providers()}). "
            "Refusing to fall back silently to the CPU."
        )


class OnnxRuntime:
    def __init__(self, path: Path, options: RuntimeOptions):
        requested = provider_list(options)
        names = [p if isinstance(p, str) else p[0] for p in requested]
        check_providers(names, ort.get_available_providers())
        self.session = ort.InferenceSession(
            str(path), sess_options=session_options(options.intra_op_threads), providers=requested
        )
        self.active_providers = self.session.get_providers()
        check_providers(names, self.active_providers)
        graph_input = self.session.get_inputs()[0]
        self.input_name = graph_input.name
        self._input_dtype = np.float16 if graph_input.type == "tensor(float16)" else None
        self.output_name = self.session.get_outputs()[0].name

    def run(self, batch: np.ndarray) -> np.ndarray:
        if self._input_dtype is not None:
            batch = batch.astype(self._input_dtype)
        (output,) = self.session.run([self.output_name], {self.input_name: batch})
        return np.asarray(output, dtype=np.float32)
