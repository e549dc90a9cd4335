"""A task model (`clip-distill task`) behind the same API: /v1/classify with `model: <task model>`
answers over its own labels without a text tower; other labels, a label set or /v1/embed are a 422
that says what the model is; /v1/models says it is a task model and how many labels it has."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from clipserve.contract.bundle import ModelRepository
from tests.fixtures.service import b64, image_bytes
from tests.fixtures.training import TASK_LABELS


@pytest.fixture
def task_client(make_client: Callable[..., object], tiny_repo: Path, task_run: Path, tmp_path: Path):
    """A service over a repository with the tiny embedding model and the task model `colours`."""
    repo = tmp_path / "models"
    shutil.copytree(tiny_repo / "tiny", repo / "tiny")
    shutil.copytree(task_run / "models" / "colours", repo / "colours")
    return make_client(models_dir=repo)


def test_classify_with_a_task_model_answers_its_graphs_probabilities(
    task_client, task_run: Path, tiny_task_folders: Path
) -> None:
    from clipserve.export.task_bundle import onnx_task_outputs
    from clipserve.export.verify import make_session
    from clipserve.service.inference.preprocess import ImagePreprocessor

    image = next((tiny_task_folders / "labeled" / "blue").glob("*.png")).read_bytes()
    response = task_client.post("/v1/classify", json={"model": "colours", "images": [b64(image)], "top_k": 4})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["model"], body["version"]) == ("colours", 1)
    scores = {s["label"]: s["score"] for s in body["results"][0]["labels"]}
    assert set(scores) == set(TASK_LABELS) and all(
        s["similarity"] is None for s in body["results"][0]["labels"]
    )
    # what the bundle's graph gives for the service's own preprocessing of that image
    bundle = ModelRepository(task_run / "models").load("colours")
    pixels = ImagePreprocessor(bundle.manifest.image, 10**8)(image, 0)[None]
    expected = onnx_task_outputs(make_session(bundle.file_path("image")), pixels)[0, : len(TASK_LABELS)]
    np.testing.assert_allclose([scores[label] for label in TASK_LABELS], expected, atol=1e-5)

    # a subset of its labels: renormalized over them
    response = task_client.post(
        "/v1/classify", json={"model": "colours", "images": [b64(image)], "labels": ["blue", "red"]}
    )
    assert response.status_code == 200, response.text
    subset = {s["label"]: s["score"] for s in response.json()["results"][0]["labels"]}
    total = scores["blue"] + scores["red"]
    assert subset == pytest.approx({"blue": scores["blue"] / total, "red": scores["red"] / total}, abs=1e-6)


def test_other_labels_a_labelset_and_embed_are_refused_naming_what_the_model_is(task_client) -> None:
    image = b64(image_bytes())
    response = task_client.post(
        "/v1/classify", json={"model": "colours", "images": [image], "labels": ["red", "purple"]}
    )
    assert response.status_code == 422
    message = response.json()["error"]["message"]
    assert "purple is not among them" in message and "red, green, blue, yellow" in message
    response = task_client.post("/v1/classify", json={"model": "colours", "images": [image], "labelset": "x"})
    assert response.status_code == 422 and "own labels" in response.json()["error"]["message"]
    response = task_client.post("/v1/embed", json={"model": "colours", "texts": ["a red circle"]})
    assert response.status_code == 422 and "no embedding space" in response.json()["error"]["message"]
    # the embedding model beside it serves as before
    response = task_client.post(
        "/v1/classify", json={"model": "tiny", "images": [image], "labels": ["a", "b"]}
    )
    assert response.status_code == 200, response.text


def test_models_lists_the_task_model_with_its_labels_count(task_client) -> None:
    listed = {m["id"]: m for m in task_client.get("/v1/models").json()["data"]}
    assert listed["colours"]["task"] is True and listed["colours"]["labels"] == len(TASK_LABELS)
    assert listed["colours"]["context_length"] is None
    assert listed["tiny"]["task"] is False and listed["tiny"]["labels"] is None


def test_a_new_version_of_a_task_model_is_picked_up_by_a_reload(
    make_client: Callable[..., object], tiny_repo: Path, task_run: Path, tmp_path: Path
) -> None:
    from tests.fixtures.models import publish_copy

    repo = tmp_path / "models"
    shutil.copytree(tiny_repo / "tiny", repo / "tiny")
    shutil.copytree(task_run / "models" / "colours", repo / "colours")
    client = make_client(models_dir=repo, admin_key="admin-k")
    assert publish_copy(repo, name="colours") == 2
    report = client.post("/v1/admin/reload", headers={"Authorization": "Bearer admin-k"}).json()
    assert report["loaded"] == ["colours@2"] and report["unchanged"] == ["tiny@1"]
    response = client.post("/v1/classify", json={"model": "colours", "images": [b64(image_bytes())]})
    assert response.status_code == 200 and response.json()["version"] == 2
