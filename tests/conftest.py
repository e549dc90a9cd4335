"""Shared test set-up. Fixtures live in tests/fixtures/, one module per area, loaded as plugins."""

from __future__ import annotations

import pytest

pytest_plugins = [
    "tests.fixtures.models",
    "tests.fixtures.service",
    "tests.fixtures.training",
    "tests.fixtures.retrieval",
    "tests.fixtures.families",
    "tests.fixtures.indexing",
]


def _why_no_cuda() -> str | None:
    """Decided by a real CUDA session on a one-node graph (clipserve.service.runtime.gpu_stack.why_no_cuda),
    the same question the GPU image's check asks."""
    from clipserve.service.runtime.gpu_stack import why_no_cuda

    return why_no_cuda()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The marker, not `item.keywords`: keywords also hold folder names, and a checkout may be called gpu.
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    reason = _why_no_cuda() if gpu_items else None
    if reason is None:
        return
    skip_gpu = pytest.mark.skip(reason=f"needs a CUDA GPU: {reason}")
    for item in gpu_items:
        item.add_marker(skip_gpu)
