"""What several benchmarks share: the machine's CPU in words, photo-like test images, a PostgreSQL. The
benchmarks run as scripts (`python bench/NAME.py`), so this module is imported from their folder."""

from __future__ import annotations

import contextlib
import io
import platform
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np


def cpu_name() -> str:
    """The CPU's model name, for the line every benchmark prints about its machine."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def photo(seed: int, size: tuple[int, int] = (640, 480)) -> bytes:
    """A JPEG with photo-like statistics: smooth shapes plus mild noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = [
        127
        + 100
        * np.sin(x / rng.uniform(20, 90) + rng.uniform(0, 6))
        * np.cos(y / rng.uniform(20, 90) + rng.uniform(0, 6))
        for _ in range(3)
    ]
    pixels = np.stack(channels, axis=-1) + rng.normal(0, 8, (height, width, 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, format="JPEG", quality=90)
    return out.getvalue()


@contextlib.contextmanager
def postgres(dsn: str | None) -> Iterator[str]:
    """The PostgreSQL (with pgvector) at `dsn`, or one started for the run in a temporary folder."""
    if dsn:
        yield dsn
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver
    pgdata = Path(tempfile.mkdtemp(prefix="clipserve-bench-pg-"))
    server = pgserver.get_server(pgdata, cleanup_mode="delete")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()
        shutil.rmtree(pgdata, ignore_errors=True)
