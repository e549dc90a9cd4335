"""Zero-shot classification and label sets: scores, templates, Redis sharing, large sets, Redis down."""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest

from clipserve.service.templates import DEFAULT_TEMPLATES, builtin_templates
from tests.fixtures.service import b64, free_port, image_bytes

IMAGES = [b64(image_bytes(seed=s)) for s in range(3)]
LABELS = ["cat", "dog", "car", "tree", "boat", "pizza"]


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def text_calls(client) -> int:
    return client.app.state.registry.resolve(None).text_stats.calls


def embed(client, texts=None, images=None) -> tuple[np.ndarray, np.ndarray]:
    body = client.post("/v1/embed", json={"texts": texts, "images": images}).json()
    return np.array(body["text_embeddings"]), np.array(body["image_embeddings"])


def expected_scores(client, labels: list[str], templates: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The definition, from /v1/embed vectors: mean of normalized template vectors, renormalized."""
    texts = [t.replace("{}", label) for label in labels for t in templates]
    text, _ = embed(client, texts=texts)
    classes = text.reshape(len(labels), len(templates), -1).mean(axis=1)
    classes /= np.linalg.norm(classes, axis=1, keepdims=True)
    _, images = embed(client, images=IMAGES)
    cos = images @ classes.T
    scale = client.get("/v1/models").json()["data"][0]["logit_scale"]
    logits = scale * cos
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    return probs / probs.sum(axis=1, keepdims=True), cos


def check_results(
    results: list[dict], probs: np.ndarray, cos: np.ndarray, labels: list[str], top_k: int
) -> None:
    assert [r["index"] for r in results] == list(range(len(probs)))
    for result, p, c in zip(results, probs, cos, strict=True):
        order = np.argsort(-p, kind="stable")[:top_k]
        assert [x["label"] for x in result["labels"]] == [labels[j] for j in order]
        np.testing.assert_allclose([x["score"] for x in result["labels"]], p[order], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose([x["similarity"] for x in result["labels"]], c[order], atol=1e-5)


def test_classify_scores_follow_the_definition(client) -> None:
    response = client.post("/v1/classify", json={"images": IMAGES, "labels": LABELS, "top_k": 3})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["model"], body["version"], body["dim"]) == ("tiny", 1, 32)
    probs, cos = expected_scores(client, LABELS, DEFAULT_TEMPLATES)
    check_results(body["results"], probs, cos, LABELS, 3)
    full = client.post("/v1/classify", json={"images": IMAGES[:1], "labels": LABELS, "top_k": 50}).json()
    assert len(full["results"][0]["labels"]) == len(LABELS)
    assert sum(x["score"] for x in full["results"][0]["labels"]) == pytest.approx(1.0, abs=1e-5)


def test_custom_and_named_templates(client) -> None:
    custom = ("a {} in the wild", "{} close up")
    body = client.post(
        "/v1/classify", json={"images": IMAGES, "labels": LABELS, "templates": list(custom)}
    ).json()
    check_results(body["results"], *expected_scores(client, LABELS, custom), LABELS, 5)
    imagenet = builtin_templates()["imagenet80"]
    assert len(imagenet) == 80
    body = client.post(
        "/v1/classify", json={"images": IMAGES, "labels": LABELS[:2], "templates": "imagenet80"}
    ).json()
    check_results(body["results"], *expected_scores(client, LABELS[:2], imagenet), LABELS[:2], 5)


def test_repeated_labels_need_no_text_encoder(client) -> None:
    payload = {"images": IMAGES[:1], "labels": [unique("zebra"), unique("okapi")]}
    client.post("/v1/classify", json=payload)
    before = text_calls(client)
    assert client.post("/v1/classify", json=payload).status_code == 200
    assert text_calls(client) == before


def test_labelset_lifecycle(client) -> None:
    name = unique("animals")
    put = client.put(f"/v1/labelsets/{name}", json={"labels": LABELS, "templates": ["a photo of a {}."]})
    assert put.status_code == 200, put.text
    assert (
        put.json()["status"] == "ready"
        and put.json()["label_count"] == len(LABELS)
        and put.json()["labels"] == LABELS
    )
    got = client.get(f"/v1/labelsets/{name}").json()
    assert got["labels"] == LABELS and got["templates"] == ["a photo of a {}."] and got["model"] == "tiny"
    assert name in [s["name"] for s in client.get("/v1/labelsets").json()["labelsets"]]
    by_set = client.post("/v1/classify", json={"images": IMAGES, "labelset": name}).json()
    by_labels = client.post(
        "/v1/classify", json={"images": IMAGES, "labels": LABELS, "templates": ["a photo of a {}."]}
    ).json()
    assert by_set == by_labels
    assert client.delete(f"/v1/labelsets/{name}").status_code == 204
    assert client.get(f"/v1/labelsets/{name}").status_code == 404


def test_second_instance_classifies_with_zero_text_encoder_calls(make_client) -> None:
    name = unique("shared")
    first, second = make_client(), make_client()
    labels = [unique(label) for label in LABELS]
    assert first.put(f"/v1/labelsets/{name}", json={"labels": labels}).status_code == 200
    assert text_calls(first) > 0
    assert text_calls(second) == 0
    response = second.post("/v1/classify", json={"images": IMAGES, "labelset": name})
    assert response.status_code == 200
    assert text_calls(second) == 0
    assert (
        response.json()["results"]
        == first.post("/v1/classify", json={"images": IMAGES, "labelset": name}).json()["results"]
    )
    assert second.get(f"/v1/labelsets/{name}").json()["status"] == "ready"


def test_every_request_succeeds_with_redis_unreachable(make_client, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="clipserve.cache"):
        client = make_client(redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_retry_s=0.5)
        name = unique("offline")
        responses = [
            client.post("/v1/embed", json={"texts": ["a", "b"], "images": IMAGES}),
            client.post("/v1/embeddings", json={"input": ["a"], "model": "tiny"}),
            client.put(f"/v1/labelsets/{name}", json={"labels": LABELS}),
            client.get("/v1/labelsets"),
            client.get(f"/v1/labelsets/{name}"),
            client.post("/v1/classify", json={"images": IMAGES, "labelset": name}),
            client.post("/v1/classify", json={"images": IMAGES, "labels": LABELS}),
            client.post("/v1/classify", json={"images": IMAGES, "labels": LABELS}),
            client.delete(f"/v1/labelsets/{name}"),
        ]
    assert [r.status_code for r in responses] == [200, 200, 200, 200, 200, 200, 200, 200, 204]
    assert any("Redis unavailable" in r.message for r in caplog.records)
    assert "clipserve_cache_fallback 1.0" in client.get("/metrics").text


@pytest.mark.slow
def test_10000_labels_by_80_templates_build_in_batches_with_progress(make_client, micro_repo, caplog) -> None:
    client = make_client(models_dir=micro_repo, labelset_chunk_texts=8000, intra_op_threads=2)
    name = unique("big")
    labels = [f"thing number {i}" for i in range(10_000)]
    with caplog.at_level("INFO", logger="clipserve.labelsets"):
        put = client.put(f"/v1/labelsets/{name}", json={"labels": labels, "templates": "imagenet80"})
        assert put.status_code == 202 and put.json()["status"] == "building"
        busy = client.post("/v1/classify", json={"images": IMAGES[:1], "labelset": name})
        assert busy.status_code in (200, 409)
        deadline = time.monotonic() + 600
        while True:
            response = client.get(f"/v1/labelsets/{name}")
            assert response.status_code == 200, response.text
            if (info := response.json())["status"] != "building":
                break
            assert time.monotonic() < deadline
            time.sleep(1)
    assert info["status"] == "ready", info
    progress = [r.message for r in caplog.records if name in r.message and "/10000 labels" in r.message]
    assert len(progress) >= 2 and progress[-1].split(": ")[1].startswith("10000/10000")
    result = client.post("/v1/classify", json={"images": IMAGES[:1], "labelset": name, "top_k": 3}).json()
    assert len(result["results"][0]["labels"]) == 3
    client.delete(f"/v1/labelsets/{name}")
