"""TensorRT engine adapter for the `.plan` files made by export (GPU only).

`tensorrt` and `cuda.bindings` are imported when an engine is chosen or opened, never at import
time, so CPU installs need neither. A serialized engine only loads on the GPU model and TensorRT
version that built it: `select_engine` picks the bundle's engine for this GPU and TensorRT, and
refuses, naming what the bundle has, when none matches.

The CUDA runtime's current device is per thread and batches run on the tower's inference thread,
not on the loader's, so every call makes the device current in its own thread. Device buffers and
page-locked host buffers are kept and reused, grown to the largest batch seen (at most the
profile's maximum): freeing device memory synchronises the whole device, and copies from pageable
memory are staged and slower. `close()` frees them and destroys the stream.
"""

from __future__ import annotations

import ctypes
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipserve.contract.bundle import Bundle, BundleFile
from clipserve.service.runtime.base import ProviderUnavailableError, RuntimeConfigError, RuntimeOptions
from clipserve.service.runtime.gpu_stack import load_tensorrt


def _cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart
    except ImportError as exc:
        raise ProviderUnavailableError(
            "TensorRT engines need cuda-bindings, which is not installed (install '.[serve-gpu]')"
        ) from exc
    return cudart


def _error_name(err: Any) -> str:
    _, name = _cudart().cudaGetErrorName(err)
    return name.decode() if isinstance(name, bytes) else str(name)


def _check(result: tuple) -> Any:
    err, *values = result
    if int(err) != 0:
        raise RuntimeConfigError(f"CUDA call failed: {_error_name(err)}")
    return values[0] if len(values) == 1 else values


def device_name(device_id: int = 0) -> str:
    """The GPU's name as CUDA reports it (what export records as an engine's `gpu`)."""
    cudart = _cudart()
    err, properties = cudart.cudaGetDeviceProperties(device_id)
    if int(err) != 0:
        raise ProviderUnavailableError(
            f"no usable CUDA device {device_id} for TensorRT engines ({_error_name(err)})"
        )
    name = properties.name
    return (name.decode(errors="replace") if isinstance(name, bytes) else str(name)).rstrip("\x00")


def tower_engines(bundle: Bundle, tower: str) -> list[BundleFile]:
    return [
        e
        for e in bundle.manifest.files
        if e.role == "engine" and (e.tower == tower or (e.tower is None and e.path.startswith(f"{tower}.")))
    ]


def matching_engine(bundle: Bundle, tower: str, gpu: str, tensorrt_version: str) -> BundleFile:
    """The tower's engine built on this GPU model with this TensorRT version, or a clear refusal."""
    engines = tower_engines(bundle, tower)
    if not engines:
        raise RuntimeConfigError(f"{bundle.ref} has no TensorRT engine for its {tower} tower")
    for candidate in engines:
        if candidate.gpu == gpu and candidate.tensorrt_version == tensorrt_version:
            return candidate
    built = "; ".join(
        f"{e.path} ({e.gpu or 'GPU not recorded'}, TensorRT {e.tensorrt_version or 'not recorded'})"
        for e in engines
    )
    raise RuntimeConfigError(
        f"{bundle.ref} has no {tower} engine for this machine ({gpu}, TensorRT {tensorrt_version}); it has "
        f"{built}. Build engines here with clip-export --tensorrt, or serve the ONNX graphs "
        "(CLIPSERVE_ENGINE=onnxruntime)"
    )


def select_engine(bundle: Bundle, tower: str, device_id: int = 0) -> tuple[Path, str]:
    """(path, precision) of the tower's engine for the GPU and TensorRT version of this machine."""
    if not tower_engines(bundle, tower):
        raise RuntimeConfigError(f"{bundle.ref} has no TensorRT engine for its {tower} tower")
    trt = load_tensorrt()
    chosen = matching_engine(bundle, tower, device_name(device_id), trt.__version__)
    return bundle.path / chosen.path, chosen.precision or "fp16"


@dataclass
class _Buffers:
    """Device and page-locked host memory for up to `rows` rows of input and output."""

    rows: int
    output_row_bytes: int
    device_input: int
    device_output: int
    host_input: int
    host_output: int

    def host_view(self, pointer: int, nbytes: int) -> np.ndarray:
        return np.ctypeslib.as_array((ctypes.c_ubyte * nbytes).from_address(pointer))


