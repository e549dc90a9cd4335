"""POST /v1/rank through the ASGI app, on the tiny exported bundle and real ONNX Runtime sessions."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.fixtures.service import b64, image_bytes

TEXTS = ["a photo of a cat", "a diagram", "two dogs on a beach", "the night sky"]


def embed(client, texts=None, images=None) -> tuple[np.ndarray, np.ndarray]:
    body = {"texts": texts or [], "images": images or []}
    response = client.post("/v1/embed", json={k: v for k, v in body.items() if v})
    assert response.status_code == 200, response.text
    data = response.json()
    return np.array(data["text_embeddings"], dtype=np.float32), np.array(
        data["image_embeddings"], dtype=np.float32
    )


def expected_order(query: np.ndarray, candidates: np.ndarray) -> tuple[list[int], np.ndarray]:
    scores = candidates @ query
    return np.argsort(-scores, kind="stable").tolist(), scores


def test_rank_by_text_matches_embed_cosines(client):
    text_vectors, _ = embed(client, texts=["a cat", *TEXTS])
    response = client.post(
        "/v1/rank", json={"query": {"text": "a cat"}, "candidates": [{"text": t} for t in TEXTS]}
    )
    assert response.status_code == 200, response.text
    data = response.json()
    assert (data["model"], data["version"], data["dim"]) == ("tiny", 1, 32)
    order, scores = expected_order(text_vectors[0], text_vectors[1:])
    assert [r["index"] for r in data["results"]] == order
    np.testing.assert_allclose([r["score"] for r in data["results"]], scores[order], atol=1e-5)
    assert all("probability" not in r for r in data["results"])


def test_rank_by_image_over_mixed_candidates_with_probabilities(client):
    images = [b64(image_bytes(seed)) for seed in range(3)]
    text_vectors, image_vectors = embed(client, texts=TEXTS[:2], images=images)
    candidates = [{"image": images[1]}, {"text": TEXTS[0]}, {"image": images[2]}, {"text": TEXTS[1]}]
    response = client.post(
        "/v1/rank",
        json={"query": {"image": images[0]}, "candidates": candidates, "probabilities": True, "top_k": 3},
    )
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    matrix = np.stack([image_vectors[1], text_vectors[0], image_vectors[2], text_vectors[1]])
    order, scores = expected_order(image_vectors[0], matrix)
    assert [r["index"] for r in results] == order[:3]
    logit_scale = client.get("/v1/models").json()["data"][0]["logit_scale"]
    logits = logit_scale * scores
    probabilities = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    np.testing.assert_allclose([r["probability"] for r in results], probabilities[order[:3]], atol=1e-5)


def test_rank_by_vector(client):
    text_vectors, _ = embed(client, texts=TEXTS)
    query = (text_vectors[2] * 3.0).tolist()  # any length: ranked by cosine
    response = client.post(
        "/v1/rank", json={"query": {"vector": query}, "candidates": [{"text": t} for t in TEXTS]}
    )
    assert response.status_code == 200, response.text
    top = response.json()["results"][0]
    assert top["index"] == 2 and top["score"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (
            {"query": {"vector": [0.1] * 5}, "candidates": [{"text": "x"}]},
            422,
            "5 dimensions, the model's space has 32",
        ),
        ({"query": {"vector": [float("nan")] * 32}, "candidates": [{"text": "x"}]}, 422, "NaN or infinity"),
        ({"query": {"vector": [0.0] * 32}, "candidates": [{"text": "x"}]}, 422, "all zeros"),
        (
            {"query": {"text": "a", "image": "b"}, "candidates": [{"text": "x"}]},
            422,
            "exactly one of text, image",
        ),
        ({"query": {}, "candidates": [{"text": "x"}]}, 422, "got none"),
        ({"query": {"text": "a"}, "candidates": []}, 422, "candidates"),
        (
            {"query": {"text": "a"}, "candidates": [{"text": "x", "image": "y"}]},
            422,
            "exactly one of text or image",
        ),
        (
            {"query": {"text": "a"}, "candidates": [{"text": "x"}, {"text": " "}]},
            422,
            "candidates[1].text is an empty",
        ),
        (
            {"query": {"text": "a"}, "candidates": [{"text": "x"}], "top_k": 0},
            422,
            "top_k must be at least 1",
        ),
        (
            {"query": {"text": "a"}, "candidates": [{"text": "x"}], "top_k": 5000},
            422,
            "over the limit of 1000",
        ),
        (
            {"query": {"text": "a"}, "candidates": [{"image": "%%%"}]},
            400,
            "candidates[0].image is not valid base64",
        ),
        ({"model": "nope", "query": {"text": "a"}, "candidates": [{"text": "x"}]}, 404, "not served"),
    ],
)
def test_rank_bad_input_is_a_clear_4xx(client, body, status, message):
    # json.dumps writes NaN as the bare token NaN, which clients do send
    response = client.post("/v1/rank", content=json.dumps(body), headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert message in response.json()["error"]["message"]


def test_rank_names_the_bad_candidate(client):
    candidates = [{"text": "fine"}, {"image": b64(image_bytes(0))}, {"image": "not base64!"}]
    response = client.post("/v1/rank", json={"query": {"text": "a"}, "candidates": candidates})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["index"] == 2 and error["message"].startswith("candidates[2].image is not valid base64")
