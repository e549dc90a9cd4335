"""Students from teachers with Hugging Face tokenizers: clip-distill takes a random-init SigLIP2-family
teacher (its own tokenizer, preprocessing and sigmoid scoring), distills a CLIP-BPE student and a
student of the teacher's own family for a few steps, and publishes bundles that serve."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.fixtures.service import b64, image_bytes
from tests.fixtures.training import TINY_DATA, TINY_STUDENT


def _siglip_student_config(teacher_config: Path, folder: Path) -> Path:
    """A smaller student of the teacher's family: its tokenizer, bidirectional text tower, sigmoid."""
    document = json.loads(teacher_config.read_text())
    text = document["model_cfg"]["text_cfg"]
    text.update({"width": 32, "heads": 2, "layers": 1})
    document["model_cfg"]["embed_dim"] = 64  # timm's test ViT gives 64-dim image features
    path = folder / "siglip-student.json"
    path.write_text(json.dumps(document))
    return path


def test_clip_student_distilled_from_a_siglip_teacher_publishes_and_serves(
    family_config, tmp_path: Path, torch_one_thread, make_client
) -> None:
    from clipserve.training.cli import run_training
    from clipserve.training.models import load_teacher

    teacher_config = family_config("siglip2")
    teacher = load_teacher([str(teacher_config)]).members[0]
    assert type(teacher.tokenizer).__name__ == "HFTokenizer" and teacher.context_length == 16
    assert teacher.scoring.kind == "sigmoid" and teacher.preprocess_cfg["resize_mode"] == "squash"

    student_config = tmp_path / "student.json"
    student_config.write_text(json.dumps(TINY_STUDENT))
    repo = tmp_path / "models"
    result = run_training(
        {
            "teacher": [str(teacher_config)],
            "student": str(student_config),
            "losses": "clip=1,logit_kd=1,feature=1",
            "data": TINY_DATA,
            "steps": 3,
            "batch_size": 8,
            "out": str(tmp_path / "run"),
            "models_dir": str(repo),
            "name": "from-siglip",
            "progress": False,
        }
    )
    assert len(result.losses) == 3 and all(np.isfinite(result.losses))
    client = make_client(models_dir=repo, models=["from-siglip"])
    model = client.get("/v1/models").json()["data"][0]
    assert (model["id"], model["scoring"]) == ("from-siglip", "softmax")  # the student's own rule
    served = client.post(
        "/v1/classify", json={"images": [b64(image_bytes(seed=1))], "labels": ["red circle", "blue square"]}
    )
    assert served.status_code == 200 and served.json()["scoring"] == "softmax"


def test_same_family_student_keeps_the_tokenizer_and_sigmoid_scoring(
    family_config, tmp_path: Path, torch_one_thread, make_client
) -> None:
    from clipserve.contract.bundle import ModelRepository
    from clipserve.training.cli import run_training
    from clipserve.training.evaluate import zero_shot_scores
    from clipserve.training.models import load_clip

    teacher_config = family_config("siglip2")
    student_config = _siglip_student_config(teacher_config, tmp_path)
    repo = tmp_path / "models"
    result = run_training(
        {
            "teacher": [str(teacher_config)],
            "student": str(student_config),
            "data": TINY_DATA,
            "steps": 2,
            "batch_size": 8,
            "out": str(tmp_path / "run"),
            "models_dir": str(repo),
            "name": "siglip-student",
            "progress": False,
        }
    )
    bundle = ModelRepository(repo).load("siglip-student")
    manifest = bundle.manifest
    assert manifest.tokenizer.kind == "hf" and manifest.tokenizer.context_length == 16
    assert manifest.scoring == "sigmoid" and manifest.image.resize_mode == "squash"
    assert manifest.source.training_run == result.run_id

    # training's zero-shot evaluation and the service score with the same sigmoid rule
    student = load_clip(str(result.final_dir))
    pictures = [image_bytes(seed=seed) for seed in range(2)]
    images = [Image.open(io.BytesIO(p)).convert("RGB") for p in pictures]
    labels = ["red circle", "blue square", "green cross"]
    _, trained = zero_shot_scores(student, images, labels, ["a photo of a {}."])
    client = make_client(models_dir=repo, models=["siglip-student"])
    served = client.post(
        "/v1/classify",
        json={
            "images": [b64(p) for p in pictures],
            "labels": labels,
            "templates": ["a photo of a {}."],
            "top_k": 3,
        },
    ).json()
    assert served["scoring"] == "sigmoid"
    for index, row in enumerate(served["results"]):
        by_label = {entry["label"]: entry["score"] for entry in row["labels"]}
        np.testing.assert_allclose([by_label[label] for label in labels], trained[index], atol=1e-5)
    assert float(trained[0].sum()) != pytest.approx(1.0)  # independent labels: no softmax


def test_eval_reports_a_siglip_family_model(family_config, tmp_path: Path, torch_one_thread) -> None:
    from clipserve.training.cli import main

    out = tmp_path / "report"
    argv = [
        "eval",
        "--model",
        str(family_config("siglip2")),
        "--eval-data",
        TINY_DATA,
        "--report-dir",
        str(out),
        "--no-latency",
    ]
    assert main(argv) == 0
    (report,) = json.loads((out / "report.json").read_text())
    assert set(report["accuracy"]) == {"top1", "top5"}
    assert report["gflops"]["image"] > 0 and report["gflops"]["text"] > 0