class TensorRTRuntime:
    def __init__(self, path: Path, options: RuntimeOptions):
        trt = load_tensorrt()
        self._trt, self._cudart = trt, _cudart()
        self._device_id = options.device_id
        self._thread = threading.local()
        self._lock = threading.Lock()
        self._use_device()
        logger = trt.Logger(trt.Logger.WARNING)
        engine = trt.Runtime(logger).deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise RuntimeConfigError(
                f"TensorRT could not load {path.name}: it was built for another GPU or TensorRT version"
            )
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or not outputs:
            raise RuntimeConfigError(f"{path.name}: expected one input and an output, found {names}")
        self.engine, self.context = engine, engine.create_execution_context()
        self.input_name, self.output_name = inputs[0], outputs[0]
        self.input_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(self.input_name)))
        self.output_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(self.output_name)))
        minimum, _, maximum = engine.get_tensor_profile_shape(self.input_name, 0)
        self.min_shape, self.max_shape = tuple(minimum), tuple(maximum)
        self.max_batch = self.max_shape[0]
        self.active_providers = ["TensorRT"]
        self._stream = _check(self._cudart.cudaStreamCreate())
        self._buffers: _Buffers | None = None

    def _use_device(self) -> None:
        """Make the engine's GPU current in the calling thread (once per thread)."""
        if getattr(self._thread, "device_set", False):
            return
        _check(self._cudart.cudaSetDevice(self._device_id))
        self._thread.device_set = True

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Batches above the engine profile's maximum run in slices of that size."""
        self._use_device()
        with self._lock:
            if self._stream is None:
                raise RuntimeConfigError("this TensorRT runtime is closed")
            if len(batch) <= self.max_batch:
                return self._run_once(batch)
            return np.concatenate(
                [self._run_once(batch[i : i + self.max_batch]) for i in range(0, len(batch), self.max_batch)]
            )

    def check_input(self, batch: np.ndarray) -> None:
        if batch.dtype != self.input_dtype:
            raise RuntimeConfigError(
                f"{self.input_name}: the engine takes {self.input_dtype}, this batch is {batch.dtype}"
            )
        low, high = self.min_shape, self.max_shape
        if batch.ndim != len(low) or not all(
            lo <= d <= hi for d, lo, hi in zip(batch.shape, low, high, strict=False)
        ):
            raise RuntimeConfigError(
                f"{self.input_name}: shape {tuple(batch.shape)} is outside the engine's profile "
                f"{low} .. {high}"
            )

    def _run_once(self, batch: np.ndarray) -> np.ndarray:
        cudart, context = self._cudart, self.context
        batch = np.ascontiguousarray(batch)
        self.check_input(batch)
        if not context.set_input_shape(self.input_name, tuple(batch.shape)):
            raise RuntimeConfigError(f"TensorRT refused the input shape {tuple(batch.shape)}")
        out_shape = tuple(context.get_tensor_shape(self.output_name))
        out_bytes = math.prod(out_shape) * self.output_dtype.itemsize
        buffers = self._buffers_for(len(batch), out_bytes // len(batch))
        np.copyto(buffers.host_view(buffers.host_input, batch.nbytes), batch.reshape(-1).view(np.uint8))
        to_device, to_host = (
            cudart.cudaMemcpyKind.cudaMemcpyHostToDevice,
            cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost,
        )
        stream = self._stream
        _check(
            cudart.cudaMemcpyAsync(buffers.device_input, buffers.host_input, batch.nbytes, to_device, stream)
        )
        context.set_tensor_address(self.input_name, buffers.device_input)
        context.set_tensor_address(self.output_name, buffers.device_output)
        if not context.execute_async_v3(int(stream)):
            raise RuntimeConfigError("TensorRT execution failed")
        _check(cudart.cudaMemcpyAsync(buffers.host_output, buffers.device_output, out_bytes, to_host, stream))
        _check(cudart.cudaStreamSynchronize(stream))
        raw = buffers.host_view(buffers.host_output, out_bytes).view(self.output_dtype).reshape(out_shape)
        return raw.astype(np.float32)  # a copy: the page-locked buffer is reused by the next batch

    def _buffers_for(self, rows: int, output_row_bytes: int) -> _Buffers:
        """The kept buffers when they hold `rows` rows; else new ones for the next power of two rows
        (at most the profile's maximum), each row sized for the profile's largest input row."""
        current = self._buffers
        if current is not None and current.rows >= rows and current.output_row_bytes >= output_row_bytes:
            return current
        capacity = min(self.max_batch, 1 << max(0, rows - 1).bit_length())
        in_bytes = capacity * math.prod(self.max_shape[1:]) * self.input_dtype.itemsize
        out_bytes = capacity * output_row_bytes
        self._free_buffers()
        cudart = self._cudart
        self._buffers = _Buffers(
            rows=capacity,
            output_row_bytes=output_row_bytes,
            device_input=int(_check(cudart.cudaMalloc(in_bytes))),
            device_output=int(_check(cudart.cudaMalloc(out_bytes))),
            host_input=int(_check(cudart.cudaMallocHost(in_bytes))),
            host_output=int(_check(cudart.cudaMallocHost(out_bytes))),
        )
        return self._buffers

    def _free_buffers(self) -> None:
        buffers, self._buffers = self._buffers, None
        if buffers is None:
            return
        cudart = self._cudart
        _check(cudart.cudaStreamSynchronize(self._stream))
        for pointer in (buffers.device_input, buffers.device_output):
            _check(cudart.cudaFree(pointer))
        for pointer in (buffers.host_input, buffers.host_output):
            _check(cudart.cudaFreeHost(pointer))

    def close(self) -> None:
        """Free the buffers, destroy the stream and drop the engine; safe to call more than once."""
        self._use_device()
        with self._lock:
            if self._stream is None:
                return
            self._free_buffers()
            _check(self._cudart.cudaStreamDestroy(self._stream))
            self._stream = None
            self.context = self.engine = None
