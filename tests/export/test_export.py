"""The exporter on a tiny random-init CLIP: real ONNX export, real ONNX Runtime sessions."""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from clipserve.contract.bundle import (
    BundleIntegrityError,
    Manifest,
    ModelRepository,
    ModelSource,
    RepositoryNotWritableError,
    VersionExistsError,
    load_bundle,
)
from clipserve.contract.tokenizer import ClipTokenizer
from clipserve.export.errors import ExportError, ParityError
from clipserve.export.exporter import cpu_float32, export_bundle
from clipserve.export.sources import model_from_config
from clipserve.export.verify import DEFAULT_MIN_COSINE, agreement, make_session

TEXTS = ["a photo of a dog", "a red car parked on a street at night", "x", "🙂 emoji and CAPITALS"]


def _torch_image(model, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return F.normalize(model.encode_image(torch.from_numpy(images)), dim=-1).numpy()


def _torch_text(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return F.normalize(model.encode_text(torch.from_numpy(ids)), dim=-1).numpy()


def _run(path: Path, inputs: np.ndarray) -> np.ndarray:
    session = make_session(path, threads=1)
    return session.run(None, {session.get_inputs()[0].name: inputs})[0]


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(7).standard_normal((3, 3, 32, 32), dtype=np.float32)


@pytest.fixture(scope="module")
def token_batch(tiny_bundle):
    return ClipTokenizer.from_spec(tiny_bundle.manifest.tokenizer, tiny_bundle.path).encode(TEXTS)


def test_graphs_have_the_contract_names_opset_and_dynamic_axes(tiny_bundle) -> None:
    for tower, input_name, output_name in (
        ("image", "pixel_values", "image_embeds"),
        ("text", "input_ids", "text_embeds"),
    ):
        graph = onnx.load(str(tiny_bundle.file_path(tower)))
        assert max(op.version for op in graph.opset_import if op.domain in ("", "ai.onnx")) >= 17
        (graph_input,) = graph.graph.input
        (graph_output,) = graph.graph.output
        assert (graph_input.name, graph_output.name) == (input_name, output_name)
        assert graph_input.type.tensor_type.shape.dim[0].dim_param, f"{tower} batch axis is fixed"
        assert graph_output.type.tensor_type.shape.dim[1].dim_value == 32
    text_input = onnx.load(str(tiny_bundle.file_path("text"))).graph.input[0]
    assert text_input.type.tensor_type.shape.dim[1].dim_param, "text sequence axis is fixed"


def test_image_graph_matches_torch_at_several_batch_sizes(tiny_bundle, tiny_model, images) -> None:
    expected = _torch_image(tiny_model, images)
    for batch in (1, 3):
        actual = _run(tiny_bundle.file_path("image"), images[:batch])
        figures = agreement(expected[:batch], actual)
        assert figures.min_cosine >= 0.9999 and figures.max_abs_diff < 1e-4
        assert np.allclose(np.linalg.norm(actual, axis=1), 1.0, atol=1e-5)


def test_text_graph_matches_torch_and_needs_no_padding(tiny_bundle, tiny_model, token_batch) -> None:
    assert tiny_bundle.manifest.text.dynamic_length is True
    expected = _torch_text(tiny_model, token_batch.ids)
    full = _run(tiny_bundle.file_path("text"), token_batch.ids)
    trimmed_ids = token_batch.trimmed()
    assert trimmed_ids.shape[1] < 77
    trimmed = _run(tiny_bundle.file_path("text"), trimmed_ids)
    assert agreement(expected, full).min_cosine >= 0.9999
    assert np.abs(full - trimmed).max() < 1e-5
    one_by_one = np.concatenate(
        [
            _run(tiny_bundle.file_path("text"), token_batch.ids[row : row + 1, : token_batch.lengths[row]])
            for row in range(len(TEXTS))
        ]
    )
    assert np.abs(full - one_by_one).max() < 1e-5


def test_int8_graphs_quantize_matmuls_only_and_stay_close(
    tiny_bundle, tiny_model, images, token_batch
) -> None:
    for tower in ("image", "text"):
        ops = {node.op_type for node in onnx.load(str(tiny_bundle.file_path(tower, "int8"))).graph.node}
        assert "DynamicQuantizeLinear" in ops or "MatMulInteger" in ops
        assert "ConvInteger" not in ops
    image = agreement(_torch_image(tiny_model, images), _run(tiny_bundle.file_path("image", "int8"), images))
    text = agreement(
        _torch_text(tiny_model, token_batch.ids),
        _run(tiny_bundle.file_path("text", "int8"), token_batch.trimmed()),
    )
    assert image.min_cosine >= DEFAULT_MIN_COSINE["int8"]
    assert text.min_cosine >= DEFAULT_MIN_COSINE["int8"]


def test_manifest_round_trips_and_describes_the_model(tiny_bundle, tiny_model, tiny_clip_config) -> None:
    raw = (tiny_bundle.path / "manifest.json").read_text()
    manifest = Manifest.model_validate_json(raw)
    assert manifest == tiny_bundle.manifest
    assert Manifest.model_validate_json(manifest.to_json()) == manifest
    assert (manifest.name, manifest.version, manifest.embed_dim) == ("tiny", 1, 32)
    assert math.isclose(manifest.logit_scale, float(tiny_model.logit_scale.detach().exp()), rel_tol=1e-6)
    assert manifest.logit_bias is None
    assert manifest.image.size == (32, 32)
    assert manifest.image.mean == pytest.approx(tiny_model.visual.preprocess_cfg["mean"])
    assert manifest.image.interpolation == tiny_model.visual.preprocess_cfg["interpolation"]
    assert (manifest.tokenizer.context_length, manifest.tokenizer.eot_token_id) == (77, 49407)
    assert manifest.source.config == tiny_clip_config
    reports = {(r.tower, r.precision): r for r in manifest.parity}
    assert set(reports) == {("image", "fp32"), ("text", "fp32"), ("image", "int8"), ("text", "int8")}
    assert all(r.passed and r.min_cosine >= r.threshold for r in reports.values())
    assert reports["text", "fp32"].threshold == 0.9999
    assert {r.runtime for r in reports.values()} == {"onnxruntime-cpu"}
    assert {f.path for f in manifest.files} == {
        "image.onnx",
        "text.onnx",
        "image.int8.onnx",
        "text.int8.onnx",
        "bpe_simple_vocab_16e6.txt.gz",
    }


def test_corrupted_exported_file_is_named_on_load(tiny_bundle, tmp_path: Path) -> None:
    copy = tmp_path / "tiny" / "1"
    shutil.copytree(tiny_bundle.path, copy)
    data = bytearray((copy / "text.int8.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "text.int8.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError, match=r"text\.int8\.onnx is corrupted"):
        load_bundle(copy)


def test_existing_version_is_refused_before_any_work(tiny_repo: Path, tiny_model) -> None:
    source = ModelSource(architecture="tiny-clip")
    with pytest.raises(VersionExistsError, match="version 1 already exists"):
        export_bundle(tiny_model, tiny_repo, "tiny", source=source, version=1, progress=False)
    assert ModelRepository(tiny_repo).versions("tiny") == [1]


def test_unwritable_repository_is_refused(tmp_path: Path, tiny_model) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(RepositoryNotWritableError, match="not writable"):
        export_bundle(
            tiny_model,
            blocker / "models",
            "tiny",
            source=ModelSource(architecture="tiny-clip"),
            progress=False,
        )


def test_failed_parity_publishes_nothing_and_leaves_the_model_as_it_was(tmp_path: Path, tiny_model) -> None:
    repo = tmp_path / "models"
    tiny_model.train()
    try:
        # No int8 graph can reach cosine 1 - 1e-12 to the fp32 model.
        with pytest.raises(ParityError, match=r"int8 graphs disagree.*image\.int8\.onnx: min cosine"):
            export_bundle(
                tiny_model,
                repo,
                "strict",
                source=ModelSource(architecture="tiny-clip"),
                int8=True,
                min_cosine={"int8": 1 - 1e-12},
                progress=False,
            )
        assert tiny_model.training
    finally:
        tiny_model.eval()
    assert ModelRepository(repo).versions("strict") == []
    assert [p.name for p in (repo / "strict").iterdir() if not p.name.startswith(".publish")] == []


def test_models_off_the_cpu_or_not_fp32_are_exported_from_a_cpu_fp32_copy(tiny_model) -> None:
    assert cpu_float32(tiny_model) is tiny_model
    half = copy.deepcopy(tiny_model).bfloat16()
    exported = cpu_float32(half)
    assert exported is not half
    assert all(p.dtype == torch.float32 for p in exported.parameters())
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())


def test_manifest_is_plain_json(tiny_bundle) -> None:
    document = json.loads((tiny_bundle.path / "manifest.json").read_text())
    assert document["text"] == {"dynamic_length": True, "pooling": "argmax"}


TINY_MOBILE_CONFIG = {
    "embed_dim": 32,
    "custom_text": True,
    "vision_cfg": {
        "timm_model_name": "fastvit_t8",
        "timm_model_pretrained": False,
        "timm_pool": "avg",
        "timm_proj": "linear",
        "image_size": 64,
    },
    "text_cfg": {
        "context_length": 77,
        "vocab_size": 49408,
        "width": 64,
        "heads": 2,
        "layers": 2,
        "no_causal_mask": True,
    },
}


@pytest.mark.slow
def test_mobileclip_style_model_is_reparameterized_and_keeps_a_fixed_text_length(tmp_path: Path) -> None:
    """FastViT image tower (re-parameterizable blocks) and a MobileCLIP text tower without causal mask."""
    torch.manual_seed(0)
    model = model_from_config(TINY_MOBILE_CONFIG)
    bundle = export_bundle(
        model, tmp_path, "mobile", source=ModelSource(architecture="tiny-mobile"), progress=False
    )
    # Without a causal mask the padding changes the vectors: the graph must say so and keep length 77.
    assert bundle.manifest.text.dynamic_length is False
    text_input = onnx.load(str(bundle.file_path("text"))).graph.input[0]
    assert text_input.type.tensor_type.shape.dim[1].dim_value == 77
    image_graph = onnx.load(str(bundle.file_path("image"))).graph
    exported_convs = sum(node.op_type == "Conv" for node in image_graph.node)
    training_convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.visual.modules())
    assert exported_convs < training_convs, "re-parameterization should have merged conv branches"
    images = np.random.default_rng(3).standard_normal((2, 3, 64, 64), dtype=np.float32)
    assert (
        agreement(_torch_image(model, images), _run(bundle.file_path("image"), images)).min_cosine >= 0.9999
    )
    assert all(r.passed for r in bundle.manifest.parity)


def test_model_without_preprocess_config_is_refused_clearly(tiny_clip_config, tmp_path: Path) -> None:
    import open_clip

    bare = open_clip.CLIP(**tiny_clip_config)  # built without open_clip's factory: no preprocess config
    with pytest.raises(ExportError, match=r"no image preprocess mean, std .*pass preprocess="):
        export_bundle(bare, tmp_path, "bare", source=ModelSource(architecture="bare"), progress=False)
    assert ModelRepository(tmp_path).versions("bare") == []
