"""Keep third-party chatter (open_clip, the quantizer, the ONNX exporter) out of the export output."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_logs(up_to: int = logging.WARNING) -> Iterator[None]:
    """Hide Python warnings and log records up to `up_to` while a library call runs (errors show
    by default; pass logging.ERROR where the caller reports the failure itself)."""
    previous = logging.root.manager.disable
    logging.disable(up_to)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)
