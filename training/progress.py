"""Training progress people can read: tqdm's bar on a terminal; written to a log (a file or a pipe),
one line of the same figures every `every_s` seconds instead of a redraw per step, which a file
keeps as one endless line of carriage returns."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from tqdm import tqdm

LOG_EVERY_S = 10.0


class _LinesEvery:
    """A file for tqdm: each redraw (`\\r` + the bar) becomes a line, at most one every `every_s`
    seconds; the last state is written when the bar closes."""

    def __init__(self, out: TextIO, every_s: float):
        self.out, self.every_s = out, every_s
        self._shown_at = float("-inf")
        self._pending = ""

    def write(self, text: str) -> int:
        if text.startswith("\r"):
            self._pending = text[1:].rstrip()
            now = time.monotonic()
            if self._pending and now - self._shown_at >= self.every_s:
                self._emit()
                self._shown_at = now
        elif text == "\n":
            self._emit()
        elif text.strip():
            self.out.write(text)
        return len(text)

    def _emit(self) -> None:
        if self._pending:
            self.out.write(self._pending + "\n")
            self.out.flush()
            self._pending = ""

    def flush(self) -> None:
        self.out.flush()


def progress_bar(*, stream: TextIO | None = None, every_s: float = LOG_EVERY_S, **options: Any) -> tqdm:
    """`tqdm(**options)` on a terminal; elsewhere the same figures as a line every `every_s`."""
    stream = stream or sys.stderr
    if stream.isatty():
        return tqdm(file=stream, **options)
    return tqdm(
        file=_LinesEvery(stream, every_s), mininterval=every_s, dynamic_ncols=False, ncols=100, **options
    )
