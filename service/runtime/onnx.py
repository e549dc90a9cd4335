"""ONNX Runtime adapter: CPU, CUDA and TensorRT execution providers.

The providers asked for are compared with those the session really activated; a missing GPU
provider raises `RuntimeConfigError` at start-up instead of silently running on the CPU. GPU
providers get their libraries loaded first (`gpu_stack.prepare_providers`); the TensorRT provider
gets one optimization profile covering the shapes the service feeds the graph, and keeps the
engines it builds (and its timing cache) in `RuntimeOptions.engine_cache_dir`, so a restart loads
them instead of building them again.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from clipserve.contract.shapes import ShapeRange, slug
from clipserve.service.runtime.base import ProviderUnavailableError, RuntimeOptions
from clipserve.service.runtime.gpu_stack import check_single_onnxruntime, load_tensorrt, prepare_providers

PROVIDER_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def session_options(threads: int, cpu_arena: bool = False) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # Without the CPU arena each run's activations go back to the allocator when it ends; the arena
    # keeps its high-water mark (of the largest batch ever seen: a label-set chunk) for good.
    options.enable_cpu_mem_arena = cpu_arena
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    # Spinning worker threads would take the cores from image decoding between batches.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def full_provider_names(options: RuntimeOptions) -> list[str]:
    unknown = [name for name in options.providers if name not in PROVIDER_NAMES]
    if unknown:
        raise ProviderUnavailableError(
            f"unknown execution provider {unknown[0]!r}; known: {sorted(PROVIDER_NAMES)}"
        )
    return [PROVIDER_NAMES[name] for name in options.providers]


def provider_list(options: RuntimeOptions) -> list[str | tuple[str, dict]]:
    requested: list[str | tuple[str, dict]] = []
    for name, full in zip(options.providers, full_provider_names(options), strict=True):
        if name == "tensorrt":
            requested.append((full, {"device_id": options.device_id, **tensorrt_provider_options(options)}))
        elif name == "cuda":
            requested.append((full, {"device_id": options.device_id}))
        else:
            requested.append(full)
    return requested


def _shape_list(shapes: ShapeRange, dims: tuple[int, ...]) -> str:
    return f"{shapes.input_name}:{'x'.join(str(d) for d in dims)}"


def tensorrt_provider_options(options: RuntimeOptions) -> dict[str, str]:
    """Engine and timing caches under the cache folder, keyed by GPU model and TensorRT version (an
    engine only loads where it was built), and the served shape range as the one profile."""
    provider: dict[str, str] = {}
    if options.engine_cache_dir is not None:
        from clipserve.service.runtime.tensorrt import device_name

        trt = load_tensorrt()
        machine = f"{slug(device_name(options.device_id))}-trt{trt.__version__}"
        folder = options.engine_cache_dir / machine
        folder.mkdir(parents=True, exist_ok=True)
        provider |= {
            "trt_engine_cache_enable": "True",
            "trt_engine_cache_path": str(folder),
            "trt_timing_cache_enable": "True",
            "trt_timing_cache_path": str(folder),
        }
    if options.shapes is not None:
        shapes = options.shapes
        provider |= {
            "trt_profile_min_shapes": _shape_list(shapes, shapes.minimum),
            "trt_profile_opt_shapes": _shape_list(shapes, shapes.optimum),
            "trt_profile_max_shapes": _shape_list(shapes, shapes.maximum),
        }
    return provider


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
        check_single_onnxruntime()
        names = full_provider_names(options)
        check_providers(names, ort.get_available_providers())
        prepare_providers(names)
        requested = provider_list(options)
        self.session = ort.InferenceSession(
            str(path),
            sess_options=session_options(options.intra_op_threads, options.cpu_arena),
            providers=requested,
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

    def close(self) -> None:
        """Drop the session: its device memory goes with it."""
        self.session = None
