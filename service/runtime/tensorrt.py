"""TensorRT engine adapter for the `.plan` files made by export (GPU only).

`tensorrt` and `cuda.bindings` are imported when an engine is opened, never at import time, so
CPU installs do not need them. An engine only runs on the GPU model and TensorRT version that
built it; a mismatch is reported by TensorRT when deserializing, and raised here as
`RuntimeConfigError`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from export.bundle import Bundle
from service.runtime import ProviderUnavailableError, RuntimeConfigError, RuntimeOptions


def select_engine(bundle: Bundle, tower: str) -> tuple[Path, str]:
    """The tower's TensorRT engine, preferring one built by the installed TensorRT version."""
    engines = [
        e
        for e in bundle.manifest.files
        if e.role == "engine" and (e.tower == tower or (e.tower is None and e.path.startswith(f"{tower}.")))
    ]
    if not engines:
        raise RuntimeConfigError(f"{bundle.ref} has no TensorRT engine for its {tower} tower")
    try:
        import tensorrt

        installed = tensorrt.__version__
    except ImportError:
        installed = None
    chosen = next((e for e in engines if e.tensorrt_version == installed), engines[0])
    return bundle.path / chosen.path, chosen.precision or "fp16"


def _check(result: tuple) -> object:
    err, *values = result
    if int(err) != 0:
        raise RuntimeConfigError(f"CUDA call failed with error {err}")
    return values[0] if len(values) == 1 else values


class TensorRTRuntime:
    def __init__(self, path: Path, options: RuntimeOptions):
        try:
            import tensorrt as trt
            from cuda.bindings import runtime as cudart
        except ImportError as exc:
            raise ProviderUnavailableError(
                f"{path.name} is a TensorRT engine but tensorrt / cuda-python are not installed "
                "(install the 'gpu' extra)"
            ) from exc
        self._trt, self._cudart = trt, cudart
        _check(cudart.cudaSetDevice(options.device_id))
        logger = trt.Logger(trt.Logger.WARNING)
        engine = trt.Runtime(logger).deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise RuntimeConfigError(
                f"TensorRT could not load {path.name}: it was built for another GPU or TensorRT version"
            )
        self.engine = engine
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or not outputs:
            raise RuntimeConfigError(f"{path.name}: expected one input and an output, found {names}")
        self.input_name, self.output_name = inputs[0], outputs[0]
        self.max_batch = int(engine.get_tensor_profile_shape(self.input_name, 0)[2][0])
        self.active_providers = ["TensorRT"]
        self._stream = _check(cudart.cudaStreamCreate())

    def _device_copy(self, host: np.ndarray) -> int:
        cudart = self._cudart
        pointer = _check(cudart.cudaMalloc(host.nbytes))
        kind = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        _check(cudart.cudaMemcpyAsync(pointer, host.ctypes.data, host.nbytes, kind, self._stream))
        return int(pointer)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Batches above the engine profile's maximum run in slices of that size."""
        if len(batch) <= self.max_batch:
            return self._run_once(batch)
        return np.concatenate(
            [self._run_once(batch[i : i + self.max_batch]) for i in range(0, len(batch), self.max_batch)]
        )

    def _run_once(self, batch: np.ndarray) -> np.ndarray:
        cudart = self._cudart
        batch = np.ascontiguousarray(batch)
        self.context.set_input_shape(self.input_name, tuple(batch.shape))
        out_shape = tuple(self.context.get_tensor_shape(self.output_name))
        dtype = np.dtype(self._trt.nptype(self.engine.get_tensor_dtype(self.output_name)))
        output = np.empty(out_shape, dtype=dtype)
        in_ptr = self._device_copy(batch)
        out_ptr = int(_check(cudart.cudaMalloc(output.nbytes)))
        try:
            self.context.set_tensor_address(self.input_name, in_ptr)
            self.context.set_tensor_address(self.output_name, out_ptr)
            if not self.context.execute_async_v3(int(self._stream)):
                raise RuntimeConfigError("TensorRT execution failed")
            kind = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
            _check(cudart.cudaMemcpyAsync(output.ctypes.data, out_ptr, output.nbytes, kind, self._stream))
            _check(cudart.cudaStreamSynchronize(self._stream))
        finally:
            cudart.cudaFree(in_ptr)
            cudart.cudaFree(out_ptr)
        return output.astype(np.float32, copy=False)
