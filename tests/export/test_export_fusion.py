"""Exported graphs carry ONNX Runtime's fused attention, LayerNorm and GELU (tiny random-init models,
real exports, real ONNX Runtime sessions): the ops are in the graphs, parity with torch holds, the
manifest lists them, older manifests without them still load, and the service serves the fused bundle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from clipserve.contract.bundle import Manifest
from clipserve.export.exporter import export_tower_graphs
from clipserve.export.fusion import fused_attention, graph_fusions
from clipserve.export.towers import ImageTower, plan_text_tower
from clipserve.export.verify import agreement, fixed_images, fixed_token_ids, make_session, token_counts
from tests.fixtures.service import b64, image_bytes

LAYERS = 2  # per tower in the tiny config


def _nodes(path: Path, op_type: str) -> list[onnx.NodeProto]:
    return [node for node in onnx.load(str(path)).graph.node if node.op_type == op_type]


def _unidirectional(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "unidirectional"), 0)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_tiny_bundle_graphs_carry_fused_attention_layer_norm_and_gelu(tiny_bundle, precision: str) -> None:
    for tower, causal in (("image", 0), ("text", 1)):
        path = tiny_bundle.file_path(tower, precision)
        attention = _nodes(path, "MultiHeadAttention")
        assert len(attention) == LAYERS and all(node.domain == "com.microsoft" for node in attention)
        assert {_unidirectional(node) for node in attention} == {causal}
        # No attention left as separate nodes.
        assert not _nodes(path, "Softmax") and not _nodes(path, "Erf")
        fusions = tiny_bundle.manifest.file(tower, precision).fusions
        assert fusions == graph_fusions(path)
        assert fusions["MultiHeadAttention"] == LAYERS and fusions["BiasGelu"] == LAYERS
        assert fusions["LayerNormalization"] >= 2 * LAYERS
    fp32 = {r.file: r for r in tiny_bundle.manifest.parity if r.precision == "fp32"}
    assert all(report.min_cosine >= 0.9999 for report in fp32.values()) and len(fp32) == 2


def test_fused_text_graph_keeps_every_length_exact(tiny_bundle, tiny_model) -> None:
    ids = fixed_token_ids(77)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(
            tiny_model.encode_text(torch.from_numpy(ids)), dim=-1
        ).numpy()
    session = make_session(tiny_bundle.file_path("text"), threads=1)
    rows = [
        session.run(None, {"input_ids": row[None, :count]})[0]
        for row, count in zip(ids, token_counts(ids), strict=True)
    ]
    padded = session.run(None, {"input_ids": ids[:, :40]})[0]
    assert agreement(expected, np.concatenate(rows)).min_cosine >= 0.9999
    assert agreement(expected[token_counts(ids) <= 40], padded[token_counts(ids) <= 40]).min_cosine >= 0.9999


def test_swapped_attention_computes_what_the_model_does_and_is_put_back(tiny_model) -> None:
    images = torch.from_numpy(fixed_images(32, 32))
    ids = torch.from_numpy(fixed_token_ids(77))
    image_tower, plan = ImageTower(tiny_model).eval(), plan_text_tower(tiny_model)
    assert plan.causal_mask
    before = [type(m) for m in tiny_model.modules()]
    with torch.no_grad():
        image_expected, text_expected = image_tower(images), plan.module(ids)
        with (
            fused_attention(tiny_model.visual) as swapped_image,
            fused_attention(plan.module, True) as swapped_text,
        ):
            image_fused, text_fused = image_tower(images), plan.module(ids)
    assert (swapped_image, swapped_text) == (LAYERS, LAYERS)
    assert [type(m) for m in tiny_model.modules()] == before
    torch.testing.assert_close(image_fused, image_expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(text_fused, text_expected, atol=1e-5, rtol=1e-5)


def test_unfused_export_keeps_plain_onnx_ops(tiny_model, tmp_path: Path) -> None:
    graphs = export_tower_graphs(tiny_model, tmp_path, fuse=False)
    for path in (graphs.image, graphs.text):
        fusions = graph_fusions(path)
        assert "MultiHeadAttention" not in fusions and "BiasGelu" not in fusions
        assert len(_nodes(path, "Softmax")) == LAYERS
        assert all(node.domain in ("", "ai.onnx") for node in onnx.load(str(path)).graph.node)


def test_a_manifest_without_fusions_still_loads_with_the_same_hash(tiny_bundle) -> None:
    raw = json.loads((tiny_bundle.path / "manifest.json").read_text())
    assert raw["format_version"] == 3
    raw["format_version"] = 2
    for entry in raw["files"]:
        entry.pop("fusions", None)
    old = Manifest.model_validate_json(json.dumps(raw))
    assert old.file("image").fusions is None
    assert old.content_hash == tiny_bundle.manifest.content_hash


def test_siglip_family_fuses_its_timm_image_tower_and_unmasked_text_tower(family_bundle) -> None:
    made = family_bundle("siglip2")
    manifest = made.bundle.manifest
    image, text = manifest.file("image").fusions, manifest.file("text").fusions
    # The timm ViT's blocks are fused; its attention-pool head (cross-attention) is not.
    assert image.get("MultiHeadAttention", 0) >= 1
    assert text["MultiHeadAttention"] == 2
    attention = _nodes(made.bundle.file_path("text"), "MultiHeadAttention")
    assert {_unidirectional(node) for node in attention} == {0}
    assert all(r.min_cosine >= 0.9999 for r in manifest.parity if r.precision == "fp32")


def test_the_service_serves_the_fused_bundle(client, tiny_bundle, tiny_model) -> None:
    import open_clip

    assert tiny_bundle.manifest.file("text").fusions["MultiHeadAttention"] == LAYERS
    texts = ["a dog", "a photo of a red car parked on a street at night", "x"]
    response = client.post("/v1/embed", json={"texts": texts, "images": [b64(image_bytes(seed=3))]})
    assert response.status_code == 200, response.text
    served = np.array(response.json()["text_embeddings"])
    with torch.no_grad():
        expected = tiny_model.encode_text(open_clip.tokenize(texts), normalize=True).numpy()
    assert agreement(expected, served).min_cosine >= 0.9999
    assert len(response.json()["image_embeddings"]) == 1
