"""The card's paths (`POST /embed`, `POST /classify`), `dimensions` everywhere it is accepted, and the
scoring a response names."""

from __future__ import annotations

import numpy as np
import pytest

from tests.fixtures.service import b64, image_bytes

IMAGES = [b64(image_bytes(seed=s)) for s in range(2)]
LABELS = ["cat", "dog", "car"]


def test_the_cards_paths_answer_exactly_as_the_v1_routes(make_client) -> None:
    client = make_client()
    embed = {"texts": ["a cat"], "images": IMAGES[:1]}
    assert client.post("/embed", json=embed).json() == client.post("/v1/embed", json=embed).json()
    classify = {"images": IMAGES, "labels": LABELS, "top_k": 2}
    card, v1 = client.post("/classify", json=classify), client.post("/v1/classify", json=classify)
    assert card.status_code == 200 and card.json() == v1.json() and card.json()["scoring"] == "softmax"
    bad = client.post("/classify", json={"images": IMAGES, "labels": []})
    assert (
        bad.status_code == 422
        and bad.json() == client.post("/v1/classify", json={"images": IMAGES, "labels": []}).json()
    )
    multipart = client.post("/embed", files=[("images", ("a.png", image_bytes(seed=0), "image/png"))])
    assert multipart.status_code == 200 and len(multipart.json()["image_embeddings"]) == 1
    metrics = client.get("/metrics").text
    assert 'route="/embed"' in metrics and 'route="/classify"' in metrics
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/embed", "/classify", "/v1/embed", "/v1/classify"} <= set(paths)


def test_the_cards_paths_need_the_key_like_the_rest(make_client) -> None:
    client = make_client(api_keys=["k-1"])
    assert client.post("/embed", json={"texts": ["x"]}).status_code == 401
    assert client.post("/classify", json={"images": IMAGES, "labels": LABELS}).status_code == 401
    ok = client.post("/embed", json={"texts": ["x"]}, headers={"Authorization": "Bearer k-1"})
    assert ok.status_code == 200


def test_embed_dimensions_as_json_and_multipart(make_client) -> None:
    client = make_client()
    full = client.post("/v1/embed", json={"texts": ["a cat"], "images": IMAGES[:1]}).json()
    short = client.post("/v1/embed", json={"texts": ["a cat"], "images": IMAGES[:1], "dimensions": 4}).json()
    assert short["dim"] == 4 and full["dim"] == 32
    for kind in ("text_embeddings", "image_embeddings"):
        head = np.array(full[kind][0][:4])
        np.testing.assert_allclose(short[kind][0], head / np.linalg.norm(head), atol=1e-6)
    form = client.post("/v1/embed", files={"texts": (None, "a cat"), "dimensions": (None, "4")})
    np.testing.assert_allclose(form.json()["text_embeddings"][0], short["text_embeddings"][0], atol=1e-6)


@pytest.mark.parametrize("value", [0, -3, 33, 2.5, "eight"])
def test_dimensions_out_of_range_or_not_whole_are_refused_naming_the_range(make_client, value) -> None:
    client = make_client()
    for path, body in (
        ("/v1/embed", {"texts": ["a cat"], "dimensions": value}),
        ("/v1/embeddings", {"model": "tiny", "input": "a cat", "dimensions": value}),
        ("/v1/collections", {"name": "short", "dimensions": value}),
    ):
        response = client.post(path, json=body)
        assert response.status_code == 422, (path, response.text)
        message = response.json()["error"]["message"]
        assert message.startswith("dimensions") and (
            "use 1 to 32" in message or "from 1 to the model's dim" in message
        )


def test_a_collection_can_keep_fewer_dimensions(make_client) -> None:
    client = make_client()
    created = client.post("/v1/collections", json={"name": "short-dims", "dimensions": 8})
    assert created.status_code == 201 and created.json()["dim"] == 8
    items = [{"id": label, "text": f"a photo of a {label}"} for label in LABELS]
    assert client.post("/v1/collections/short-dims/items", json={"items": items}).json() == {"upserted": 3}
    hits = client.post(
        "/v1/collections/short-dims/search", json={"text": "a photo of a dog", "top_k": 1}
    ).json()
    assert hits["results"][0]["id"] == "dog"
    assert len(client.get("/v1/collections/short-dims/items/dog").json()["vector"]) == 8
    vector = [0.1] * 8
    assert client.post("/v1/collections/short-dims/search", json={"vector": vector}).status_code == 200
    wrong = client.post(
        "/v1/collections/short-dims/items", json={"items": [{"id": "v", "vector": [0.1] * 32}]}
    )
    assert wrong.status_code == 422 and "space has 8" in wrong.json()["error"]["message"]


def test_rank_names_its_scoring_when_it_gives_probabilities(make_client) -> None:
    client = make_client()
    body = {"query": {"text": "a cat"}, "candidates": [{"text": "a cat"}, {"text": "a car"}]}
    assert "scoring" not in client.post("/v1/rank", json=body).json()
    ranked = client.post("/v1/rank", json={**body, "probabilities": True}).json()
    assert ranked["scoring"] == "softmax" and abs(sum(r["probability"] for r in ranked["results"]) - 1) < 1e-5
