"""A model refresh and the stored label sets (ASGI app, real stores, real ONNX Runtime sessions): a set
large enough to build in the background keeps classifying with the previous version while its class
matrix is built on the new one, never answers `labelset_building` because of the refresh, then moves;
the previous version is kept loaded for it and let go once nothing needs it."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from tests.fixtures.models import publish_copy
from tests.fixtures.service import b64, image_bytes

ADMIN = {"authorization": "Bearer admin"}


# more prompts than a request builds within itself (labelsets.SYNC_BUILD_TEXTS): a background build
def labels(kind: str) -> list[str]:
    """Labels of their own per test: class matrices live on in the shared cache between tests."""
    return [f"{kind} number {i}" for i in range(5000)]


IMAGES = [b64(image_bytes(seed)) for seed in range(3)]


@pytest.fixture
def repo(tiny_repo: Path, tmp_path: Path) -> Path:
    root = tmp_path / "models"
    shutil.copytree(tiny_repo, root)
    return root


def loaded(api) -> dict[str, list[str]]:
    return {entry["model"]: entry["why"] for entry in api.get("/readyz").json()["loaded"]}


def classify(api, **extra: object) -> dict:
    response = api.post("/v1/classify", json={"images": IMAGES, "labelset": "many", "top_k": 3, **extra})
    assert response.status_code == 200, response.text
    return response.json()


def wait_ready(api, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while (info := api.get("/v1/labelsets/many").json())["status"] != "ready":
        assert info["status"] in ("queued", "building"), info
        assert time.monotonic() < deadline, info
        time.sleep(0.1)
    return info


def test_a_large_label_set_classifies_with_the_previous_version_until_it_moved(
    make_client, tmp_path, repo, tiny_retrained_repo
):
    api = make_client(
        models_dir=repo, admin_key="admin", data_dir=tmp_path / "data", retire_grace_s=0.1, labelset_lease_s=2
    )
    put = api.put("/v1/labelsets/many", json={"labels": labels("warming"), "templates": "none"})
    assert put.status_code == 202, put.text
    assert wait_ready(api)["serving"] == "tiny@1"
    before = classify(api)

    version = publish_copy(repo, source=tiny_retrained_repo)
    report = api.post("/v1/admin/reload", headers=ADMIN)
    assert report.json()["loaded"] == [f"tiny@{version}"], report.text

    # right after the publish: the previous version answers, as it did, and stays loaded for the set
    first = classify(api)
    assert (first["version"], first["results"]) == (1, before["results"])
    info = api.get("/v1/labelsets/many").json()
    assert info["status"] == "ready" and info["serving"] == "tiny@1", info
    assert info["warming"]["model"] == f"tiny@{version}" and info["warming"]["status"] in (
        "queued",
        "building",
    )
    assert loaded(api)["tiny@1"] == [f"label set many until tiny@{version}"]

    # every request answers (never labelset_building) and the set moves once, for good
    seen, deadline = [first["version"]], time.monotonic() + 120
    while seen[-1] != version:
        assert time.monotonic() < deadline, f"still on {seen[-1]} after 120 s"
        seen.append(classify(api)["version"])
        time.sleep(0.05)
    assert seen == sorted(seen), seen
    info = api.get("/v1/labelsets/many").json()
    assert (info["status"], info["serving"], info["warming"]) == ("ready", f"tiny@{version}", None)

    # the new version's answers are its own: the same as asking for that version by name
    after = classify(api)
    assert after["results"] == classify(api, model=f"tiny@{version}")["results"]
    assert after["results"] != before["results"]

    # nothing needs the previous version any more: let go
    deadline = time.monotonic() + 10
    while "tiny@1" in loaded(api):
        assert time.monotonic() < deadline, loaded(api)
        time.sleep(0.1)


def test_a_request_naming_the_new_version_gets_it_and_ad_hoc_labels_use_the_served_one(
    make_client, tmp_path, repo, tiny_retrained_repo
):
    api = make_client(models_dir=repo, admin_key="admin", data_dir=tmp_path / "data", labelset_builds=1)
    put = api.put("/v1/labelsets/many", json={"labels": labels("named"), "templates": "none"})
    assert put.status_code == 202, put.text
    wait_ready(api)
    version = publish_copy(repo, source=tiny_retrained_repo)
    api.post("/v1/admin/reload", headers=ADMIN)
    named = api.post("/v1/classify", json={"images": IMAGES, "labelset": "many", "model": f"tiny@{version}"})
    # asked for by name: that version, whose matrix is still being built (or, on a fast machine, done)
    assert named.status_code in (200, 409), named.text
    if named.status_code == 409:
        assert named.json()["error"]["type"] == "labelset_building"
    else:
        assert named.json()["version"] == version
    ad_hoc = api.post("/v1/classify", json={"images": IMAGES, "labels": ["a cat", "a dog"]})
    assert ad_hoc.status_code == 200 and ad_hoc.json()["version"] == version
