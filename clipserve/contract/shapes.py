"""Shapes the engines are built for: the one input of each tower, its minimum, optimum and maximum.

Shared by the exporter (TensorRT engines built at export, `clipserve.export.tensorrt`) and the service
(engines ONNX Runtime's TensorRT provider builds at load, `clipserve.service.runtime`), so both build
for the same ranges. Names of machine-specific files use `slug` of the GPU's name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_BATCH_RANGE = (1, 8, 64)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


@dataclass(frozen=True)
class ShapeRange:
    """min / opt / max shapes of the one input of a graph (one optimization profile)."""

    input_name: str
    minimum: tuple[int, ...]
    optimum: tuple[int, ...]
    maximum: tuple[int, ...]


def image_shapes(height: int, width: int, batches: tuple[int, int, int] = DEFAULT_BATCH_RANGE) -> ShapeRange:
    return ShapeRange("pixel_values", *((b, 3, height, width) for b in batches))


def text_shapes(
    context_length: int, dynamic_length: bool, batches: tuple[int, int, int] = DEFAULT_BATCH_RANGE
) -> ShapeRange:
    """With a dynamic length, lengths 2..context (tuned for short captions); else the context only."""
    shortest, typical = (2, min(16, context_length)) if dynamic_length else (context_length, context_length)
    low, mid, high = batches
    return ShapeRange("input_ids", (low, shortest), (mid, typical), (high, context_length))
