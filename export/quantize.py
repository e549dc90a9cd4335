"""Precision variants of an exported fp32 graph: int8 for CPU, fp16 for GPU."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

from clipserve.export.logs import quiet_logs

# Conv in int8 (ConvInteger) is many times slower than fp32 Conv in ONNX Runtime on CPU; only the
# matrix products gain. quant_pre_process is skipped: its symbolic shape inference fails on ViT graphs.
INT8_OP_TYPES = ("MatMul", "Gemm")
# Normalizations and softmax lose too much in fp16 (sums of squares overflow, exp saturates).
FP16_KEEP_FP32 = ("LayerNormalization", "ReduceMean", "Softmax", "Pow", "Sqrt", "Div", "ReduceL2")


# Weights are uint8 (U8U8), not int8: with int8 weights, x86 CPUs without VNNI (AVX2 only) saturate the
# int16 pair sums of the U8S8 kernel, and a bundle is served on whatever CPU the replica has. Measured
# on an AVX2-only EPYC, tiny random text tower: per-channel int8 weights min cosine 0.942, uint8 0.9987.
INT8_WEIGHT_TYPE = QuantType.QUInt8


def quantize_int8(source: Path, target: Path) -> None:
    """Dynamic 8-bit quantization of the weights of MatMul/Gemm; activations quantized at run time."""
    with quiet_logs():
        quantize_dynamic(
            source,
            target,
            op_types_to_quantize=list(INT8_OP_TYPES),
            weight_type=INT8_WEIGHT_TYPE,
            per_channel=True,
        )


class _Feeds(CalibrationDataReader):
    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]):
        self._feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def quantize_int8_static(source: Path, target: Path, feeds: Sequence[dict[str, np.ndarray]]) -> None:
    """Static 8-bit quantization (QDQ): per-channel uint8 weights of MatMul/Gemm/Conv, activation
    ranges calibrated (min/max) on `feeds`, inputs as the graph takes them. Measured against the
    dynamic kind by `bench/fusion.py --static`; bundles keep dynamic int8 for now."""
    with quiet_logs(logging.ERROR):
        quantize_static(
            source,
            target,
            _Feeds(feeds),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=[*INT8_OP_TYPES, "Conv"],
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=INT8_WEIGHT_TYPE,
            calibrate_method=CalibrationMethod.MinMax,
        )


def convert_fp16(source: Path, target: Path) -> None:
    """fp16 weights and compute, fp32 inputs and outputs (callers feed and read float32 as before)."""
    model = onnx.load(str(source))
    block = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(FP16_KEEP_FP32))
    with quiet_logs():
        converted = convert_float_to_float16(model, keep_io_types=True, op_block_list=block)
    onnx.save(converted, str(target))
