"""The bulk encoder (service/inference/bulk.py): the service's vectors, batch by batch, without a
request; one bad item is an error of its own and never fails the call."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from clipserve.service.errors import InvalidImage
from clipserve.service.inference.bulk import BulkEncoder, bulk_settings
from tests.fixtures.service import b64, image_bytes

TEXTS = ["a red car", "a blue boat on a lake at dawn", "a tree", "x" * 40]


@pytest.fixture(scope="module")
def encoder(tiny_repo):
    encoder = BulkEncoder.load(tiny_repo, "tiny", threads=1, batch_size=3)
    yield encoder
    encoder.close()


def served_vectors(client, texts: list[str], images: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    response = client.post("/v1/embed", json={"texts": texts, "images": [b64(i) for i in images]})
    assert response.status_code == 200, response.text
    body = response.json()
    return np.array(body["text_embeddings"], np.float32), np.array(body["image_embeddings"], np.float32)


def test_bulk_vectors_are_the_served_ones(encoder: BulkEncoder, client):
    images = [image_bytes(seed, size=(40 + 7 * seed, 33)) for seed in range(7)]
    images.append(image_bytes(9, fmt="JPEG", size=(300, 200)))
    texts, pictures = served_vectors(client, TEXTS, images)
    bulk_images = encoder.encode_images(images)
    bulk_texts = encoder.encode_texts(TEXTS)
    assert not bulk_images.errors and not bulk_texts.errors
    assert bulk_images.vectors.shape == (len(images), 32)
    np.testing.assert_allclose(np.linalg.norm(bulk_images.vectors, axis=1), 1.0, atol=1e-5)
    assert np.min(np.sum(bulk_images.vectors * pictures, axis=1)) >= 0.9999
    assert np.min(np.sum(bulk_texts.vectors * texts, axis=1)) >= 0.9999
    assert encoder.content_hash == client.get("/v1/models").json()["data"][0]["content_hash"]


def test_bad_items_are_errors_and_the_rest_is_encoded(tiny_repo, client):
    encoder = BulkEncoder.load(
        tiny_repo,
        "tiny@1",
        threads=1,
        batch_size=2,
        settings=bulk_settings(max_image_pixels=10_000, max_text_chars=20),
    )
    bomb = io.BytesIO()
    Image.new("L", (200, 200)).save(bomb, format="PNG")
    good = [image_bytes(1), image_bytes(2)]
    items = [good[0], b"", b"not an image", bomb.getvalue(), InvalidImage("image 4: refused"), good[1]]
    result = encoder.encode_images(items)
    codes = {error.index: error.code for error in result.errors}
    assert codes == {1: "invalid_image", 2: "invalid_image", 3: "image_too_large", 4: "invalid_image"}
    assert result.ok.tolist() == [True, False, False, False, False, True]
    assert not result.vectors[~result.ok].any()
    _, served = served_vectors(client, [], good)
    assert np.min(np.sum(result.vectors[result.ok] * served, axis=1)) >= 0.9999
    texts = encoder.encode_texts(["a dog", "", "y" * 21, "a cat"])
    assert {error.index: error.code for error in texts.errors} == {1: "invalid_request", 2: "text_too_long"}
    assert texts.ok.tolist() == [True, False, False, True]
    encoder.close()


def test_bulk_settings_ignore_the_servers_environment(monkeypatch):
    monkeypatch.setenv("CLIPSERVE_MAX_TEXT_CHARS", "5")
    assert bulk_settings().max_text_chars == 2000
    assert bulk_settings(max_text_chars=7).max_text_chars == 7
