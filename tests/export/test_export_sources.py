"""Loading the model to export: names, tags, local checkpoints in their three forms, JSON configs."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from clipserve.export.errors import SourceError
from clipserve.export.exporter import inference_copy
from clipserve.export.sources import load_model, read_state_dict


def _assert_same_weights(model: torch.nn.Module, expected: torch.nn.Module) -> None:
    got, want = model.state_dict(), expected.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[key], want[key]) for key in want)


@pytest.fixture
def config_file(tmp_path: Path, tiny_clip_config: dict[str, Any]) -> Path:
    path = tmp_path / "tiny-arch.json"
    path.write_text(json.dumps(tiny_clip_config))
    return path


@pytest.mark.parametrize("form", ["bare", "wrapped", "ddp"])
def test_local_checkpoint_in_each_form_loads_the_same_weights(
    form: str, tmp_path: Path, tiny_model, config_file: Path
) -> None:
    state = tiny_model.state_dict()
    payload = {
        "bare": state,
        "wrapped": {"state_dict": state, "epoch": 3},
        "ddp": {f"module.{key}": value for key, value in state.items()},
    }[form]
    checkpoint = tmp_path / f"{form}.pt"
    torch.save(payload, checkpoint)
    loaded = load_model(config=config_file, checkpoint=checkpoint)
    _assert_same_weights(loaded.model, tiny_model)
    assert loaded.source.architecture == "tiny-arch"
    assert loaded.source.checkpoint_sha256 is not None and len(loaded.source.checkpoint_sha256) == 64
    assert loaded.source.pretrained is None


def test_pretrained_given_as_a_file_path_is_a_local_checkpoint(
    tmp_path: Path, tiny_model, config_file
) -> None:
    checkpoint = tmp_path / "weights.pt"
    torch.save(tiny_model.state_dict(), checkpoint)
    loaded = load_model(config=config_file, pretrained=str(checkpoint))
    _assert_same_weights(loaded.model, tiny_model)
    assert loaded.source.pretrained is None and loaded.source.checkpoint_sha256 is not None


def test_open_clip_config_file_style_carries_its_preprocessing(tmp_path: Path, tiny_clip_config) -> None:
    path = tmp_path / "open_clip_config.json"
    preprocess = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bilinear"}
    path.write_text(json.dumps({"model_cfg": tiny_clip_config, "preprocess_cfg": preprocess}))
    model = load_model(name="my-arch", config=path).model
    assert tuple(model.visual.preprocess_cfg["mean"]) == (0.5, 0.5, 0.5)
    assert model.visual.preprocess_cfg["interpolation"] == "bilinear"
    assert tuple(model.visual.preprocess_cfg["size"]) == (32, 32)


def test_checkpoint_of_another_architecture_names_the_keys(
    tmp_path: Path, tiny_model, tiny_clip_config
) -> None:
    other = copy.deepcopy(tiny_clip_config)
    other["text_cfg"]["layers"] = 3
    other["embed_dim"] = 48
    path = tmp_path / "other.json"
    path.write_text(json.dumps(other))
    checkpoint = tmp_path / "tiny.pt"
    torch.save(tiny_model.state_dict(), checkpoint)
    with pytest.raises(SourceError) as caught:
        load_model(config=path, checkpoint=checkpoint)
    message = str(caught.value)
    assert "does not fit architecture other" in message
    assert "missing keys: transformer.resblocks.2." in message
    assert "text_projection (64, 32) vs (64, 48)" in message


def test_missing_and_unreadable_checkpoints(tmp_path: Path, config_file: Path) -> None:
    with pytest.raises(SourceError, match=r"checkpoint .*nowhere\.pt does not exist"):
        load_model(config=config_file, checkpoint=tmp_path / "nowhere.pt")
    with pytest.raises(SourceError, match=r"checkpoint weights\.bin does not exist"):
        load_model("ViT-B-32", pretrained="weights.bin")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(SourceError, match=r"cannot read checkpoint .*garbage\.pt"):
        read_state_dict(garbage)
    not_weights = tmp_path / "list.pt"
    torch.save([1, 2, 3], not_weights)
    with pytest.raises(SourceError, match="holds no state_dict"):
        read_state_dict(not_weights)


def test_unknown_model_name_suggests_close_matches() -> None:
    with pytest.raises(SourceError, match=r"unknown open_clip model 'ViT-B-23'; did you mean ViT-B-32"):
        load_model("ViT-B-23", "none")
    with pytest.raises(SourceError, match="did you mean MobileCLIP2-S0"):
        load_model("mobileclip2-s0", "none")


def test_unknown_pretrained_tag_lists_the_known_ones() -> None:
    with pytest.raises(SourceError, match=r"ViT-B-32 has no pretrained tag 'nope' \(tags: openai, laion400m"):
        load_model("ViT-B-32", "nope")


def test_pretrained_tag_with_offline_hub_simulated_says_how_to_pass_a_local_file(monkeypatch) -> None:
    # The hub is unreachable here anyway; offline mode makes the failure immediate instead of retried.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SourceError) as caught:
        load_model("ViT-B-32", "laion2b_s34b_b79k")
    message = str(caught.value)
    assert "offline" in message
    assert "--model ViT-B-32 --pretrained laion2b_s34b_b79k --checkpoint PATH" in message


def test_architectures_a_bundle_cannot_hold_are_refused_in_one_line() -> None:
    with pytest.raises(SourceError, match=r"coca_ViT-B-32 is a captioning model \(CoCa\)"):
        load_model("coca_ViT-B-32", "none")


def test_hugging_face_text_model_offline_names_the_missing_config() -> None:
    # the hub cannot be reached here: xlm-roberta-base's config.json is what is missing
    with pytest.raises(SourceError, match=r"Hugging Face text model 'xlm-roberta-base': its config.json"):
        load_model("xlm-roberta-base-ViT-B-32", "none")


def test_random_init_takes_the_preprocessing_its_tags_share() -> None:
    from clipserve.export.sources import architecture_preprocess

    siglip = architecture_preprocess("ViT-B-16-SigLIP2")
    assert siglip["resize_mode"] == "squash" and tuple(siglip["mean"]) == (0.5, 0.5, 0.5)
    assert architecture_preprocess("ViT-B-32")["resize_mode"] == "shortest"


@pytest.fixture(scope="module")
def mobileclip2_s0() -> torch.nn.Module:
    return load_model("MobileCLIP2-S0", "none").model


def test_tag_with_local_file_uses_the_tags_preprocessing(tmp_path: Path, mobileclip2_s0) -> None:
    model = mobileclip2_s0
    checkpoint = tmp_path / "mobileclip2_s0.pt"
    torch.save(model.state_dict(), checkpoint)
    loaded = load_model("MobileCLIP2-S0", "dfndr2b", checkpoint=checkpoint)
    assert tuple(loaded.model.visual.preprocess_cfg["mean"]) == (0.0, 0.0, 0.0)
    assert loaded.source.pretrained == "dfndr2b"
    _assert_same_weights(loaded.model, model)


def test_mobileclip_is_reparameterized_for_export_with_the_same_outputs(mobileclip2_s0) -> None:
    model = mobileclip2_s0
    assert any(hasattr(m, "reparameterize") for m in model.modules())
    deployed = inference_copy(model)
    assert deployed is not model
    assert sum(p.numel() for p in deployed.parameters()) < sum(p.numel() for p in model.parameters())
    images = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.encode_image(images)
        actual = deployed.encode_image(images)
    assert torch.nn.functional.cosine_similarity(expected, actual).min() > 0.9999


@pytest.mark.parametrize("junk", [b"\x00\x01 random bytes", b"PK\x03\x04 half a zip"])
def test_a_junk_checkpoint_is_one_line_that_says_what_to_do(tmp_path, junk: bytes) -> None:
    from clipserve.export.sources import SourceError, read_state_dict

    path = tmp_path / "junk.pt"
    path.write_bytes(junk * 100)
    with pytest.raises(SourceError) as refused:
        read_state_dict(path)
    message = str(refused.value)
    assert "\n" not in message and "torch.save(model.state_dict(), path)" in message
    assert message.startswith(f"cannot read checkpoint {path}: it is not a PyTorch")
