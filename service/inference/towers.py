"""A model's two towers, each what runs on its inference thread: the rows it takes (token-id rows
cut and padded for the text tower, decoded and preprocessed pixels for the image tower), its runtime,
and the unit vectors it gives back, counted per call.

The engine hands a tower's `run` to that tower's batcher; the image tower's `prepare_one` is what
the batcher's direct path decodes on the inference thread when the tower is idle.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from prometheus_client import Counter, Histogram

from clipserve.contract.scoring import normalize
from clipserve.contract.tokenizer import TokenizedBatch
from clipserve.service.inference.preprocess import ImagePreprocessor
from clipserve.service.runtime import Runtime


def pad_rows(rows: Sequence[np.ndarray], pad_id: int) -> np.ndarray:
    """Token-id rows as one batch, each padded with `pad_id` to the longest."""
    width = max(len(r) for r in rows)
    batch = np.full((len(rows), width), pad_id, dtype=np.int64)
    for i, row in enumerate(rows):
        batch[i, : len(row)] = row
    return batch


def token_rows(batch: TokenizedBatch, dynamic_length: bool) -> list[np.ndarray]:
    """A tokenized batch as one id row per text: cut at each text's end for a graph with a dynamic
    sequence axis (`pad_rows` then pads a batch only to its longest text), whole rows otherwise."""
    if dynamic_length:
        return [batch.ids[i, : int(n)] for i, n in enumerate(batch.lengths)]
    return list(batch.ids)


@dataclass
class TowerStats:
    calls: int = 0
    items: int = 0


class Tower:
    """One tower's runtime, run on rows of its own kind; unit vectors out, each call counted."""

    kind = ""

    def __init__(self, runtime: Runtime, calls: Counter):
        self.runtime, self._calls = runtime, calls
        self.stats = TowerStats()

    def batch(self, rows: Sequence[np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def run(self, rows: Sequence[np.ndarray]) -> np.ndarray:
        """Rows to unit vectors, on the tower's inference thread."""
        output = self.runtime.run(self.batch(rows))
        self.stats.calls += 1
        self.stats.items += len(rows)
        self._calls.inc()
        return normalize(output)


class TextTower(Tower):
    """Token-id rows, cut at each text's end when the graph's sequence axis is dynamic, padded per batch."""

    kind = "text"

    def __init__(self, runtime: Runtime, calls: Counter, pad_id: int, dynamic_length: bool):
        super().__init__(runtime, calls)
        self.pad_id, self.dynamic_length = pad_id, dynamic_length

    def rows(self, batch: TokenizedBatch) -> list[np.ndarray]:
        return token_rows(batch, self.dynamic_length)

    def batch(self, rows: Sequence[np.ndarray]) -> np.ndarray:
        return pad_rows(rows, self.pad_id)


class ImageTower(Tower):
    """Pixel rows from encoded images (decoded and preprocessed as the bundle says), stacked per batch."""

    kind = "image"

    def __init__(self, runtime: Runtime, calls: Counter, preprocessor: ImagePreprocessor, seconds: Histogram):
        super().__init__(runtime, calls)
        self.preprocessor, self._seconds = preprocessor, seconds

    def batch(self, rows: Sequence[np.ndarray]) -> np.ndarray:
        return np.stack(rows)

    def prepare(self, data: bytes, index: int) -> np.ndarray:
        """One encoded image as a pixel row (`index` names it in errors)."""
        return self.preprocessor(data, index)

    def prepare_one(self, data: bytes) -> list[np.ndarray]:
        """One image decoded and preprocessed on the inference thread (the idle tower's direct path)."""
        started = time.perf_counter()
        row = self.preprocessor(data, 0)
        self._seconds.observe(time.perf_counter() - started)
        return [row]
