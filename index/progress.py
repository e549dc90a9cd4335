"""Progress people can read: a bar with rate and ETA on a terminal, a line every `every_s` seconds
in a log (from a timer thread, so a slow shard still shows the job is alive), and the final summary."""

from __future__ import annotations

import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TextIO


def duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return (
        f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
    )


@dataclass
class NodeTally:
    items: int = 0
    encode_s: float = 0.0


@dataclass
class Tally:
    """What the job did in this run (items of shards finished now) and before it."""

    total: int
    done_before: int
    items: int = 0
    errors: int = 0
    shards: int = 0
    nodes: dict[str, NodeTally] = field(default_factory=lambda: defaultdict(NodeTally))
    # when the first shard came back (seconds into the job) and its items: what follows is the
    # steady rate, once the workers have started and the actors have loaded the model
    first_at: float | None = None
    first_items: int = 0

    @property
    def done(self) -> int:
        return self.done_before + self.items


class Progress:
    """`mode`: bar, log or off (auto picks bar on a terminal, else log)."""

    def __init__(self, tally: Tally, mode: str, every_s: float, unit: str, stream: TextIO = sys.stderr):
        if mode == "auto":
            mode = "bar" if stream.isatty() else "log"
        self.tally, self.mode, self.every_s, self.unit, self.stream = tally, mode, every_s, unit, stream
        self.started = time.monotonic()
        self._bar = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(
                total=tally.total,
                initial=tally.done_before,
                unit=unit,
                file=stream,
                dynamic_ncols=True,
                smoothing=0.1,
            )
        elif mode == "log":
            self._thread = threading.Thread(target=self._tick, name="clip-index-progress", daemon=True)
            self._thread.start()

    def advance(self, items: int, errors: int, node: str, encode_s: float) -> None:
        tally = self.tally
        if tally.first_at is None:
            tally.first_at, tally.first_items = time.monotonic() - self.started, items
        tally.items += items
        tally.errors += errors
        tally.shards += 1
        tally.nodes[node].items += items
        tally.nodes[node].encode_s += encode_s
        if self._bar is not None:
            self._bar.update(items)
            self._bar.set_postfix(errors=tally.errors, refresh=False)

    def line(self) -> str:
        tally = self.tally
        elapsed = time.monotonic() - self.started
        rate = tally.items / elapsed if elapsed > 0 else 0.0
        left = tally.total - tally.done
        eta = duration(left / rate) if rate > 0 else "unknown"
        share = 100.0 * tally.done / tally.total if tally.total else 100.0
        return (
            f"clip-index: {tally.done}/{tally.total} {self.unit} ({share:.1f}%), {rate:.1f} {self.unit}/s, "
            f"ETA {eta}, {tally.errors} errors"
        )

    def _tick(self) -> None:
        while not self._stop.wait(self.every_s):
            print(self.line(), file=self.stream, flush=True)

    def close(self) -> float:
        """Stop showing progress; the seconds since it started."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._bar is not None:
            self._bar.close()
        return time.monotonic() - self.started
