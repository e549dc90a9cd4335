"""/v1/collections through the ASGI app, on the tiny bundle, against both backends."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from clipserve.service.app import create_app
from tests.fixtures.collections import TEXTS, add_texts, embed_texts, post_json, search_ids
from tests.fixtures.service import LOCAL_URL, b64, image_bytes


@pytest.fixture(params=["embedded", "pgvector"])
def backend_settings(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, object]:
    settings: dict[str, object] = {"data_dir": tmp_path / "data", "collections_backend": request.param}
    if request.param == "pgvector":
        settings["postgres_dsn"] = request.getfixturevalue("postgres_schema_dsn")
    return settings


@pytest.fixture
def api(make_client, backend_settings):
    return make_client(**backend_settings)


def test_collection_crud(api):
    created = api.post(
        "/v1/collections", json={"name": "things", "index": "hnsw", "index_params": {"ef_search": 64}}
    )
    assert created.status_code == 201, created.text
    info = created.json()
    assert (info["name"], info["count"], info["model"], info["version"], info["dim"]) == (
        "things",
        0,
        "tiny",
        1,
        32,
    )
    assert info["index"]["kind"] == "hnsw" and info["index"]["ef_search"] == 64
    assert info["model_status"] == "current" and len(info["content_hash"]) == 64
    assert api.post("/v1/collections", json={"name": "things"}).status_code == 409
    assert (
        api.post(
            "/v1/collections", json={"name": "other", "index": "ivf", "index_params": {"nlist": 8}}
        ).status_code
        == 201
    )

    add_texts(api, "things")
    image = b64(image_bytes(3))
    vector = embed_texts(api, ["anything"])[0].tolist()
    response = api.post(
        "/v1/collections/things/items",
        json={
            "items": [
                {"id": "img", "image": image, "metadata": {"kind": "photo"}},
                {"id": 7, "vector": vector},
            ]
        },
    )
    assert response.json() == {"upserted": 2}
    described = api.get("/v1/collections/things").json()
    assert described["count"] == len(TEXTS) + 2
    assert [c["name"] for c in api.get("/v1/collections").json()["collections"]] == ["other", "things"]

    item = api.get("/v1/collections/things/items/t1").json()
    assert item["metadata"] == {"n": 1, "even": False}
    assert item["source"] == {"kind": "text", "value": TEXTS[1]}
    np.testing.assert_allclose(item["vector"], embed_texts(api, [TEXTS[1]])[0], atol=1e-5)
    # an inline image keeps its original bytes, by content
    digest = hashlib.sha256(image_bytes(3)).hexdigest()
    assert api.get("/v1/collections/things/items/img").json()["source"] == {
        "kind": "image",
        "value": f"sha256:{digest}",
    }
    assert api.get("/v1/collections/things/items/7").json()["id"] == "7"

    assert api.delete("/v1/collections/things/items/t1").json() == {"id": "t1", "deleted": True}
    missing = api.get("/v1/collections/things/items/t1")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "item_not_found"
    assert api.delete("/v1/collections/things/items/t1").status_code == 404
    assert api.delete("/v1/collections/things").json() == {"name": "things", "deleted": True}
    gone = api.get("/v1/collections/things")
    assert gone.status_code == 404 and gone.json()["error"] == {
        "type": "collection_not_found",
        "message": "no collection named 'things'",
    }


def test_search_by_text_image_and_vector(api):
    api.post("/v1/collections", json={"name": "c"})
    add_texts(api, "c")
    images = [b64(image_bytes(seed)) for seed in range(3)]
    response = api.post(
        "/v1/collections/c/items",
        json={"items": [{"id": f"i{k}", "image": img} for k, img in enumerate(images)]},
    )
    assert response.status_code == 200, response.text
    embedded = api.post("/v1/embed", json={"texts": [*TEXTS, "a car"], "images": images}).json()
    matrix = np.array(embedded["text_embeddings"][:-1] + embedded["image_embeddings"], dtype=np.float32)
    ids = [f"t{i}" for i in range(len(TEXTS))] + [f"i{k}" for k in range(3)]

    def expected(query: np.ndarray, top_k: int) -> list[str]:
        return [ids[i] for i in np.argsort(-(matrix @ query), kind="stable")[:top_k]]

    by_text = post_json(api, "/v1/collections/c/search", {"text": "a car", "top_k": 4}).json()
    assert (by_text["model"], by_text["version"], by_text["dim"]) == ("tiny", 1, 32)
    assert [r["id"] for r in by_text["results"]] == expected(np.array(embedded["text_embeddings"][-1]), 4)
    np.testing.assert_allclose(
        [r["score"] for r in by_text["results"]],
        np.sort(matrix @ np.array(embedded["text_embeddings"][-1]))[::-1][:4],
        atol=1e-5,
    )
    assert search_ids(api, "c", {"image": images[1], "top_k": 3})[0] == "i1"
    assert search_ids(api, "c", {"vector": (matrix[2] * 5).tolist(), "top_k": 2})[0] == "t2"
    default_top_k = search_ids(api, "c", {"text": "a car"})
    assert len(default_top_k) == len(ids)  # top_k defaults to 10, and there are 9 items


def test_search_filters(api):
    api.post("/v1/collections", json={"name": "c"})
    add_texts(api, "c")
    hits = post_json(api, "/v1/collections/c/search", {"text": "a car", "filter": {"even": True}}).json()[
        "results"
    ]
    assert sorted(h["id"] for h in hits) == ["t0", "t2", "t4"]
    assert all(h["metadata"]["even"] is True for h in hits)
    assert search_ids(api, "c", {"text": "a car", "filter": {"n": 3, "even": False}}) == ["t3"]
    # a field no item has: empty results, not an error
    assert search_ids(api, "c", {"text": "a car", "filter": {"colour": "red"}}) == []
    bad = post_json(api, "/v1/collections/c/search", {"text": "a car", "filter": {"n": [1, 2]}})
    assert (
        bad.status_code == 422
        and "only strings, numbers, booleans and null" in bad.json()["error"]["message"]
    )


BAD_INPUT = [
    (
        "/v1/collections/nope/items",
        {"items": [{"id": "a", "text": "x"}]},
        404,
        "no collection named 'nope'",
        None,
    ),
    ("/v1/collections/nope/search", {"text": "x"}, 404, "no collection named 'nope'", None),
    (
        "/v1/collections/c/items",
        {"items": [{"id": "a", "text": "x"}, {"text": "y"}]},
        422,
        "items[1].id",
        1,
    ),
    ("/v1/collections/c/items", {"items": [{"id": "a", "vector": [0.5] * 31}]}, 422, "31 dimensions", 0),
    (
        "/v1/collections/c/items",
        {"items": [{"id": "a", "text": "x"}, {"id": "b", "vector": [float("nan")] * 32}]},
        422,
        "vector 1 contains NaN or infinity",
        1,
    ),
    (
        "/v1/collections/c/items",
        {"items": [{"id": "a", "vector": [float("inf")] + [0.1] * 31}]},
        422,
        "NaN or infinity",
        0,
    ),
    (
        "/v1/collections/c/items",
        {"items": [{"id": "", "text": "x"}]},
        422,
        "id must be a non-empty string",
        0,
    ),
    (
        "/v1/collections/c/items",
        {"items": [{"id": "a", "text": "x", "vector": [1.0] * 32}]},
        422,
        "name the bundle that made the vector with content_hash",
        0,
    ),
    ("/v1/collections/c/items", {"items": []}, 422, "items", None),
    (
        "/v1/collections/c/items",
        {"items": [{"id": "a", "text": " "}]},
        422,
        "items[0].text is an empty string",
        0,
    ),
    (
        "/v1/collections/c/items",
        {"items": [{"id": "a", "image": "!!"}]},
        400,
        "items[0].image is not valid",
        0,
    ),
    ("/v1/collections/c/search", {"text": "x", "top_k": 0}, 422, "top_k must be at least 1", None),
    ("/v1/collections/c/search", {"text": "x", "top_k": -1}, 422, "top_k must be at least 1", None),
    ("/v1/collections/c/search", {"text": "x", "top_k": 1001}, 422, "over the limit of 1000", None),
    ("/v1/collections/c/search", {"vector": [0.1] * 8}, 422, "8 dimensions", None),
    ("/v1/collections/c/search", {"vector": [float("nan")] * 32}, 422, "NaN or infinity", None),
    ("/v1/collections/c/search", {"top_k": 3}, 422, "exactly one of text, image or vector", None),
    ("/v1/collections", {"name": "c"}, 409, "'c' already exists", None),
    ("/v1/collections", {"name": "../x"}, 422, "invalid collection name", None),
    ("/v1/collections", {"name": "x", "index": "annoy"}, 422, "index", None),
    (
        "/v1/collections",
        {"name": "x", "index": "ivf", "index_params": {"nlist": 4, "nprobe": 8}},
        422,
        "nprobe (8) cannot exceed nlist (4)",
        None,
    ),
    (
        "/v1/collections",
        {"name": "x", "index": "hnsw", "index_params": {"m": 0}},
        422,
        "index_params.m",
        None,
    ),
    ("/v1/collections", {"name": "x", "model": "absent"}, 404, "not served", None),
]


def test_bad_input_is_a_clear_4xx(api):
    """Every case on one app (starting one per case costs more than the cases)."""
    assert api.post("/v1/collections", json={"name": "c"}).status_code == 201
    for url, body, status, message, index in BAD_INPUT:
        response = post_json(api, url, body)
        assert response.status_code == status, (body, response.text)
        error = response.json()["error"]
        assert message in error["message"], (body, error)
        assert error.get("index") == index, (body, error)
    assert api.get("/v1/collections/c").json()["count"] == 0  # nothing half-written


def test_duplicate_ids_in_one_call_last_wins(api):
    api.post("/v1/collections", json={"name": "c"})
    items = [
        {"id": "a", "text": "first", "metadata": {"v": 1}},
        {"id": "a", "text": "second", "metadata": {"v": 2}},
    ]
    assert api.post("/v1/collections/c/items", json={"items": items}).json() == {"upserted": 1}
    item = api.get("/v1/collections/c/items/a").json()
    assert item["metadata"] == {"v": 2} and item["source"]["value"] == "second"


def test_item_ids_may_contain_slashes(api):
    api.post("/v1/collections", json={"name": "c"})
    api.post("/v1/collections/c/items", json={"items": [{"id": "photos/2024/cat.jpg", "text": "a cat"}]})
    assert api.get("/v1/collections/c/items/photos/2024/cat.jpg").json()["id"] == "photos/2024/cat.jpg"
    assert api.delete("/v1/collections/c/items/photos/2024/cat.jpg").status_code == 200


def test_collections_survive_an_app_restart(make_settings, backend_settings):
    settings = make_settings(**backend_settings)
    with TestClient(create_app(settings), base_url=LOCAL_URL) as first:
        first.post("/v1/collections", json={"name": "kept", "index": "hnsw"})
        add_texts(first, "kept")
        before = search_ids(first, "kept", {"text": "a boat", "top_k": 3})
    with TestClient(create_app(settings), base_url=LOCAL_URL) as second:
        assert second.get("/v1/collections/kept").json()["count"] == len(TEXTS)
        assert search_ids(second, "kept", {"text": "a boat", "top_k": 3}) == before


def test_unavailable_backend_is_a_503_and_the_rest_still_serves(make_client):
    api = make_client(collections_backend="pgvector", postgres_dsn=None)
    response = api.get("/v1/collections")
    assert response.status_code == 503
    assert "needs a PostgreSQL DSN" in response.json()["error"]["message"]
    assert api.post("/v1/embed", json={"texts": ["still here"]}).status_code == 200


def test_store_opens_on_first_use(make_client, tmp_path):
    api = make_client(data_dir=tmp_path / "data")
    assert api.post("/v1/embed", json={"texts": ["no collections here"]}).status_code == 200
    assert not (tmp_path / "data").exists()
    assert api.get("/v1/collections").json() == {"collections": []}
    assert (tmp_path / "data" / "collections" / "collections.sqlite3").is_file()


def test_vectors_made_elsewhere_keep_their_sources(api):
    api.post("/v1/collections", json={"name": "bulk"})
    content_hash = api.get("/v1/models").json()["data"][0]["content_hash"]
    photo = image_bytes(8)
    text_vector = embed_texts(api, ["a made-up vector's text"])[0]
    image_vector = np.array(
        api.post("/v1/embed", json={"images": [b64(photo)]}).json()["image_embeddings"][0]
    )
    items = [
        {"id": "t", "text": "a made-up vector's text", "vector": text_vector.tolist(), "metadata": {"k": 1}},
        {"id": "i", "image": b64(photo), "vector": image_vector.tolist()},
    ]
    response = api.post("/v1/collections/bulk/items", json={"items": items, "content_hash": content_hash})
    assert response.json() == {"upserted": 2}, response.text
    text_item = api.get("/v1/collections/bulk/items/t").json()
    assert text_item["source"] == {"kind": "text", "value": "a made-up vector's text"}
    assert text_item["metadata"] == {"k": 1}
    np.testing.assert_allclose(text_item["vector"], text_vector, atol=1e-6)
    image_item = api.get("/v1/collections/bulk/items/i").json()
    assert image_item["source"]["value"] == f"sha256:{hashlib.sha256(photo).hexdigest()}"
    hits = search_ids(api, "bulk", {"image": b64(photo), "top_k": 1})
    assert hits == ["i"]

    unnamed = api.post("/v1/collections/bulk/items", json={"items": items})
    assert unnamed.status_code == 422 and "content_hash" in unnamed.json()["error"]["message"]
    assert unnamed.json()["error"]["index"] == 0
    other = api.post("/v1/collections/bulk/items", json={"items": items, "content_hash": "0" * 64})
    assert other.status_code == 409 and other.json()["error"]["type"] == "model_mismatch"
    both = api.post(
        "/v1/collections/bulk/items",
        json={"items": [{"id": "x", "text": "a", "image": b64(photo), "vector": text_vector.tolist()}]},
    )
    assert both.status_code == 422 and "exactly one of text or image" in both.text


def test_inline_image_bytes_have_a_limit_per_collection(make_client, backend_settings):
    api = make_client(max_collection_image_bytes=int(len(image_bytes(1)) * 1.5), **backend_settings)
    api.post("/v1/collections", json={"name": "small"})
    first = api.post(
        "/v1/collections/small/items", json={"items": [{"id": "a", "image": b64(image_bytes(1))}]}
    )
    assert first.status_code == 200, first.text
    again = api.post(
        "/v1/collections/small/items", json={"items": [{"id": "b", "image": b64(image_bytes(1))}]}
    )
    assert again.status_code == 200, again.text  # the same bytes are kept once
    full = api.post(
        "/v1/collections/small/items", json={"items": [{"id": "c", "image": b64(image_bytes(2))}]}
    )
    assert full.status_code == 413, full.text
    assert full.json()["error"]["type"] == "collection_images_too_large"
    assert "limit" in full.json()["error"]["message"]
    assert api.get("/v1/collections/small").json()["count"] == 2
