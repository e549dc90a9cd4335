"""Each family with a Hugging Face tokenizer exports to a verified bundle: SigLIP2, xlm-roberta and
NLLB-CLIP-SigLIP (shrunk, random init, tokenizers trained here). fp32 graphs agree with torch to
>= 0.9999 cosine on both towers, int8 within its threshold; the bundle's tokenizer.json gives open_clip's
ids; the manifest records the model's scoring, preprocessing and tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from clipserve.contract.bundle import ModelRepository
from clipserve.contract.tokenizer import HFTextTokenizer, load_tokenizer
from tests.fixtures.families import FAMILIES, siglip2_config

TEXTS = [
    "a photo of a dog",
    "",
    "Ein Foto von einem Hund",
    "一张狗的照片 🐶",
    "A  Diagram_of THE water-cycle!!",
    "word " * 100,
]
EXPECTED = {
    # family: (scoring, text pooling, resize mode)
    "siglip2": ("sigmoid", "last", "squash"),
    "xlm-roberta": ("softmax", "mean", "shortest"),
    "nllb-siglip": ("sigmoid", "cls", "squash"),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_family_exports_verified_with_its_own_tokenizer_and_scoring(family: str, family_bundle) -> None:
    import onnxruntime as ort
    import torch
    from open_clip import get_tokenizer

    made = family_bundle(family)
    manifest = made.bundle.manifest
    scoring, pooling, resize = EXPECTED[family]
    assert manifest.format_version == 3
    assert manifest.scoring == scoring
    if scoring == "sigmoid":
        assert manifest.logit_bias == pytest.approx(float(made.model.logit_bias.detach()))
        assert manifest.scorer.logit_bias == pytest.approx(-10.0)
    else:
        assert manifest.logit_bias is None
    assert manifest.text.pooling == pooling and manifest.text.dynamic_length is False
    assert manifest.image.resize_mode == resize
    if resize == "squash":
        assert manifest.image.mean == (0.5, 0.5, 0.5) and manifest.image.std == (0.5, 0.5, 0.5)
    spec = manifest.tokenizer
    assert spec.kind == "hf" and spec.vocab_file == "tokenizer.json" and spec.padding == "max_length"
    assert manifest.file("tokenizer", None) is not None or any(f.role == "tokenizer" for f in manifest.files)
    by_file = {r.file: r for r in manifest.parity}
    for file in ("image.onnx", "text.onnx"):
        assert by_file[file].passed and by_file[file].min_cosine >= 0.9999, by_file[file]
    for file in ("image.int8.onnx", "text.int8.onnx"):
        assert by_file[file].passed and by_file[file].min_cosine >= 0.99, by_file[file]

    # the bundle's tokenizer, as the service loads it, gives the ids open_clip gives for this model
    served = load_tokenizer(spec, made.bundle.path)
    assert isinstance(served, HFTextTokenizer)
    reference = get_tokenizer(f"local-dir:{_local_dir(made.config)}")
    np.testing.assert_array_equal(served.encode(TEXTS).ids, reference(TEXTS).numpy())

    # end to end: served ids through text.onnx against torch's encode_text on open_clip's ids
    session = ort.InferenceSession(str(made.bundle.file_path("text")), providers=["CPUExecutionProvider"])
    onnx_vectors = session.run(None, {"input_ids": served.encode(TEXTS).ids})[0]
    with torch.inference_mode():
        torch_vectors = made.model.encode_text(reference(TEXTS), normalize=True).numpy()
    cosine = (onnx_vectors * torch_vectors).sum(axis=1) / np.linalg.norm(onnx_vectors, axis=1)
    assert cosine.min() >= 0.9999


def _local_dir(config: Path) -> Path:
    """A local-dir: folder open_clip's get_tokenizer reads (open_clip_config.json + tokenizer files)."""
    folder = config.parent / f"{config.stem}-local-dir"
    if not folder.is_dir():
        folder.mkdir()
        document = json.loads(config.read_text())
        (folder / "open_clip_config.json").write_text(json.dumps(document))
        tokenizer_dir = Path(document["model_cfg"]["text_cfg"]["hf_tokenizer_name"])
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (folder / name).write_bytes((tokenizer_dir / name).read_bytes())
    return folder


def test_tokenizer_of_another_vocabulary_is_refused_naming_both_sizes(family_bundle, tmp_path: Path) -> None:
    from clipserve.export.errors import ExportError
    from clipserve.export.exporter import export_bundle
    from tests.fixtures.local_tokenizers import build_tokenizer

    made = family_bundle("siglip2")
    wrong = build_tokenizer(tmp_path / "wrong", "gemma", vocab_size=900)
    repo = tmp_path / "repo"
    with pytest.raises(ExportError, match=r"has 900 ids but .* vocabulary of 1024"):
        export_bundle(
            made.model, repo, "wrong", source=made.bundle.manifest.source, tokenizer=wrong, progress=False
        )
    assert ModelRepository(repo).versions("wrong") == []


