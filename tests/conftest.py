"""Shared test set-up. Fixtures live in tests/fixtures/, one module per area, loaded as plugins."""

from __future__ import annotations

import pytest

pytest_plugins = [
    "tests.fixtures.models",
    "tests.fixtures.service",
    "tests.fixtures.training",
    "tests.fixtures.retrieval",
]


def _cuda_available() -> bool:
    try:
        import onnxruntime

        return "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    except ImportError:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _cuda_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (onnxruntime CUDAExecutionProvider not available)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
