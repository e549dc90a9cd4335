"""`clip-distill` end to end: the documented invocation with --models-dir, config files, eval, stored
targets, and clear errors with exit status 2 instead of tracebacks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from clipserve.contract.bundle import ModelRepository, load_bundle, sha256_file
from clipserve.training.cli import main
from clipserve.training.models import load_clip
from tests.fixtures.training import TINY_DATA

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.mark.slow
def test_documented_invocation_publishes_a_bundle_that_loads_and_runs(
    tiny_student_config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    # the documented command, with fewer steps and a smaller batch to keep CI fast
    argv = ["--teacher", "ViT-S-32", "--teacher-pretrained", "none"]
    argv += [
        "--student",
        str(tiny_student_config),
        "--data",
        "synthetic:shapes",
        "--steps",
        "2",
        "--batch-size",
        "4",
    ]
    argv += [
        "--out",
        "runs/demo",
        "--models-dir",
        "models/",
        "--name",
        "demo-student",
        "--no-progress",
        "--no-evaluate",
    ]
    assert main(argv) == 0

    bundle = ModelRepository(tmp_path / "models").load("demo-student")
    assert bundle.manifest.version == 1
    run = json.loads((tmp_path / "runs/demo/run.json").read_text())
    assert bundle.manifest.source.training_run == run["run_id"]
    weights = tmp_path / "runs/demo/final/open_clip_model.safetensors"
    assert bundle.manifest.source.checkpoint_sha256 == sha256_file(weights)
    bundle = load_bundle(bundle.path)

    student = load_clip(str(tmp_path / "runs/demo"))
    pixels = torch.randn(2, 3, 32, 32)
    tokens = student.tokenizer(["a red circle", "two shapes: a blue square and a green cross"])
    image_session = ort.InferenceSession(str(bundle.file_path("image")), providers=["CPUExecutionProvider"])
    text_session = ort.InferenceSession(str(bundle.file_path("text")), providers=["CPUExecutionProvider"])
    image = image_session.run(None, {image_session.get_inputs()[0].name: pixels.numpy()})[0]
    text = text_session.run(None, {text_session.get_inputs()[0].name: tokens.numpy()})[0]
    with torch.no_grad():
        expected_image = student.model.encode_image(pixels, normalize=True).numpy()
        expected_text = student.model.encode_text(tokens, normalize=True).numpy()
    assert image.shape == (2, 32) and text.shape == (2, 32)
    assert np.allclose(image, expected_image, atol=1e-4) and np.allclose(text, expected_text, atol=1e-4)

    from clipserve.training import synthetic
    from clipserve.training.recipes import classify_with_bundle

    ranked = classify_with_bundle(
        bundle.path, synthetic.draw_single("red", "circle"), ["red circle", "blue square"]
    )
    assert sorted(label for label, _ in ranked) == ["blue square", "red circle"]
    assert sum(p for _, p in ranked) == pytest.approx(1.0) and ranked[0][1] >= ranked[1][1]


def test_config_file_with_flag_overrides_trains_from_scratch(
    tiny_student_config: Path, tmp_path: Path
) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(
        f"student: {tiny_student_config}\ndata: '{TINY_DATA}'\nsteps: 50\nbatch-size: 8\nlosses: clip\nprogress: false\n"
    )
    assert (
        main(["--config", str(config), "--steps", "3", "--out", str(tmp_path / "run"), "--no-evaluate"]) == 0
    )
    records = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in records] == [1, 2, 3]
    assert set(json.loads(records[0])["parts"]) == {"clip"}


def test_training_on_synthetic_data_reports_zero_shot_accuracy(
    tiny_student_config: Path, tmp_path: Path
) -> None:
    argv = ["--student", str(tiny_student_config), "--data", TINY_DATA, "--steps", "2", "--batch-size", "8"]
    assert main([*argv, "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    evals = [
        json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if "eval" in r
    ]
    assert evals[-1]["step"] == 2 and set(evals[-1]["eval"]) == {"top1", "top5"}


def test_stored_targets_command_feeds_training_without_the_teacher(
    tiny_student_config: Path, tiny_teacher_run: Path, tmp_path: Path
) -> None:
    targets = tmp_path / "targets"
    argv = [
        "targets",
        "--teacher",
        str(tiny_teacher_run),
        "--data",
        TINY_DATA,
        "--targets-dir",
        str(targets),
        "--views",
        "2",
    ]
    assert main(argv) == 0
    manifest = json.loads((targets / "targets.json").read_text())
    assert manifest["views"] == 2 and manifest["samples"] == 128 and len(manifest["class_names"]) == 30
    argv = ["--student", str(tiny_student_config), "--data", TINY_DATA, "--teacher-targets", str(targets)]
    argv += [
        "--losses",
        "clip,logit_kd,class_kd",
        "--steps",
        "2",
        "--batch-size",
        "8",
        "--no-progress",
        "--no-evaluate",
    ]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 0
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert set(record["parts"]) == {"clip", "logit_kd", "class_kd"}

    # unlabeled images of every composition, with their own stored targets, for class_kd
    unlabeled = "synthetic:shapes?size=32&image_size=32&seed=5&held_out=none"
    assert (
        main(
            [
                "targets",
                "--teacher",
                str(tiny_teacher_run),
                "--data",
                unlabeled,
                "--targets-dir",
                str(tmp_path / "u"),
            ]
        )
        == 0
    )
    more = [
        "--unlabeled-data",
        unlabeled,
        "--unlabeled-targets",
        str(tmp_path / "u"),
        "--unlabeled-batch-size",
        "4",
    ]
    assert main([*argv, *more, "--out", str(tmp_path / "run-unlabeled")]) == 0
    run = json.loads((tmp_path / "run-unlabeled" / "run.json").read_text())
    assert run["config"]["unlabeled_batch_size"] == 4


def test_eval_reports_teacher_beside_student(
    tiny_teacher_run: Path, tiny_student_config: Path, tmp_path: Path
) -> None:
    argv = ["eval", "--model", str(tiny_student_config), "--teacher", str(tiny_teacher_run)]
    assert (
        main(
            [*argv, "--eval-data", "synthetic:shapes?image_size=32", "--report-dir", str(tmp_path / "report")]
        )
        == 0
    )
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert [r["role"] for r in report] == ["teacher", "student"]
    teacher, student = report
    assert set(teacher["accuracy"]) == {"top1", "top5"}
    assert teacher["parameters"]["image"] > student["parameters"]["image"]
    assert teacher["gflops"]["image"] > student["gflops"]["image"] > 0
    assert student["latency_ms"]["image"] > 0 and student["latency_ms"]["text"] > 0
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "| teacher |" in markdown and "ORT ms image" in markdown


def test_eval_times_the_graphs_a_bundle_holds(tiny_model, tiny_bundle, tmp_path: Path) -> None:
    """`clip-distill eval` exports through export/: the same opset, the same dynamic axes, the same
    vectors as the bundle of the same model."""
    import onnx

    from clipserve.export.exporter import ONNX_OPSET, TEXT_INPUT, export_tower_graphs
    from clipserve.export.verify import fixed_token_ids

    graphs = export_tower_graphs(tiny_model, tmp_path)
    assert graphs.text_length_free == tiny_bundle.manifest.text.dynamic_length is True
    ids = fixed_token_ids(77)[:, :12]
    for ours, theirs in (
        (graphs.image, tiny_bundle.file_path("image")),
        (graphs.text, tiny_bundle.file_path("text")),
    ):
        ours_model, theirs_model = onnx.load(str(ours)), onnx.load(str(theirs))
        assert [o.version for o in ours_model.opset_import if o.domain == ""] == [ONNX_OPSET]
        assert str(ours_model.graph.input) == str(theirs_model.graph.input)
    sessions = [
        ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        for p in (graphs.text, tiny_bundle.file_path("text"))
    ]
    ours_vectors, bundle_vectors = (s.run(None, {TEXT_INPUT: ids})[0] for s in sessions)
    np.testing.assert_allclose(ours_vectors, bundle_vectors, atol=1e-6)


def test_eval_retrieval_on_a_captions_file(tiny_student_config: Path, tmp_path: Path) -> None:
    from clipserve.training import synthetic

    rows = ["filepath,caption"]
    for i, (colour, shape) in enumerate([("red", "circle"), ("blue", "square"), ("green", "cross")]):
        synthetic.draw_single(colour, shape, size=32).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,a {colour} {shape}")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    argv = ["eval", "--model", str(tiny_student_config), "--eval-data", str(tmp_path / "pairs.csv")]
    assert main([*argv, "--report-dir", str(tmp_path / "report"), "--no-latency"]) == 0
    accuracy = json.loads((tmp_path / "report" / "report.json").read_text())[0]["accuracy"]
    assert accuracy["image_to_text_R@10"] == 1.0 and "text_to_image_R@1" in accuracy


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--losses", "clip,magic"], "unknown loss 'magic'"),
        (["--losses", "clip,logit_kd"], "need a teacher"),
        (["--data", "nowhere.csv"], "caption file nowhere.csv does not exist"),
        (["--init", "inherit"], "--init inherit needs a --teacher or --inherit-from"),
        (["--teacher", "ViT-Nope-1"], "unknown model 'ViT-Nope-1'"),
        (["--teacher", "ViT-B-322"], "did you mean ViT-B-32"),
        (["--models-dir", "models"], "--models-dir needs --name"),
        (["--resume", "missing.pt"], "cannot read checkpoint missing.pt"),
        (
            ["--unlabeled-data", TINY_DATA],
            "feeds only the image-side distillation losses (feature, class_kd)",
        ),
        (
            ["--unlabeled-data", TINY_DATA, "--teacher-targets", ".", "--losses", "clip,class_kd"],
            "--unlabeled-data needs the teacher's view of those images",
        ),
        (["--unlabeled-targets", "t"], "--unlabeled-targets belongs to --unlabeled-data"),
        (["--data", "synthetic:shapes?held_out=some"], "held_out='some': use default or none"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(
    extra: list[str], message: str, tiny_student_config: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    argv = ["--student", str(tiny_student_config), "--data", TINY_DATA, "--steps", "1", "--batch-size", "8"]
    assert main([*argv, "--no-progress", "--no-evaluate", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_unknown_config_key_and_missing_student_are_clear(tmp_path: Path, capsys) -> None:
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"student": "x.json", "learning_rate": 1}))
    assert main(["--config", str(config)]) == 2
    assert "unknown option(s) in" in capsys.readouterr().err
    assert main(["--data", TINY_DATA]) == 2
    assert "--student is required" in capsys.readouterr().err


def test_a_wrong_student_or_data_is_told_before_the_teacher_is_built(tmp_path: Path, capsys) -> None:
    """The teacher named here does not exist either: the student's mistake must be the one told."""
    assert main(["--teacher", "ViT-Nope-1", "--student", "ViT-S-322", "--data", TINY_DATA]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'ViT-S-322'" in err and "did you mean ViT-S-32" in err and "ViT-Nope-1" not in err
    assert main(["--teacher", "ViT-Nope-1", "--student", "ViT-S-32", "--data", str(tmp_path / "no.csv")]) == 2
    assert "no.csv does not exist" in capsys.readouterr().err


def test_help_lists_the_commands_first(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert out.index("commands:") < out.index("--teacher")
    for command in ("train", "eval", "targets"):
        assert f"  {command} " in out


def test_a_folder_of_images_is_unlabeled_data_not_training_pairs(
    tiny_student_config: Path, tiny_teacher_run: Path, tmp_path: Path, capsys
) -> None:
    from PIL import Image

    from clipserve.training.synthetic import draw_single

    images = tmp_path / "unlabeled"
    images.mkdir()
    for i, (colour, shape) in enumerate([("red", "square"), ("blue", "circle"), ("green", "cross")] * 2):
        draw_single(colour, shape, size=32, seed=i).save(images / f"{i}.png")
    Image.new("RGB", (4, 4)).save(images / "tiny.jpg")
    argv = ["--student", str(tiny_student_config), "--steps", "2", "--batch-size", "8", "--no-progress"]
    argv += ["--no-evaluate", "--teacher", str(tiny_teacher_run), "--losses", "clip,class_kd"]
    assert main([*argv, "--data", str(images), "--out", str(tmp_path / "bad")]) == 2
    assert "folder of images without captions" in capsys.readouterr().err
    more = ["--unlabeled-data", str(images), "--unlabeled-batch-size", "2"]
    assert main([*argv, "--data", TINY_DATA, *more, "--out", str(tmp_path / "run")]) == 0
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert set(record["parts"]) == {"clip", "class_kd"}
    # the live teacher for the pairs (and the class vectors), stored targets for the unlabeled images
    targets = [
        "targets",
        "--teacher",
        str(tiny_teacher_run),
        "--data",
        str(images),
        "--views",
        "1",
        "--targets-dir",
        str(tmp_path / "u"),
    ]
    assert main(targets) == 0
    more += ["--unlabeled-targets", str(tmp_path / "u")]
    assert main([*argv, "--data", TINY_DATA, *more, "--out", str(tmp_path / "run-stored")]) == 0
    stored = json.loads((tmp_path / "run-stored" / "metrics.jsonl").read_text().splitlines()[0])
    assert stored["parts"]["class_kd"] == pytest.approx(record["parts"]["class_kd"], rel=1e-4)
