"""POST /v1/embed and the read-only endpoints, through the real app, ONNX Runtime and Redis."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.fixtures.service import LOCAL_URL, b64, image_bytes

TEXTS = ["a photo of a dog", "a diagram", "🙂 emoji and UPPER case", "a photo of a dog"]


def torch_embeddings(model, texts: list[str], images: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    import open_clip
    import torch
    from open_clip.transform import PreprocessCfg, image_transform_v2

    cfg = PreprocessCfg(**model.visual.preprocess_cfg)
    transform = image_transform_v2(cfg, is_train=False)
    pixels = torch.stack([transform(Image.open(io.BytesIO(data)).convert("RGB")) for data in images])
    with torch.no_grad():
        image = model.encode_image(pixels, normalize=True).numpy()
        text = model.encode_text(open_clip.tokenize(texts), normalize=True).numpy()
    return text, image


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_served_embeddings_match_the_torch_model(client, tiny_model) -> None:
    images = [
        image_bytes(seed=i, size=size, fmt=fmt)
        for i, (size, fmt) in enumerate(
            [
                ((48, 40), "PNG"),
                ((33, 90), "PNG"),
                ((64, 64), "JPEG"),
                ((120, 80), "WEBP"),
                ((400, 300), "JPEG"),
            ]
        )
    ]
    response = client.post("/v1/embed", json={"texts": TEXTS, "images": [b64(d) for d in images]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["model"], body["version"], body["dim"]) == ("tiny", 1, 32)
    served_text, served_image = np.array(body["text_embeddings"]), np.array(body["image_embeddings"])
    torch_text, torch_image = torch_embeddings(tiny_model, TEXTS, images)
    assert cosines(served_text, torch_text).min() >= 0.9999
    assert cosines(served_image, torch_image).min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(served_text, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(served_text[0], served_text[3], atol=1e-6)
    assert body["truncated"] == [False] * 4


def test_base64_vectors_are_float32_little_endian(client) -> None:
    payload = {"texts": ["a cat"], "images": [b64(image_bytes(1))]}
    floats = client.post("/v1/embed", json=payload).json()
    packed = client.post("/v1/embed", json={**payload, "encoding_format": "base64"}).json()
    for kind in ("text_embeddings", "image_embeddings"):
        decoded = np.frombuffer(base64.b64decode(packed[kind][0]), dtype="<f4")
        np.testing.assert_allclose(decoded, floats[kind][0], rtol=1e-6)


def test_data_uris_and_multipart_give_the_same_vectors(client) -> None:
    data = image_bytes(seed=7, fmt="JPEG")
    plain = client.post("/v1/embed", json={"images": [b64(data)], "texts": ["x ray"]}).json()
    uri = client.post("/v1/embed", json={"images": [f"data:image/jpeg;base64,{b64(data)}"]}).json()
    multipart = client.post(
        "/v1/embed", files=[("images", ("a.jpg", data, "image/jpeg"))], data={"texts": ["x ray"]}
    )
    assert multipart.status_code == 200, multipart.text
    for other in (uri, multipart.json()):
        np.testing.assert_allclose(other["image_embeddings"], plain["image_embeddings"], atol=1e-6)
    np.testing.assert_allclose(multipart.json()["text_embeddings"], plain["text_embeddings"], atol=1e-6)


def test_truncation_is_reported_per_text(client) -> None:
    long_text = " ".join(["word"] * 100)
    body = client.post("/v1/embed", json={"texts": ["short", long_text]}).json()
    assert body["truncated"] == [False, True] and body["image_embeddings"] == []


def test_model_by_name_and_version(client) -> None:
    assert client.post("/v1/embed", json={"model": "tiny@1", "texts": ["a"]}).status_code == 200
    missing = client.post("/v1/embed", json={"model": "tiny@7", "texts": ["a"]})
    assert missing.status_code == 404 and "tiny@1" in missing.json()["error"]["message"]


def test_int8_variant_is_served_when_asked(make_client) -> None:
    client = make_client(precision="int8")
    model = client.get("/v1/models").json()["data"][0]
    assert model["precision"] == {"image": "int8", "text": "int8"}
    assert client.post("/v1/embed", json={"texts": ["a cat"]}).status_code == 200


def test_models_health_metrics_and_docs(client) -> None:
    models = client.get("/v1/models").json()["data"]
    assert [(m["name"], m["version"], m["dim"], m["default"]) for m in models] == [("tiny", 1, 32, True)]
    assert len(models[0]["content_hash"]) == 64
    assert client.get("/livez").status_code == 200 and client.get("/readyz").json()["models"] == ["tiny@1"]
    client.post("/v1/embed", json={"texts": ["metrics please"], "images": [b64(image_bytes(2))]})
    metrics = client.get("/metrics").text
    for name in (
        "clipserve_request_seconds_bucket",
        "clipserve_batch_size_bucket",
        "clipserve_queue_depth",
        "clipserve_preprocess_seconds",
        "clipserve_inference_seconds",
        "clipserve_cache_requests_total",
    ):
        assert name in metrics
    assert 'route="/v1/embed"' in metrics
    schema = client.get("/openapi.json").json()
    embed_body = schema["paths"]["/v1/embed"]["post"]["requestBody"]["content"]
    assert set(embed_body) == {"application/json", "multipart/form-data", "image/*"}
    json_body, form_body = (
        embed_body["application/json"]["schema"],
        embed_body["multipart/form-data"]["schema"],
    )
    assert json_body["title"] == "EmbedRequest" and {"texts", "images", "model"} <= set(
        json_body["properties"]
    )
    assert form_body["title"] == "EmbedRequest (form)"
    assert form_body["properties"]["images"]["items"] == {"type": "string", "format": "binary"}
    for path in ("/v1/classify", "/v1/embeddings", "/v1/labelsets/{name}", "/v1/models", "/v1/admin/reload"):
        assert path in schema["paths"]
    assert client.get("/docs").status_code == 200
    assert client.get("/livez").headers["x-request-id"]


def test_the_service_never_imports_torch(tiny_repo: Path, service_redis_url: str) -> None:
    script = textwrap.dedent(f"""
        import sys
        from fastapi.testclient import TestClient
        from clipserve.service.app import create_app
        from clipserve.service.settings import Settings
        import clipserve.service.server.cli
        settings = Settings(models_dir={str(tiny_repo)!r}, redis_url={service_redis_url!r}, intra_op_threads=1,
                            preprocess_workers=1, reload_poll_s=0)
        with TestClient(create_app(settings), base_url={LOCAL_URL!r}) as client:
            assert client.post("/v1/embed", json={{"texts": ["a"]}}).status_code == 200
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "open_clip", "torchvision", "onnx"))
        print("LOADED", loaded)
        sys.exit(1 if loaded else 0)
    """)
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", ["/livez", "/readyz"])
def test_health_answers_json(client, path: str) -> None:
    assert client.get(path).json()["status"] in ("alive", "ready")
