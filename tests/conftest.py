"""Shared test set-up. Fixtures live in tests/fixtures/, one module per area, loaded as plugins."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

pytest_plugins = [
    "tests.fixtures.models",
    "tests.fixtures.service",
    "tests.fixtures.training",
    "tests.fixtures.retrieval",
    "tests.fixtures.families",
]


def _why_no_cuda() -> str | None:
    """Why CUDA cannot run here, decided by a real session on a one-node graph (None: it can).

    `get_available_providers()` only lists what the onnxruntime build contains; a session says
    whether the provider really loads (driver, GPU, CUDA and cuDNN libraries)."""
    try:
        import onnxruntime
    except ImportError:
        return "onnxruntime is not installed"
    from service.runtime import ProviderUnavailableError
    from service.runtime.gpu_stack import check_single_onnxruntime, session_providers, write_identity_graph

    try:
        installed = check_single_onnxruntime()
    except ProviderUnavailableError as exc:
        return str(exc)
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return f"{installed} has no CUDA provider (install '.[serve-gpu,train-gpu,dev]' in a separate venv)"
    with tempfile.TemporaryDirectory() as scratch:
        graph = write_identity_graph(Path(scratch) / "identity.onnx")
        active, why = session_providers(graph, ["CUDAExecutionProvider"], preload=True)
    return None if "CUDAExecutionProvider" in active else f"a CUDA session does not start here: {why}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The marker, not `item.keywords`: keywords also hold folder names, and a checkout may be called gpu.
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    reason = _why_no_cuda() if gpu_items else None
    if reason is None:
        return
    skip_gpu = pytest.mark.skip(reason=f"needs a CUDA GPU: {reason}")
    for item in gpu_items:
        item.add_marker(skip_gpu)
