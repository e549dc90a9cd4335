"""The served and the trained zero-shot classifiers are one classifier: a tiny student as training
holds it (torch, training/evaluate.py) and the same student published and served (ONNX Runtime,
`POST /v1/classify` over real HTTP) give the same class vectors, the same top labels and the same
scores, for the same labels and templates."""

from __future__ import annotations

import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from clipserve.contract.scoring import class_vectors, prompts, top_k
from tests.fixtures.service import b64, image_bytes
from tests.fixtures.training import TINY_STUDENT

LABELS = ["red circle", "blue square", "green cross", "a {braced} label"]
# The second template has braces of its own: str.format would fail on it; the one rule fills only {}.
TEMPLATES = ["a photo of a {}.", "a drawing of {} in {curly} braces"]


@pytest.fixture(scope="module")
def student_and_repo(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random student as training builds it, and the bundle training publishes of it."""
    import torch

    from clipserve.contract.bundle import ModelSource
    from clipserve.export.exporter import export_bundle
    from clipserve.training.models import load_clip

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("agreement")
    config = root / "student.json"
    config.write_text(json.dumps(TINY_STUDENT))
    student = load_clip(str(config), seed=3)
    source = ModelSource(architecture=student.architecture, config=student.model_cfg)
    export_bundle(student.model, root / "models", "student", source=source, progress=False)
    return student, root / "models"


def test_served_and_trained_classifiers_agree(student_and_repo, live_server) -> None:
    import torch

    from clipserve.training.evaluate import encode_texts, zero_shot_scores
    from clipserve.training.models import class_vectors as trained_class_vectors

    student, repo = student_and_repo
    pictures = [image_bytes(seed=seed, size=(48, 40)) for seed in range(4)]
    images = [Image.open(io.BytesIO(data)).convert("RGB") for data in pictures]
    similarity, scores = zero_shot_scores(student, images, LABELS, TEMPLATES)

    base = live_server(models_dir=repo)
    response = httpx.post(
        f"{base}/v1/classify",
        json={"images": [b64(p) for p in pictures], "labels": LABELS, "templates": TEMPLATES, "top_k": 4},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    for index, result in enumerate(results):
        served = {entry["label"]: entry for entry in result["labels"]}
        ranking = [LABELS[j] for j in top_k(scores[index], len(LABELS))[0]]
        assert [entry["label"] for entry in result["labels"]] == ranking
        np.testing.assert_allclose([served[label]["score"] for label in LABELS], scores[index], atol=2e-4)
        np.testing.assert_allclose(
            [served[label]["similarity"] for label in LABELS], similarity[index], atol=2e-4
        )

    # The class vectors themselves: the served text vectors of the same prompts, grouped the one way.
    embedded = httpx.post(f"{base}/v1/embed", json={"texts": prompts(LABELS, TEMPLATES)}, timeout=60)
    assert embedded.status_code == 200, embedded.text
    served_prompts = np.array(embedded.json()["text_embeddings"], dtype=np.float32)
    trained_prompts = encode_texts(student, prompts(LABELS, TEMPLATES)).numpy()
    np.testing.assert_allclose(served_prompts, trained_prompts, atol=2e-4)
    trained = trained_class_vectors(student, LABELS, TEMPLATES, torch.device("cpu")).numpy()
    np.testing.assert_allclose(class_vectors(served_prompts, len(TEMPLATES)), trained, atol=2e-4)
