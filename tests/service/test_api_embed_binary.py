"""POST /v1/embed with one image as the whole body (`Content-Type: image/...`): the same vectors as
base64 JSON, and clear 4xx answers for what is wrong, through the real app and ONNX Runtime."""

from __future__ import annotations

import base64

import numpy as np

from tests.fixtures.service import b64, image_bytes


def test_an_image_body_gives_the_vectors_of_base64_json(client) -> None:
    data = image_bytes(seed=5, fmt="JPEG")
    plain = client.post("/v1/embed", json={"images": [b64(data)]}).json()
    binary = client.post("/v1/embed", content=data, headers={"Content-Type": "image/jpeg"})
    assert binary.status_code == 200, binary.text
    body = binary.json()
    assert body["text_embeddings"] == [] and body["model"] == plain["model"]
    np.testing.assert_allclose(body["image_embeddings"], plain["image_embeddings"], atol=1e-6)

    png = image_bytes(seed=5, fmt="PNG")
    reduced = client.post(
        "/v1/embed?model=tiny@1&dimensions=8&encoding_format=base64",
        content=png,
        headers={"Content-Type": "image/png"},
    )
    assert reduced.status_code == 200, reduced.text
    vector = np.frombuffer(base64.b64decode(reduced.json()["image_embeddings"][0]), dtype="<f4")
    assert reduced.json()["dim"] == 8 and vector.shape == (8,)
    np.testing.assert_allclose(np.linalg.norm(vector), 1.0, atol=1e-5)


def test_a_bad_image_body_is_a_clear_4xx(client) -> None:
    headers = {"Content-Type": "image/jpeg"}
    empty = client.post("/v1/embed", content=b"", headers=headers)
    assert empty.status_code == 400 and "empty" in empty.json()["error"]["message"]
    garbage = client.post("/v1/embed", content=b"not an image at all", headers=headers)
    assert garbage.status_code == 400 and "image" in garbage.json()["error"]["message"]
    unknown = client.post("/v1/embed?texts=a", content=image_bytes(1), headers=headers)
    assert (
        unknown.status_code == 422 and "unknown query parameters: texts" in unknown.json()["error"]["message"]
    )
    bad_dim = client.post("/v1/embed?dimensions=x", content=image_bytes(1), headers=headers)
    assert bad_dim.status_code in (400, 422) and "dimensions" in bad_dim.text
    missing = client.post("/v1/embed?model=nope", content=image_bytes(1), headers=headers)
    assert missing.status_code == 404