def _hub_named_config(tmp_path: Path) -> Path:
    # the config names the tokenizer by its hub name, as open_clip's own SigLIP2 configs do
    config = tmp_path / "siglip2-hub.json"
    config.write_text(json.dumps(siglip2_config(tmp_path, tokenizer="timm/ViT-B-16-SigLIP2")))
    return config


def test_cli_offline_refuses_an_unreachable_or_mismatched_tokenizer_before_building_the_model(
    tmp_path: Path, capsys
) -> None:
    from clipserve.export.cli import main
    from tests.fixtures.local_tokenizers import build_tokenizer

    repo = tmp_path / "models"
    base = [
        "--config",
        str(_hub_named_config(tmp_path)),
        "--name",
        "sig",
        "--models-dir",
        str(repo),
        "--quiet",
    ]
    assert main(base) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert (
        "cannot load the Hugging Face tokenizer 'timm/ViT-B-16-SigLIP2'" in error
        and "--tokenizer DIR" in error
    )

    small = build_tokenizer(tmp_path / "small", "gemma", vocab_size=700)
    assert main([*base, "--tokenizer", str(small)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.endswith(
        "has 700 ids but siglip2-hub's text tower has a vocabulary of 1024: it is not this model's tokenizer"
    )
    assert main([*base, "--tokenizer", str(tmp_path / "nowhere")]) == 2
    assert "tokenizer folder" in capsys.readouterr().err
    assert ModelRepository(repo).versions("sig") == []


@pytest.mark.slow
def test_cli_exports_with_the_tokenizer_from_a_folder(tmp_path: Path, capsys) -> None:
    from clipserve.export.cli import main
    from tests.fixtures.local_tokenizers import build_tokenizer

    repo = tmp_path / "models"
    folder = build_tokenizer(tmp_path / "local-gemma", "gemma", vocab_size=1024)
    args = ["--config", str(_hub_named_config(tmp_path)), "--name", "sig", "--models-dir", str(repo)]
    assert main([*args, "--tokenizer", str(folder), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "scoring        sigmoid" in out and "Hugging Face tokenizer.json (1024 ids" in out
    bundle = ModelRepository(repo).load("sig")
    assert bundle.manifest.source.tokenizer == str(folder)
    assert bundle.manifest.tokenizer.clean == "canonicalize"


def _open_clip_text_family(kind: str, folder: Path) -> dict:
    """Shrunk CLIPA (BERT WordPiece, strip_sep_token, last-token pooling, no causal mask) and
    worldwide (an XLM-V-style tokenizer, causal mask, pooling at the eos id) configs."""
    from tests.fixtures.local_tokenizers import build_tokenizer

    vision = {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8}
    if kind == "clipa":
        tokenizer = build_tokenizer(folder / "bert", "bert", vocab_size=VOCAB_SMALL)
        return {
            "embed_dim": 32,
            "vision_cfg": {**vision, "no_ln_pre": True, "pool_type": "avg", "final_ln_after_pool": True},
            "text_cfg": {
                "context_length": 32,
                "vocab_size": VOCAB_SMALL,
                "hf_tokenizer_name": str(tokenizer),
                "tokenizer_kwargs": {"strip_sep_token": True},
                "width": 64,
                "heads": 2,
                "layers": 2,
                "pool_type": "last",
                "no_causal_mask": True,
            },
        }
    tokenizer = build_tokenizer(folder / "xlm-v", "xlm-roberta", vocab_size=VOCAB_SMALL)
    return {
        "embed_dim": 32,
        "quick_gelu": True,
        "vision_cfg": vision,
        "text_cfg": {
            "hf_tokenizer_name": str(tokenizer),
            "pool_type": "eos",
            "eos_id": 2,
            "context_length": 77,
            "vocab_size": VOCAB_SMALL,
            "width": 64,
            "heads": 2,
            "layers": 2,
        },
    }


VOCAB_SMALL = 1000


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "pooling"), [("clipa", "last"), ("worldwide", "eos")])
def test_clipa_and_worldwide_families_export_verified(kind: str, pooling: str, tmp_path: Path) -> None:
    import torch

    from clipserve.export.exporter import export_bundle
    from clipserve.export.sources import load_model

    torch.set_num_threads(2)
    config = tmp_path / f"{kind}.json"
    config.write_text(json.dumps(_open_clip_text_family(kind, tmp_path)))
    loaded = load_model(config=config)
    manifest = export_bundle(
        loaded.model, tmp_path / "repo", kind, source=loaded.source, progress=False
    ).manifest
    assert (
        manifest.tokenizer.kind == "hf" and manifest.text.pooling == pooling and manifest.scoring == "softmax"
    )
    assert (manifest.tokenizer.strip_sep_token_id is not None) == (kind == "clipa")
    assert all(r.passed and r.min_cosine >= 0.9999 for r in manifest.parity)
