"""Keep third-party chatter (open_clip, the quantizer, the ONNX exporter) out of the export output."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_logs() -> Iterator[None]:
    """Hide warnings and log records below ERROR while a library call runs; errors still show."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)
