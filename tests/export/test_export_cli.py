"""`clip-export` end to end, in process: real model loading, real export, real repository."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from clipserve.contract.bundle import ModelRepository, sha256_file
from clipserve.contract.tokenizer import ClipTokenizer
from clipserve.export.cli import main
from clipserve.export.verify import agreement, make_session


@pytest.fixture
def arch_file(tmp_path: Path, tiny_clip_config: dict[str, Any]) -> Path:
    path = tmp_path / "student-arch.json"
    path.write_text(json.dumps(tiny_clip_config))
    return path


def _published_nothing(repo: Path, name: str) -> bool:
    model_dir = repo / name
    return not model_dir.exists() or all(p.name.startswith(".publish") for p in model_dir.iterdir())


def test_local_checkpoint_is_exported_verified_and_summarized(
    tmp_path: Path, arch_file: Path, tiny_model, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = tmp_path / "student.pt"
    state = {f"module.{key}": value for key, value in tiny_model.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 10}, checkpoint)
    repo = tmp_path / "models"
    code = main(
        [
            "--config",
            str(arch_file),
            "--checkpoint",
            str(checkpoint),
            "--name",
            "student",
            "--models-dir",
            str(repo),
            "--torch-threads",
            "2",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "exporting image tower" in err and "checking fp32 parity" in err
    assert f"published student@1 at {repo / 'student' / '1'}" in out
    assert "text.onnx" in out and "min cos 1.0000" in out and "dynamic length" in out
    bundle = ModelRepository(repo).load("student")
    assert bundle.manifest.source.checkpoint_sha256 == sha256_file(checkpoint)
    assert bundle.manifest.source.architecture == "student-arch"
    ids = ClipTokenizer.from_spec(bundle.manifest.tokenizer, bundle.path).encode(
        ["a cat", "two dogs on a sofa"]
    )
    session = make_session(bundle.file_path("text"), threads=1)
    actual = session.run(None, {"input_ids": ids.trimmed()})[0]
    with torch.no_grad():
        expected = F.normalize(tiny_model.encode_text(torch.from_numpy(ids.ids)), dim=-1).numpy()
    assert agreement(expected, actual).min_cosine >= 0.9999


def test_checkpoint_of_another_architecture_is_refused_naming_keys(
    tmp_path: Path, tiny_clip_config, tiny_model, capsys: pytest.CaptureFixture[str]
) -> None:
    wider = json.loads(json.dumps(tiny_clip_config))
    wider["vision_cfg"]["width"] = 128
    arch = tmp_path / "wider.json"
    arch.write_text(json.dumps(wider))
    checkpoint = tmp_path / "tiny.pt"
    torch.save(tiny_model.state_dict(), checkpoint)
    repo = tmp_path / "models"
    code = main(
        ["--config", str(arch), "--checkpoint", str(checkpoint), "--name", "wider", "--models-dir", str(repo)]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "does not fit architecture wider" in err
    assert "visual.conv1.weight (64, 3, 8, 8) vs (128, 3, 8, 8)" in err
    assert "Traceback" not in err
    assert _published_nothing(repo, "wider")


def test_unknown_model_suggests_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = tmp_path / "models"
    code = main(["--model", "ViT-B-23", "--pretrained", "none", "--models-dir", str(repo)])
    err = capsys.readouterr().err
    assert code == 2
    assert "unknown open_clip model 'ViT-B-23'; did you mean ViT-B-32" in err
    assert _published_nothing(repo, "ViT-B-23")


def test_offline_pretrained_tag_simulated_tells_how_to_pass_a_local_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The hub is unreachable here anyway; offline mode makes the failure immediate instead of retried.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    code = main(["--model", "ViT-B-32", "--pretrained", "laion2b_s34b_b79k", "--models-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert "offline" in err and "--checkpoint PATH" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "ViT-B-32"], "say which weights: --pretrained TAG, --pretrained none"),
        ([], "say which model: --model NAME"),
        (["--config", "arch.json"], "--name is required with --config"),
        (
            ["--model", "ViT-B-32", "--pretrained", "none", "--name", "bad/name"],
            "invalid model name 'bad/name'",
        ),
        (
            ["--model", "ViT-B-32", "--pretrained", "none", "--min-cosine", "1.5"],
            "--min-cosine: must be in (0, 1] (got '1.5')",
        ),
        (["--config", "missing.json", "--name", "x"], "model config missing.json does not exist"),
    ],
)
def test_bad_arguments_get_a_clear_message(
    argv: list[str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    code = main([*argv, "--models-dir", str(tmp_path / "models")])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert "Traceback" not in err


def test_existing_version_is_refused_before_loading(
    tiny_repo: Path, arch_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        ["--config", str(arch_file), "--name", "tiny", "--version", "1", "--models-dir", str(tiny_repo)]
    )
    assert code == 2
    assert "tiny version 1 already exists" in capsys.readouterr().err
    assert ModelRepository(tiny_repo).versions("tiny") == [1]


def test_unwritable_repository_is_refused(tmp_path: Path, arch_file: Path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = main(["--config", str(arch_file), "--name", "x", "--models-dir", str(blocker / "models")])
    assert code == 2
    assert "is not writable" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where no GPU is present")
def test_tensorrt_without_gpu_is_refused_before_any_work(tmp_path: Path, arch_file: Path, capsys) -> None:
    code = main(["--config", str(arch_file), "--name", "x", "--tensorrt", "--models-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert "TensorRT engines" in err
    assert not (tmp_path / "x").exists()


def test_environment_variables_set_flags(
    tmp_path: Path, arch_file: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setenv("CLIP_EXPORT_MIN_COSINE", "2")
    code = main(["--config", str(arch_file), "--name", "x", "--models-dir", str(tmp_path)])
    assert code == 2
    assert "CLIP_EXPORT_MIN_COSINE: must be in (0, 1] (got '2')" in capsys.readouterr().err


def test_list_models(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--list-models"]) == 0
    names = capsys.readouterr().out.split()
    assert "ViT-B-32" in names and "MobileCLIP2-S0" in names


def test_the_tensorrt_timing_cache_is_a_setting_passed_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--timing-cache-dir` (CLIP_EXPORT_TIMING_CACHE_DIR) names the folder; without it, the user cache
    folder. No other variable of ours moves it."""
    from clipserve.contract.cli_settings import load_settings
    from clipserve.export.cli import ExportSettings
    from clipserve.export.tensorrt import timing_cache_path

    monkeypatch.setenv("CLIP_EXPORT_TIMING_CACHE_DIR", str(tmp_path / "env"))
    assert load_settings(ExportSettings, [], "clip-export").timing_cache_dir == tmp_path / "env"
    flagged = load_settings(ExportSettings, ["--timing-cache-dir", str(tmp_path / "flag")], "clip-export")
    assert flagged.timing_cache_dir == tmp_path / "flag"
    path = timing_cache_path("NVIDIA H200", "10.16.1.11", flagged.timing_cache_dir)
    assert path == tmp_path / "flag" / "timing-nvidia-h200-trt10.16.1.11.cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("CLIPSERVE_TENSORRT_CACHE", str(tmp_path / "old"))
    default = timing_cache_path("NVIDIA H200", "10.16.1.11")
    assert default.parent == tmp_path / "xdg" / "clipserve" / "tensorrt"
