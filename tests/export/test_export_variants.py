"""Precision variants: fp16 graphs (ONNX Runtime, CPU here and CUDA where present) and TensorRT engines.

TensorRT tests are marked `gpu`: they need a CUDA GPU and the tensorrt package, and skip without.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from clipserve.contract.bundle import ModelSource
from clipserve.contract.tokenizer import ClipTokenizer
from clipserve.export.exporter import export_bundle
from clipserve.export.quantize import convert_fp16
from clipserve.export.verify import DEFAULT_MIN_COSINE, agreement, make_session, providers_for

TEXTS = ["a photo of a dog", "a diagram", "three red apples on a wooden table"]


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(11).standard_normal((3, 3, 32, 32), dtype=np.float32)


@pytest.fixture(scope="module")
def token_ids(tiny_bundle):
    return ClipTokenizer.from_spec(tiny_bundle.manifest.tokenizer, tiny_bundle.path).encode(TEXTS)


def _expected(tiny_model, images: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        image = F.normalize(tiny_model.encode_image(torch.from_numpy(images)), dim=-1).numpy()
        text = F.normalize(tiny_model.encode_text(torch.from_numpy(ids)), dim=-1).numpy()
    return image, text


def test_fp16_graphs_keep_fp32_io_and_accuracy_layers(
    tiny_bundle, tiny_model, images, token_ids, tmp_path
) -> None:
    for tower in ("image", "text"):
        convert_fp16(tiny_bundle.file_path(tower), tmp_path / f"{tower}.fp16.onnx")
        graph = onnx.load(str(tmp_path / f"{tower}.fp16.onnx")).graph
        assert graph.input[0].type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT64)
        assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        initializers = {init.name: init.data_type for init in graph.initializer}
        assert onnx.TensorProto.FLOAT16 in initializers.values()
        norms = [node for node in graph.node if node.op_type == "LayerNormalization"]
        assert norms, "the exporter should emit LayerNormalization (opset >= 17)"
        # Kept in fp32: their scale stays float32 (or is cast back to it).
        assert all(
            initializers.get(node.input[1], onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT
            for node in norms
        )
    expected_image, expected_text = _expected(tiny_model, images, token_ids.ids)
    image_session = make_session(tmp_path / "image.fp16.onnx", providers_for("fp16"), threads=1)
    text_session = make_session(tmp_path / "text.fp16.onnx", providers_for("fp16"), threads=1)
    image = image_session.run(None, {"pixel_values": images})[0]
    text = text_session.run(None, {"input_ids": token_ids.trimmed()})[0]
    assert agreement(expected_image, image).min_cosine >= DEFAULT_MIN_COSINE["fp16"]
    assert agreement(expected_text, text).min_cosine >= DEFAULT_MIN_COSINE["fp16"]


@pytest.mark.gpu
def test_tensorrt_engines_are_keyed_by_gpu_and_match_torch(
    tiny_bundle, tiny_model, images, token_ids, tmp_path: Path
) -> None:
    trt = pytest.importorskip("tensorrt")
    from clipserve.export.exporter import export_tower_graphs
    from clipserve.export.tensorrt import build_engines, gpu_name, run_engine, timing_cache_path

    cache = tmp_path / "cache"
    # TensorRT parses standard ONNX ops only: the engines come from unfused graphs.
    plain = export_tower_graphs(tiny_model, tmp_path / "plain", fuse=False)
    engines = build_engines(
        tmp_path, (32, 32), 77, dynamic_length=True, timing_cache_dir=cache, fp32_dir=plain.image.parent
    )
    assert [e.tower for e in engines] == ["image", "text"]
    for engine in engines:
        assert engine.tensorrt_version == trt.__version__ and engine.gpu == gpu_name()
        assert f"trt{trt.__version__}" in engine.path and engine.path.endswith(".plan")
    assert timing_cache_path(gpu_name(), trt.__version__, cache).is_file()
    assert timing_cache_path(gpu_name(), trt.__version__, cache).parent == cache
    expected_image, expected_text = _expected(tiny_model, images, token_ids.ids)
    image = run_engine(tmp_path / engines[0].path, images)
    text = run_engine(tmp_path / engines[1].path, token_ids.trimmed())
    assert agreement(expected_image, image).min_cosine >= DEFAULT_MIN_COSINE["fp16"]
    assert agreement(expected_text, text).min_cosine >= DEFAULT_MIN_COSINE["fp16"]
    batch_of_20 = run_engine(tmp_path / engines[0].path, np.concatenate([images] * 7)[:20])
    assert batch_of_20.shape == (20, 32)


@pytest.mark.gpu
def test_export_with_tensorrt_and_fp16_publishes_checked_engines(tiny_model, tmp_path: Path) -> None:
    pytest.importorskip("tensorrt")
    bundle = export_bundle(
        tiny_model,
        tmp_path / "models",
        "tiny-gpu",
        source=ModelSource(architecture="tiny"),
        fp16=True,
        tensorrt=True,
        progress=False,
        timing_cache_dir=tmp_path / "cache",
    )
    engines = [f for f in bundle.manifest.files if f.role == "engine"]
    assert len(engines) == 2 and all(f.gpu and f.tensorrt_version and f.precision == "fp16" for f in engines)
    checked = {r.file for r in bundle.manifest.parity if r.passed}
    assert {f.path for f in engines} <= checked
    assert {"image.fp16.onnx", "text.fp16.onnx"} <= checked
