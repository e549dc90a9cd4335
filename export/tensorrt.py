"""TensorRT engines built from the exported ONNX graphs, with the TensorRT Python API (GPU only).

An engine only runs on the GPU model and TensorRT version that built it, so its file name and its
manifest entry carry both. Engines are built as strongly typed networks from the fp16 graph
(`clipserve.export.quantize.convert_fp16`: fp16 weights and compute, fp32 inputs, outputs and the layers
whose accuracy needs it): every tensor keeps the type the graph gives it. That is the only mode
TensorRT 11 has; the weak-typing builder flags and per-layer precisions are deprecated since
TensorRT 10.12 and removed in 11, so none is used. The layer timing cache is kept between builds,
in the folder the caller names (`clip-export --timing-cache-dir`) or the user cache folder.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipserve.contract.shapes import ShapeRange, image_shapes, slug, text_shapes
from clipserve.export.errors import ExportError

WORKSPACE_BYTES = 4 << 30


def require_tensorrt() -> tuple[Any, Any]:
    """(tensorrt, torch) when a CUDA GPU and TensorRT are both present; a clear error otherwise."""
    try:
        import tensorrt
    except (ImportError, OSError) as exc:
        raise ExportError(
            f"TensorRT engines need TensorRT ({exc}): build them in the GPU venv (make venv-gpu, "
            "'.[serve-gpu,train-gpu,dev]', without the CPU onnxruntime)"
        ) from exc
    import torch

    if not torch.cuda.is_available():
        raise ExportError(
            "TensorRT engines are built on the GPU they will run on; no CUDA GPU is visible here"
        )
    return tensorrt, torch


def gpu_name() -> str:
    _, torch = require_tensorrt()
    return torch.cuda.get_device_name(torch.cuda.current_device())


def engine_filename(tower: str, gpu: str, tensorrt_version: str) -> str:
    """e.g. image.nvidia-h200.trt10.16.1.11.plan: the tower first, as the manifest has no tower field."""
    return f"{tower}.{slug(gpu)}.trt{tensorrt_version}.plan"


def default_timing_cache_dir() -> Path:
    """The user cache folder: XDG_CACHE_HOME is the XDG base directory specification's variable, not
    one of ours, read as every tool that keeps a cache there reads it."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "clipserve" / "tensorrt"


def timing_cache_path(gpu: str, tensorrt_version: str, folder: Path | None = None) -> Path:
    """Outside the bundle (it is a build aid, not part of the model): in `folder`, or the user cache
    folder when None."""
    return (folder or default_timing_cache_dir()) / f"timing-{slug(gpu)}-trt{tensorrt_version}.cache"


def _parse(trt: Any, builder: Any, logger: Any, onnx_path: Path) -> Any:
    # Required for strong typing on TensorRT 10; accepted (and always on) in 11.
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    return network


def build_engine(
    onnx_path: Path, engine_path: Path, shapes: ShapeRange, timing_cache_dir: Path | None = None
) -> None:
    """Build and serialize one engine from `onnx_path` with the types its graph gives (so an fp16
    graph makes an fp16 engine); the timing cache (in `timing_cache_dir`, or the user cache folder)
    is read before and written after."""
    trt, _ = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = _parse(trt, builder, logger, onnx_path)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    profile = builder.create_optimization_profile()
    profile.set_shape(shapes.input_name, shapes.minimum, shapes.optimum, shapes.maximum)
    config.add_optimization_profile(profile)
    cache_path = timing_cache_path(gpu_name(), trt.__version__, timing_cache_dir)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=True)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT could not build an engine from {onnx_path.name} (see the log above)")
    engine_path.write_bytes(bytes(serialized))
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))


def run_engine(engine_path: Path, inputs: np.ndarray) -> np.ndarray:
    """Run a one-input, one-output engine on the GPU (used for parity checks and benchmarks)."""
    trt, torch = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        raise ExportError(f"{engine_path.name} does not deserialize on this GPU / TensorRT version")
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    (input_name,) = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    (output_name,) = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    context = engine.create_execution_context()
    device_input = torch.from_numpy(np.ascontiguousarray(inputs)).cuda()
    context.set_input_shape(input_name, tuple(device_input.shape))
    output_dtype = torch.float16 if engine.get_tensor_dtype(output_name) == trt.float16 else torch.float32
    device_output = torch.empty(
        tuple(context.get_tensor_shape(output_name)), dtype=output_dtype, device="cuda"
    )
    context.set_tensor_address(input_name, device_input.data_ptr())
    context.set_tensor_address(output_name, device_output.data_ptr())
    stream = torch.cuda.current_stream()
    if not context.execute_async_v3(stream.cuda_stream):
        raise ExportError(f"TensorRT failed to run {engine_path.name}")
    stream.synchronize()
    return device_output.float().cpu().numpy()


@dataclass(frozen=True)
class EngineFile:
    path: str
    tower: str
    gpu: str
    tensorrt_version: str


def build_engines(
    bundle_dir: Path,
    image_size: tuple[int, int],
    context_length: int,
    dynamic_length: bool,
    timing_cache_dir: Path | None = None,
    fp32_dir: Path | None = None,
) -> list[EngineFile]:
    """fp16 engines for both towers, from the fp16 graphs in `bundle_dir` (converted into a scratch
    folder, when the bundle has none, from the fp32 graphs of `fp32_dir`, by default the bundle's:
    they must be unfused, TensorRT parses standard ONNX ops only); the timing cache is kept in
    `timing_cache_dir`, or the user cache folder when None."""
    trt, _ = require_tensorrt()
    gpu = gpu_name()
    engines = []
    with tempfile.TemporaryDirectory(prefix="clipserve-fp16-") as scratch:
        for tower, shapes in (
            ("image", image_shapes(*image_size)),
            ("text", text_shapes(context_length, dynamic_length)),
        ):
            name = engine_filename(tower, gpu, trt.__version__)
            graph = fp16_graph(bundle_dir, tower, Path(scratch), fp32_dir)
            build_engine(graph, bundle_dir / name, shapes, timing_cache_dir)
            engines.append(EngineFile(name, tower, gpu, trt.__version__))
    return engines


def fp16_graph(bundle_dir: Path, tower: str, scratch: Path, fp32_dir: Path | None = None) -> Path:
    """The tower's fp16 graph: the bundle's own, or one converted from the fp32 graph of `fp32_dir`
    (by default the bundle's) into `scratch`."""
    published = bundle_dir / f"{tower}.fp16.onnx"
    if published.is_file():
        return published
    from clipserve.export.quantize import convert_fp16

    converted = scratch / f"{tower}.fp16.onnx"
    convert_fp16((fp32_dir or bundle_dir) / f"{tower}.onnx", converted)
    return converted
