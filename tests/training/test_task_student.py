"""Task students (`clip-distill task`, DHO): both heads learn their targets and the mix beats either
head alone; the task bundle's ONNX probabilities equal the torch model's; the command end to end."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipserve.contract.bundle import TASK_OUTPUTS, BundleError, ModelRepository
from clipserve.training.models import load_clip
from clipserve.training.task import (
    DhoConfig,
    TaskData,
    TaskStudent,
    accuracy,
    head_probabilities,
    image_transform,
    load_task_student,
    main,
    mix,
    to_pixels,
    train_dho,
)
from tests.fixtures.training import TASK_LABELS, task_images

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def fixed_teacher(labels: list[int]) -> torch.Tensor:
    """A fixed teacher that knows red from green (0.85 on the right one) but cannot tell blue from
    yellow (half each): what the labeled images must teach."""
    targets = torch.zeros(len(labels), len(TASK_LABELS))
    for row, label in enumerate(labels):
        if label < 2:
            targets[row] = 0.05
            targets[row, label] = 0.85
        else:
            targets[row, 2:] = 0.5
    return targets


def test_dho_moves_both_heads_to_their_targets_and_the_mix_beats_either_head(
    tiny_student_config: Path,
) -> None:
    clip = load_clip(str(tiny_student_config), seed=0)
    transform = image_transform(clip.preprocess_cfg)
    unlabeled, unlabeled_labels = task_images(seed=11, count=96)
    # labels only where the teacher is blind (blue, yellow); the held-out and test splits hold all four
    labeled, labels = task_images(seed=12, count=24)
    labeled, labels = zip(*[(i, y) for i, y in zip(labeled, labels, strict=True) if y >= 2], strict=True)
    held_out, held_out_labels = task_images(seed=13, count=32)
    test, test_labels = task_images(seed=14, count=96)
    data = TaskData(
        unlabeled=to_pixels(transform, unlabeled),
        unlabeled_targets=fixed_teacher(unlabeled_labels),
        labeled=to_pixels(transform, labeled),
        labels=torch.tensor(labels),
        labeled_targets=fixed_teacher(list(labels)),
        held_out=to_pixels(transform, held_out),
        held_out_labels=torch.tensor(held_out_labels),
    )
    student = TaskStudent(clip.model.visual, clip.embed_dim, len(TASK_LABELS))

    def distances() -> tuple[float, float]:
        _, kd = head_probabilities(student, data.unlabeled)
        ce, _ = head_probabilities(student, data.labeled)
        kl = F.kl_div(kd.log(), data.unlabeled_targets, reduction="batchmean")
        return float(kl), float(F.nll_loss(ce.log(), data.labels))

    kl_before, nll_before = distances()
    result = train_dho(
        student, data, DhoConfig(steps=80, batch_size=32, labeled_batch_size=8, lr=1e-2, progress=False)
    )
    kl_after, nll_after = distances()
    # the KD head toward the teacher's distribution, the CE head toward the labels
    assert kl_after < 0.5 * kl_before, (kl_before, kl_after)
    assert nll_after < 0.6 * nll_before, (nll_before, nll_after)

    assert result.mix_weight_from == "held-out" and 0 < result.mix_weight < 1
    assert float(student.mix_weight) == pytest.approx(result.mix_weight)
    ce, kd = head_probabilities(student, to_pixels(transform, test))
    truth = torch.tensor(test_labels)
    top1 = {
        "ce": accuracy(ce, truth),
        "kd": accuracy(kd, truth),
        "mix": accuracy(mix(ce, kd, result.mix_weight), truth),
    }
    # each head alone is right on about half the labels; the mix on nearly all of them
    assert top1["mix"] > max(top1["ce"], top1["kd"]) + 0.1, top1
    # the curves: both heads' losses every step, both heads and the mix on the held-out images
    evals = [r["eval"] for r in result.records if "eval" in r]
    assert len([r for r in result.records if "parts" in r]) == 80 and len(evals) == 10
    assert {"held-out ce", "held-out kd", "held-out mix"} <= set(evals[-1])


def test_without_labels_the_mix_is_kd_alone(tiny_student_config: Path) -> None:
    clip = load_clip(str(tiny_student_config), seed=0)
    images, labels = task_images(seed=11, count=32)
    data = TaskData(
        unlabeled=to_pixels(image_transform(clip.preprocess_cfg), images),
        unlabeled_targets=fixed_teacher(labels),
    )
    student = TaskStudent(clip.model.visual, clip.embed_dim, len(TASK_LABELS))
    result = train_dho(student, data, DhoConfig(steps=3, batch_size=8, progress=False))
    assert (result.mix_weight, result.mix_weight_from, result.held_out_accuracy) == (0.0, "fixed", {})
    probabilities, _, kd = student(data.unlabeled[:4])
    assert torch.equal(probabilities, kd)


def test_the_command_writes_curves_and_publishes_a_task_bundle(
    task_run: Path, tiny_teacher_run: Path
) -> None:
    run = task_run / "run"
    assert (run / "curves.png").stat().st_size > 1000
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "parts" in r] == list(range(1, 13))
    assert {"ce", "kd"} == set(records[0]["parts"])
    summary = json.loads((run / "task.json").read_text())

    bundle = ModelRepository(task_run / "models").load("colours")
    manifest = bundle.manifest
    task = manifest.task
    assert task is not None and manifest.format_version == 3
    assert task.labels == list(TASK_LABELS) and task.templates and task.outputs == list(TASK_OUTPUTS)
    assert task.teacher == str(tiny_teacher_run) and task.teacher_source is not None
    assert task.mix_weight_from == "held-out" and set(task.held_out_accuracy) == {
        "ce",
        "kd",
        "mix",
        "teacher",
    }
    assert (
        summary["task"] == task.model_dump(mode="json") and manifest.source.training_run == summary["run_id"]
    )
    assert manifest.tokenizer is None and manifest.text is None
    assert {(f.role, f.precision) for f in manifest.files} == {("image", "fp32"), ("image", "int8")}
    assert [(p.precision, p.passed) for p in manifest.parity] == [("fp32", True), ("int8", True)]


def test_the_task_bundle_answers_the_torch_models_probabilities(
    task_run: Path, tiny_task_folders: Path
) -> None:
    from clipserve.export.task_bundle import onnx_task_outputs, task_outputs
    from clipserve.export.verify import make_session

    bundle = ModelRepository(task_run / "models").load("colours")
    student, labels = load_task_student(task_run / "run" / "final")
    assert labels == list(TASK_LABELS)
    assert float(student.mix_weight) == pytest.approx(bundle.manifest.task.mix_weight)
    clip = load_clip(str(task_run / "run" / "final" / "student_config.json"))
    images = sorted((tiny_task_folders / "labeled").rglob("*.png"))[:6]
    from PIL import Image

    pixels = to_pixels(
        image_transform(clip.preprocess_cfg), [Image.open(p).convert("RGB") for p in images]
    ).numpy()
    expected = task_outputs(student, pixels)
    actual = onnx_task_outputs(make_session(bundle.file_path("image")), pixels)
    assert np.abs(actual - expected).max() < 1e-5
    mixed, ce, kd = np.split(actual, 3, axis=1)
    np.testing.assert_allclose(mixed.sum(axis=1), 1.0, atol=1e-5)
    weight = bundle.manifest.task.mix_weight
    np.testing.assert_allclose(mixed, weight * ce + (1 - weight) * kd, atol=1e-6)
    int8 = onnx_task_outputs(make_session(bundle.file_path("image", "int8")), pixels)
    assert np.abs(int8 - expected).max() < 0.05


def test_a_service_refuses_a_task_bundle_by_name(task_run: Path) -> None:
    from clipserve.service.inference.loading import load_version
    from clipserve.service.settings import Settings

    with pytest.raises(BundleError, match=r"colours@1 is a task model .* 4 labels"):
        load_version(ModelRepository(task_run / "models"), "colours", None, Settings())


def test_mistakes_are_one_line_and_status_2(
    tiny_task_folders: Path, tiny_student_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("red\ngreen\n")
    argv = [
        "--teacher",
        "ViT-S-32",
        "--labels",
        str(labels),
        "--unlabeled-data",
        str(tiny_task_folders / "unlabeled"),
    ]
    argv += ["--labeled-data", str(tiny_task_folders / "labeled"), "--student", str(tiny_student_config)]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("clip-distill task: error: --labeled-data")
        and "blue, yellow" in err
        and "\n" not in err
    )
    assert main(["--labels", str(labels)]) == 2
    assert "required" in capsys.readouterr().err


def test_help_lists_every_option_with_its_default_and_variable(capsys: pytest.CaptureFixture[str]) -> None:
    from clipserve.training.cli import main as clip_distill
    from clipserve.training.task import TaskSettings

    with pytest.raises(SystemExit) as exited:
        clip_distill(["task", "--help"])
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for name in TaskSettings.model_fields:
        assert re.search(rf"{re.escape(TaskSettings.flag(name))}[ ,]", text), name
        assert f"env {TaskSettings.env_name(name)}]" in text, name
    assert text.count("[default: ") + text.count("[required; ") == len(TaskSettings.model_fields)


def test_a_bundle_teacher_and_labels_from_a_csv(
    tiny_repo: Path, tiny_task_folders: Path, tiny_student_config: Path, tmp_path: Path
) -> None:
    from clipserve.training.task import run_task

    # image paths relative to the CSV's folder, or absolute
    rows = ["image,label"] + [
        f"{path},{path.parent.name}" for path in sorted((tiny_task_folders / "labeled").rglob("*.png"))
    ]
    (tmp_path / "labeled.csv").write_text("\n".join(rows) + "\n")
    run = run_task(
        {
            # a model folder of a repository: its latest version
            "teacher": str(tiny_repo / "tiny"),
            "labels": str(tiny_task_folders / "labels.txt"),
            "unlabeled_data": str(tiny_task_folders / "unlabeled"),
            "labeled_data": str(tmp_path / "labeled.csv"),
            "student": str(tiny_student_config),
            "steps": 3,
            "batch_size": 8,
            "mix_weight": 0.25,
            "out": str(tmp_path / "run"),
            "progress": False,
        }
    )
    assert run.task.teacher == "tiny@1" and run.task.teacher_source.architecture == "tiny-clip"
    assert (run.task.labeled_images, run.task.unlabeled_images) == (16, 48)
    assert (run.task.mix_weight, run.task.mix_weight_from) == (0.25, "fixed")
    # the teacher's probabilities are the bundle's zero-shot classifier, as the service scores it
    assert run.task.held_out_accuracy["teacher"] >= 0


# Names `task` shares with train, eval or targets: one CLIP_DISTILL_ variable for both, so each means the
# same in both (read and checked, one by one): a training run's sources, loop, run folder and publishing.
SHARED_WITH_THE_OTHER_COMMANDS = {
    "config",
    "teacher",
    "teacher_pretrained",
    "student",
    "student_pretrained",
    "templates",
    "unlabeled_data",
    "on_bad_image",
    "out",
    "steps",
    "batch_size",
    "lr",
    "weight_decay",
    "warmup_steps",
    "eval_every",
    "seed",
    "torch_threads",
    "progress",
    "models_dir",
    "name",
    "int8",
}


def test_task_options_share_the_tools_prefix_and_a_shared_name_means_the_same() -> None:
    from clipserve.training.settings import EvalSettings, TargetsSettings, TrainSettings
    from clipserve.training.task import TaskSettings

    assert TaskSettings.env_name("steps") == TrainSettings.env_name("steps") == "CLIP_DISTILL_STEPS"
    others = {name for cls in (TrainSettings, EvalSettings, TargetsSettings) for name in cls.model_fields}
    assert set(TaskSettings.model_fields) & others == SHARED_WITH_THE_OTHER_COMMANDS
