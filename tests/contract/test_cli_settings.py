"""One configuration convention for clip-serve, clip-export, clip-distill and clip-index: flag = settings field =
environment variable, `--help` listing every option with its default and variable, old spellings
accepted with a one-line warning, and bad settings or an unusable repository told in one line."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from clipserve.contract.cli_settings import CliSettings, SettingsError, load_settings
from clipserve.export.cli import ExportSettings
from clipserve.export.cli import main as export_main
from clipserve.index.cli import main as index_main
from clipserve.index.settings import IndexSettings
from clipserve.service.server.cli import main as serve_main
from clipserve.service.server.cli import settings_from
from clipserve.service.settings import Settings
from clipserve.training.cli import main as distill_main
from clipserve.training.settings import EvalSettings, TargetsSettings, TrainSettings

ROOT = Path(__file__).resolve().parents[2]
COMMANDS: list[tuple[type[CliSettings], object, list[str]]] = [
    (Settings, serve_main, []),
    (ExportSettings, export_main, []),
    (TrainSettings, distill_main, []),
    (TrainSettings, distill_main, ["train"]),
    (EvalSettings, distill_main, ["eval"]),
    (TargetsSettings, distill_main, ["targets"]),
    (IndexSettings, index_main, []),
]


def help_text(main, command: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exited:
        main([*command, "--help"])
    assert exited.value.code == 0
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize(("settings", "main", "command"), COMMANDS)
def test_help_lists_every_option_with_its_default_and_variable(
    settings: type[CliSettings], main, command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    text = help_text(main, command, capsys)
    for name in settings.model_fields:
        flag, variable = settings.flag(name), settings.env_name(name)
        assert re.search(rf"{re.escape(flag)}[ ,]", text) and f"env {variable}]" in text, name
        assert variable == variable.upper() and variable.endswith(name.upper())
    assert text.count("[default: ") + text.count("[required; ") == len(settings.model_fields)


def test_distill_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    text = help_text(distill_main, [], capsys)
    for command in ("train", "eval", "targets"):
        assert f" {command} " in text
    assert "clip-distill COMMAND --help" in text


def test_every_cli_names_the_model_repository_models_dir() -> None:
    for settings in (Settings, ExportSettings, TrainSettings):
        assert "models_dir" in settings.model_fields
        assert "threads" not in settings.model_fields
    assert "intra_op_threads" in Settings.model_fields
    assert "torch_threads" in ExportSettings.model_fields and "torch_threads" in TrainSettings.model_fields
    assert Settings.env_name("models_dir") == "CLIPSERVE_MODELS_DIR"
    assert ExportSettings.env_name("models_dir") == "CLIP_EXPORT_MODELS_DIR"
    assert TrainSettings.env_name("models_dir") == "CLIP_DISTILL_MODELS_DIR"


# Names that several clip-distill commands share: one variable CLIP_DISTILL_<NAME> for all of them, so
# each means the same in every command that has it (read and checked, one by one).
SHARED_DISTILL_OPTIONS = {
    "teacher",
    "teacher_pretrained",
    "data",
    "eval_data",
    "templates",
    "class_names",
    "on_bad_image",
    "device",
    "seed",
    "augment",
    "batch_size",
}


def test_one_prefix_per_tool() -> None:
    prefixes = {
        "CLIPSERVE_": [Settings],
        "CLIP_EXPORT_": [ExportSettings],
        "CLIP_INDEX_": [IndexSettings],
        "CLIP_DISTILL_": [TrainSettings, EvalSettings, TargetsSettings],
    }
    for prefix, classes in prefixes.items():
        for cls in classes:
            assert cls.env_name("") == prefix, cls
    assert TrainSettings.env_name("batch_size") == "CLIP_DISTILL_BATCH_SIZE"


def test_a_name_the_distill_commands_share_means_the_same_in_each() -> None:
    """A name two commands share is one variable for both: where the meanings differ, the names do."""
    commands: dict[str, list[str]] = {}
    for cls in (TrainSettings, EvalSettings, TargetsSettings):
        for name in cls.model_fields:
            commands.setdefault(name, []).append(cls.__name__)
    shared = {name for name, where in commands.items() if len(where) > 1}
    assert shared <= SHARED_DISTILL_OPTIONS, (
        f"{sorted(shared - SHARED_DISTILL_OPTIONS)} would be one CLIP_DISTILL_ variable for "
        f"{[commands[name] for name in sorted(shared - SHARED_DISTILL_OPTIONS)]}: name it for what it "
        "is in each, or add it to SHARED_DISTILL_OPTIONS once it means the same everywhere"
    )
    for name in ("out", "targets_dir", "report_dir"):
        assert len(commands[name]) == 1, name


def test_host_and_port_are_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIPSERVE_PORT", "8123")
    settings = settings_from(["--host", "0.0.0.0"])
    assert (settings.host, settings.port) == ("0.0.0.0", 8123)
    assert settings_from(["--port", "9000"]).port == 9000


def test_defaults_then_file_then_environment_then_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    options = tmp_path / "run.yaml"
    options.write_text("student: s.json\ndata: synthetic:shapes\nsteps: 5\nlr: 0.1\nbatch-size: 8\n")
    monkeypatch.setenv("CLIP_DISTILL_STEPS", "6")
    monkeypatch.setenv("CLIP_DISTILL_LR", "0.2")
    settings = load_settings(TrainSettings, ["--config", str(options), "--steps", "7"], "clip-distill")
    assert settings.steps == 7  # flag over environment and file
    assert settings.lr == 0.2  # environment over file
    assert settings.batch_size == 8  # file over default
    assert settings.weight_decay == TrainSettings.model_fields["weight_decay"].default
    json_options = tmp_path / "run.json"
    json_options.write_text('{"student": "s.json", "data": "d.csv", "teacher": ["a", "b"], "no_such": 1}')
    with pytest.raises(SettingsError, match=r"unknown option\(s\) in .*run.json: \['no_such'\]"):
        load_settings(TrainSettings, ["--config", str(json_options)], "clip-distill")


@pytest.mark.parametrize(
    ("cls", "prog", "argv"),
    [
        (None, "clip-serve", ["--serve", "tiny"]),
        (None, "clip-serve", ["--threads", "3"]),
        (ExportSettings, "clip-export", ["--repo", "models"]),
        (TrainSettings, "clip-distill", ["--publish", "models"]),
        (TrainSettings, "clip-distill", ["--no-eval"]),
    ],
)
def test_pre_release_spellings_are_unknown_flags_in_one_line(cls, prog: str, argv: list[str]) -> None:
    """0.1.0 had no users to migrate: the old spellings are gone, and saying one is a plain mistake."""
    with pytest.raises(SettingsError, match=rf"unrecognized arguments: {argv[0]}.*see {prog} --help"):
        if cls is None:
            settings_from(argv)
        else:
            load_settings(cls, argv, prog)


@pytest.mark.parametrize(
    ("main", "argv", "env", "message"),
    [
        (serve_main, ["--port", "eighty"], {}, "--port: Input should be a valid integer"),
        (serve_main, [], {"CLIPSERVE_PROVIDERS": "gpu"}, "CLIPSERVE_PROVIDERS: Input should be 'cpu'"),
        (serve_main, ["--log-level", "loud"], {}, "--log-level: Input should be 'DEBUG'"),
        (serve_main, ["--model-dir", "x"], {}, "unrecognized arguments: --model-dir x"),
        (export_main, ["--version", "0"], {}, "--version: Input should be greater than or equal to 1"),
        (distill_main, ["--student", "s", "--data", "d", "--steps", "0"], {}, "--steps: Input should be"),
        (distill_main, ["eval", "--eval-data", "d"], {}, "--model is required"),
        (distill_main, ["targets", "--data", "d", "--targets-dir", "o"], {}, "--teacher is required"),
        (distill_main, ["--config", "nowhere.yaml"], {}, "options file nowhere.yaml does not exist"),
        # one prefix for every command: the training run's folder is not where targets or a report go
        (
            distill_main,
            ["targets", "--teacher", "t", "--data", "d"],
            {"CLIP_DISTILL_OUT": "o"},
            "--targets-dir is",
        ),
        (distill_main, ["eval", "--model", "m"], {"CLIP_DISTILL_DATA": "d"}, "--eval-data is required"),
    ],
)
def test_a_bad_setting_is_one_line_and_exit_2(
    main, argv: list[str], env: dict[str, str], message: str, monkeypatch, capsys, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err


def clip_serve(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    clean = {key: value for key, value in os.environ.items() if not key.startswith("CLIPSERVE_")}
    clean |= {
        "CLIPSERVE_REDIS_URL": "none",
        "CLIPSERVE_INTRA_OP_THREADS": "1",
        "CLIPSERVE_RELOAD_POLL_S": "0",
    }
    return subprocess.run(
        [sys.executable, "-m", "clipserve.service.server.cli", "--port", "0", *argv],
        env=clean | env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def test_clip_serve_names_a_missing_repository_in_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "models"
    for env, argv in (({"CLIPSERVE_MODELS_DIR": str(missing)}, ()), ({}, ("--models-dir", str(missing)))):
        result = clip_serve(env, *argv)
        errors = result.stderr.splitlines()
        assert result.returncode == 1 and len(errors) == 1, result.stderr
        assert f"model repository {missing} does not exist" in errors[0]


def test_clip_serve_refuses_models_that_are_not_there(tiny_repo: Path) -> None:
    result = clip_serve({"CLIPSERVE_MODELS": "absent,gone@2"}, "--models-dir", str(tiny_repo))
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1
    assert (
        "none of the models to serve (absent, gone@2)" in result.stderr
        and "models there: tiny" in result.stderr
    )
    result = clip_serve({}, "--models-dir", str(tiny_repo), "--default-model", "absent")
    assert result.returncode == 1 and "default model 'absent' is not among" in result.stderr


def test_clip_serve_with_only_a_corrupt_bundle_says_so_without_a_traceback(
    tiny_repo: Path, tmp_path: Path
) -> None:
    repo = tmp_path / "models"
    shutil.copytree(tiny_repo, repo, ignore=shutil.ignore_patterns(".publish.lock"))
    image = repo / "tiny" / "1" / "image.onnx"
    data = bytearray(image.read_bytes())
    data[len(data) // 2] ^= 0xFF
    image.write_bytes(bytes(data))
    result = clip_serve({}, "--models-dir", str(repo))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("clip-serve: error: no model in") and "image.onnx is corrupted" in last
