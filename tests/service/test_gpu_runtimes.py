"""The GPU runtimes on a real GPU: ONNX Runtime's TensorRT provider with its engine cache and
profile, and the TensorRT engine runtime (device per thread, checked inputs, kept buffers, close).

All marked `gpu`: they skip, saying why, where no CUDA session starts (tests/conftest.py).
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from clipserve.service.runtime import RuntimeConfigError, RuntimeOptions, open_runtime, tower_options
from clipserve.service.settings import Settings

pytestmark = pytest.mark.gpu


def _pixels(batch: int, size: tuple[int, int]) -> np.ndarray:
    return np.random.default_rng(batch).standard_normal((batch, 3, *size), dtype=np.float32)


def test_tensorrt_provider_reuses_its_cached_engines(tiny_bundle, tmp_path: Path) -> None:
    pytest.importorskip("tensorrt")
    settings = Settings(data_dir=tmp_path, providers=["tensorrt", "cuda"], max_batch_size_image=4)
    options = tower_options(settings, tiny_bundle.manifest, "image")
    pixels = _pixels(4, tiny_bundle.manifest.image.size)
    cpu = open_runtime(tiny_bundle.file_path("image"), RuntimeOptions()).run(pixels)
    first = open_runtime(tiny_bundle.file_path("image"), options)
    assert first.active_providers[0] == "TensorrtExecutionProvider"
    np.testing.assert_allclose(first.run(pixels), cpu, atol=1e-3)
    first.close()
    engines = sorted(p for p in options.engine_cache_dir.rglob("*") if p.is_file())
    assert engines, f"no engine cached under {options.engine_cache_dir}"
    stamps = {p: p.stat().st_mtime_ns for p in engines}
    second = open_runtime(tiny_bundle.file_path("image"), options)
    np.testing.assert_allclose(second.run(pixels), cpu, atol=1e-3)
    assert {p: p.stat().st_mtime_ns for p in engines} == stamps  # loaded, not rebuilt


@pytest.fixture(scope="module")
def image_engine(tiny_bundle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("tensorrt")
    from clipserve.export.tensorrt import build_engines

    folder = tmp_path_factory.mktemp("engine")
    for tower in ("image", "text"):
        shutil.copyfile(tiny_bundle.file_path(tower), folder / f"{tower}.onnx")
    manifest = tiny_bundle.manifest
    engines = build_engines(
        folder,
        manifest.image.size,
        manifest.tokenizer.context_length,
        manifest.text.dynamic_length,
        timing_cache_dir=folder / "timing-cache",
    )
    return folder / engines[0].path


def test_engine_runtime_checks_inputs_keeps_buffers_and_closes(tiny_bundle, image_engine: Path) -> None:
    runtime = open_runtime(image_engine, RuntimeOptions(providers=("cuda",)))
    size = tiny_bundle.manifest.image.size
    with pytest.raises(RuntimeConfigError, match="takes float32, this batch is float64"):
        runtime.run(_pixels(2, size).astype(np.float64))
    with pytest.raises(RuntimeConfigError, match="outside the engine's profile"):
        runtime.run(_pixels(2, (size[0] + 8, size[1])))
    runtime.run(_pixels(3, size))
    kept = runtime._buffers
    assert kept is not None and kept.rows == 4
    runtime.run(_pixels(4, size))
    assert runtime._buffers is kept  # same device and page-locked memory, no new allocation
    runtime.run(_pixels(5, size))
    assert runtime._buffers.rows == 8
    runtime.close()
    runtime.close()
    with pytest.raises(RuntimeConfigError, match="closed"):
        runtime.run(_pixels(1, size))


def test_engine_runtime_runs_batches_from_another_thread(tiny_bundle, image_engine: Path) -> None:
    """The loader thread opens the engine; batches run on the tower's own thread, as in the service."""
    runtime = open_runtime(image_engine, RuntimeOptions(providers=("cuda",)))
    pixels = _pixels(2, tiny_bundle.manifest.image.size)
    expected = runtime.run(pixels)
    results: list[np.ndarray] = []
    worker = threading.Thread(target=lambda: results.append(runtime.run(pixels)))
    worker.start()
    worker.join(timeout=60)
    np.testing.assert_allclose(results[0], expected, atol=1e-5)
    runtime.close()
