"""A model refresh through the API (ASGI app, real stores, real ONNX Runtime sessions): a published
version of other weights never turns a collection's requests into errors; a background job moves it
(texts and inline images), waits on bare vectors until `drop_unembeddable`, can be cancelled and
rolled back; a pinned collection keeps its version, and that version stays loaded."""

from __future__ import annotations

import http.server
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures.collections import TEXTS, add_texts, embed_texts, post_json, search_ids
from tests.fixtures.models import publish_copy
from tests.fixtures.service import b64, image_bytes

ADMIN = {"authorization": "Bearer admin"}


@pytest.fixture
def repo(tiny_repo: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny repository that the test publishes into."""
    root = tmp_path / "models"
    shutil.copytree(tiny_repo, root)
    return root


@pytest.fixture(params=["embedded", "pgvector"])
def refresh_settings(request: pytest.FixtureRequest, tmp_path: Path, repo: Path) -> dict[str, object]:
    settings: dict[str, object] = {
        "models_dir": repo,
        "admin_key": "admin",
        "data_dir": tmp_path / "data",
        "collections_backend": request.param,
        "reembed_poll_s": 0.2,
        "reembed_chunk": 16,
        "reembed_grace_s": 60,
    }
    if request.param == "pgvector":
        settings["postgres_dsn"] = request.getfixturevalue("postgres_schema_dsn")
    return settings


def publish_and_reload(api, repo: Path, retrained: Path) -> int:
    version = publish_copy(repo, source=retrained)
    report = api.post("/v1/admin/reload", headers=ADMIN)
    assert report.status_code == 200 and report.json()["loaded"] == [f"tiny@{version}"], report.text
    return version


def wait_for(api, job_id: str, *states: str, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        job = api.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in states:
            return job
        assert job["state"] not in ("failed", "cancelled") or job["state"] in states, job
        assert time.monotonic() < deadline, f"job still {job['state']} after {timeout_s} s: {job}"
        time.sleep(0.1)


def job_of(api, name: str, timeout_s: float = 30) -> dict:
    """The job the collection's policy started."""
    deadline = time.monotonic() + timeout_s
    while (job := api.get(f"/v1/collections/{name}").json()["job"]) is None:
        assert time.monotonic() < deadline, f"no job started for {name}"
        time.sleep(0.1)
    return job


def loaded(api) -> dict[str, list[str]]:
    return {entry["model"]: entry["why"] for entry in api.get("/readyz").json()["loaded"]}


def test_a_published_version_moves_every_collection_without_an_error(
    make_client, refresh_settings, repo, tiny_retrained_repo
):
    api = make_client(**refresh_settings)
    api.post("/v1/collections", json={"name": "texts"})
    add_texts(api, "texts")
    photos = [image_bytes(seed) for seed in (4, 5, 6)]
    api.post("/v1/collections", json={"name": "photos", "index": "hnsw"})
    added = api.post(
        "/v1/collections/photos/items",
        json={"items": [{"id": f"p{i}", "image": b64(photo)} for i, photo in enumerate(photos)]},
    )
    assert added.status_code == 200, added.text
    pinned = api.post("/v1/collections", json={"name": "pinned", "model": "tiny@1"}).json()
    assert pinned["on_model_update"] == "pin"
    add_texts(api, "pinned")
    v1_query = embed_texts(api, ["a car"])[0]

    publish_and_reload(api, repo, tiny_retrained_repo)
    # at once, and all along: every collection answers, from its own version until it moved
    for name in ("texts", "photos", "pinned"):
        response = post_json(api, f"/v1/collections/{name}/search", {"text": "a car", "top_k": 2})
        assert response.status_code == 200 and response.json()["version"] in (1, 2), response.text
    models = {m["id"]: m for m in api.get("/v1/models").json()["data"]}
    assert models["tiny"]["version"] == 2 and models["tiny"]["status"] == "serving"
    assert models["tiny@1"]["status"] == "kept" and "collection pinned" in models["tiny@1"]["kept_for"]

    for name in ("texts", "photos"):
        job = wait_for(api, job_of(api, name)["id"], "switched")
        assert (job["model"], job["from_model"], job["auto"]) == ("tiny@2", "tiny@1", True)
        assert job["done"] == job["total"] and job["keep_until"]
        info = api.get(f"/v1/collections/{name}").json()
        assert (info["version"], info["model_status"]) == (2, "current")
        assert info["previous"]["version"] == 1 and info["job"]["state"] == "switched"
    assert api.get("/v1/collections/pinned").json()["version"] == 1
    assert api.get("/v1/jobs", params={"collection": "pinned"}).json()["data"] == []

    # the moved items carry the new version's vectors, the pinned ones the old version's
    v2_query = embed_texts(api, ["a car"])[0]
    assert float(v1_query @ v2_query) < 0.99  # other weights: another space
    matrix = embed_texts(api, TEXTS)
    assert search_ids(api, "texts", {"text": "a car", "top_k": 3}) == [
        f"t{i}" for i in np.argsort(-(matrix @ v2_query), kind="stable")[:3]
    ]
    served = api.post("/v1/embed", json={"images": [b64(photo) for photo in photos]}).json()
    for i in range(3):
        stored = api.get(f"/v1/collections/photos/items/p{i}").json()["vector"]
        assert float(np.dot(stored, served["image_embeddings"][i])) >= 0.9999
    old = api.post("/v1/embed", json={"texts": ["a car"], "model": "tiny@1"}).json()
    assert old["version"] == 1 and float(np.dot(old["text_embeddings"][0], v1_query)) >= 0.9999
    pinned_hit = post_json(api, "/v1/collections/pinned/search", {"text": "a car", "top_k": 1}).json()
    assert pinned_hit["version"] == 1
    metrics = api.get("/metrics").text
    assert 'clipserve_model_memory_bytes{kind="graphs",model="tiny",version="1"}' in metrics
    assert 'clipserve_model_memory_bytes{kind="graphs",model="tiny",version="2"}' in metrics
    assert sorted(loaded(api)["tiny@1"]) == [
        "collection photos (previous space, for rollback)",
        "collection pinned",
        "collection texts (previous space, for rollback)",
    ]


def test_bare_vectors_block_the_switch_until_dropped_or_re_added(
    make_client, refresh_settings, repo, tiny_retrained_repo
):
    api = make_client(**refresh_settings)
    api.post("/v1/collections", json={"name": "mixed", "on_model_update": "pin"})
    add_texts(api, "mixed")
    vectors = embed_texts(api, ["bare one", "bare two"])
    api.post(
        "/v1/collections/mixed/items",
        json={"items": [{"id": f"bare-{i}", "vector": v.tolist()} for i, v in enumerate(vectors)]},
    )
    publish_and_reload(api, repo, tiny_retrained_repo)
    time.sleep(0.5)
    assert api.get("/v1/jobs").json()["data"] == []  # pinned: no job until asked

    started = api.post("/v1/collections/mixed/reembed", json={})
    assert started.status_code == 202, started.text
    job_id = started.json()["id"]
    assert started.headers["location"] == f"/v1/jobs/{job_id}"
    job = wait_for(api, job_id, "waiting")
    assert (job["unembeddable"], job["unembeddable_ids"]) == (2, ["bare-0", "bare-1"])
    assert job["done"] == len(TEXTS) and job["total"] == len(TEXTS) + 2
    assert search_ids(api, "mixed", {"text": "bare one", "top_k": 1}) == ["bare-0"]  # still v1

    # one re-added with its text moves; the other is dropped when asked
    readd = api.post("/v1/collections/mixed/items", json={"items": [{"id": "bare-0", "text": "bare one"}]})
    assert readd.status_code == 200
    again = api.post("/v1/collections/mixed/reembed", json={"drop_unembeddable": True})
    assert again.status_code == 202 and again.json()["id"] == job_id
    job = wait_for(api, job_id, "switched")
    assert "1 items that could not move were deleted" in job["message"]
    info = api.get("/v1/collections/mixed").json()
    assert (info["version"], info["count"]) == (2, len(TEXTS) + 1)
    assert search_ids(api, "mixed", {"text": "bare one", "top_k": 1}) == ["bare-0"]
    missing = api.get("/v1/collections/mixed/items/bare-1")
    assert missing.status_code == 404
    current = api.post("/v1/collections/mixed/reembed", json={})
    assert current.status_code == 409 and current.json()["error"]["type"] == "already_current"


def test_cancel_then_rollback_after_the_switch(make_client, refresh_settings, repo, tiny_retrained_repo):
    api = make_client(**{**refresh_settings, "reembed_rate": 40.0, "reembed_chunk": 8})
    api.post("/v1/collections", json={"name": "c"})
    texts = [f"item number {i}" for i in range(120)]
    for start in range(0, len(texts), 60):
        api.post(
            "/v1/collections/c/items",
            json={
                "items": [{"id": f"i{k}", "text": t} for k, t in enumerate(texts) if start <= k < start + 60]
            },
        )
    publish_and_reload(api, repo, tiny_retrained_repo)
    first = job_of(api, "c")
    deadline = time.monotonic() + 30
    while api.get(f"/v1/jobs/{first['id']}").json()["done"] == 0:  # some chunks moved, not all
        assert time.monotonic() < deadline
        time.sleep(0.05)
    cancelled = api.delete(f"/v1/jobs/{first['id']}")
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    assert 0 < cancelled.json()["done"] < len(texts)
    time.sleep(0.6)  # the policy does not start a cancelled target again
    info = api.get("/v1/collections/c").json()
    assert (info["version"], info["job"]) == (1, None)
    assert search_ids(api, "c", {"text": texts[7], "top_k": 1}) == ["i7"]

    second = api.post("/v1/collections/c/reembed", json={"model": "tiny@2"}).json()
    assert second["id"] != first["id"] and not second["auto"]
    wait_for(api, second["id"], "switched")
    assert cancelled.json()["id"] in {j["id"] for j in api.get("/v1/jobs").json()["data"]}
    late = api.post(
        "/v1/collections/c/items", json={"items": [{"id": "late", "text": "written after the switch"}]}
    )
    assert late.status_code == 200
    refused = api.delete(f"/v1/jobs/{second['id']}")
    assert refused.status_code == 409 and "rollback" in refused.json()["error"]["message"]

    rolled = api.post("/v1/collections/c/rollback", json={})
    assert rolled.status_code == 200 and rolled.json()["state"] == "rolled_back", rolled.text
    info = api.get("/v1/collections/c").json()
    assert (info["version"], info["count"], info["previous"]) == (1, len(texts) + 1, None)
    v1 = post_json(api, "/v1/collections/c/search", {"text": "written after the switch", "top_k": 1}).json()
    assert v1["version"] == 1 and v1["results"][0]["id"] == "late"
    assert v1["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)  # its v1 vector, written at once
    again = api.post("/v1/collections/c/rollback", json={})
    assert again.status_code == 409 and again.json()["error"]["type"] == "job_state"
    time.sleep(0.6)  # rolled back: the policy does not move it to tiny@2 again
    assert api.get("/v1/collections/c").json()["job"] is None


@pytest.fixture
def picture_server() -> Iterator[tuple[str, dict[str, bytes]]]:
    """A local HTTP server of pictures by path; the test changes what it serves."""
    pictures: dict[str, bytes] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            data = pictures.get(self.path)
            self.send_response(200 if data else 404)
            self.send_header("content-length", str(len(data or b"")))
            self.end_headers()
            self.wfile.write(data or b"")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", pictures
    server.shutdown()
    thread.join(5)


def test_image_urls_move_and_one_that_is_gone_is_an_error_of_the_job(
    make_client, tmp_path, repo, tiny_retrained_repo, picture_server
):
    base, pictures = picture_server
    api = make_client(
        models_dir=repo,
        admin_key="admin",
        data_dir=tmp_path / "data",
        reembed_poll_s=0.2,
        url_fetch_enabled=True,
        url_allowed_hosts=["127.0.0.1"],
        url_allow_private=True,
    )
    pictures.update({"/a.png": image_bytes(1), "/b.png": image_bytes(2)})
    api.post("/v1/collections", json={"name": "web"})
    added = api.post(
        "/v1/collections/web/items",
        json={"items": [{"id": "a", "image": f"{base}/a.png"}, {"id": "b", "image": f"{base}/b.png"}]},
    )
    assert added.status_code == 200, added.text
    del pictures["/b.png"]
    publish_and_reload(api, repo, tiny_retrained_repo)
    job = wait_for(api, job_of(api, "web")["id"], "waiting")
    assert job["errors"] == 1 and job["unembeddable"] == 0
    assert job["error_samples"] == [
        {"id": "b", "type": "invalid_image", "message": "image 0: fetching the URL gave HTTP 404"}
    ]
    pictures["/b.png"] = image_bytes(2)  # back: asked again, the job tries it again
    api.post("/v1/collections/web/reembed", json={})
    wait_for(api, job["id"], "switched")
    moved = api.get("/v1/collections/web/items/b").json()["vector"]
    direct = api.post("/v1/embed", json={"images": [b64(image_bytes(2))]}).json()["image_embeddings"][0]
    assert float(np.dot(moved, direct)) >= 0.9999


def test_the_old_version_is_unloaded_once_nothing_needs_it(make_client, tmp_path, repo, tiny_retrained_repo):
    api = make_client(
        models_dir=repo,
        admin_key="admin",
        data_dir=tmp_path / "data",
        reembed_poll_s=0.2,
        reembed_grace_s=0.5,
        retire_grace_s=0.1,
    )
    for name, model in (("moving", "tiny"), ("pinned", "tiny@1")):
        api.post("/v1/collections", json={"name": name, "model": model})
        add_texts(api, name)
    publish_and_reload(api, repo, tiny_retrained_repo)
    wait_for(api, job_of(api, "moving")["id"], "completed")
    assert loaded(api) == {"tiny@2": ["serving", "collection moving"], "tiny@1": ["collection pinned"]}
    assert api.delete("/v1/collections/pinned").status_code == 200
    deadline = time.monotonic() + 10
    while "tiny@1" in loaded(api):
        assert time.monotonic() < deadline, loaded(api)
        time.sleep(0.1)
    assert [m["id"] for m in api.get("/v1/models").json()["data"]] == ["tiny"]
    assert 'clipserve_model_loaded{content_hash="' in api.get("/metrics").text
