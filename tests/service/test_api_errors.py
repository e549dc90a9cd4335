"""Every bad input gets a 4xx whose message says what was wrong, and the server keeps serving."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator

import pytest

from tests.fixtures.service import LOCAL_URL, b64, image_bytes, png_claiming

GOOD = b64(image_bytes(seed=11))


@pytest.fixture(scope="module")
def shared_client(tiny_repo, service_redis_url) -> Iterator[object]:
    from fastapi.testclient import TestClient

    from clipserve.service.app import create_app
    from clipserve.service.settings import Settings

    settings = Settings(
        models_dir=tiny_repo,
        redis_url=service_redis_url,
        intra_op_threads=1,
        preprocess_workers=2,
        reload_poll_s=0,
        max_body_bytes=2_000_000,
        log_format="text",
    )
    with TestClient(create_app(settings), base_url=LOCAL_URL, raise_server_exceptions=False) as client:
        yield client


def expect_error(response, status: int, *words: str, index: int | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) <= {"type", "message", "index"} and error["type"] and error["message"]
    for word in words:
        assert word.lower() in error["message"].lower(), error["message"]
    if index is not None:
        assert error.get("index") == index
    assert "Traceback" not in response.text
    return error


@pytest.fixture(autouse=True)
def still_serving(shared_client) -> Iterator[None]:
    yield
    assert shared_client.post("/v1/embed", json={"images": [GOOD], "texts": ["ok"]}).status_code == 200


@pytest.mark.parametrize(
    ("image", "status", "words"),
    [
        ("not base64 at all!!", 400, ["not valid base64"]),
        (b64(b"plain bytes, not a picture"), 400, ["not an image"]),
        (b64(image_bytes(seed=2, size=(64, 64), fmt="JPEG")[:400]), 400, ["cannot be decoded"]),
        (b64(png_claiming(20000, 20000)), 413, ["too large"]),
        ("", 400, ["empty"]),
        ("data:image/png,notbase64", 400, ["data URI"]),
        ("https://example.com/cat.jpg", 400, ["URL", "turned off"]),
    ],
    ids=[
        "invalid-base64",
        "not-an-image",
        "truncated-jpeg",
        "20000x20000-png",
        "empty-string",
        "data-uri-no-b64",
        "url-when-off",
    ],
)
def test_bad_image(shared_client, image: str, status: int, words: list[str]) -> None:
    response = shared_client.post("/v1/embed", json={"images": [image]})
    expect_error(response, status, *words, index=0)


def test_one_bad_image_in_eight_names_its_index(shared_client) -> None:
    images = [b64(image_bytes(seed=i)) for i in range(8)]
    images[5] = b64(b"GIF89a broken")
    expect_error(shared_client.post("/v1/embed", json={"images": images}), 400, "image 5", index=5)
    expect_error(
        shared_client.post("/v1/classify", json={"images": images, "labels": ["a", "b"]}), 400, index=5
    )


def test_nothing_to_embed(shared_client) -> None:
    expect_error(shared_client.post("/v1/embed", json={"images": []}), 422, "nothing to embed")
    expect_error(shared_client.post("/v1/embed", json={}), 422, "nothing to embed")


def test_empty_text(shared_client) -> None:
    expect_error(
        shared_client.post("/v1/embed", json={"texts": ["fine", " "]}), 422, "texts[1]", "empty", index=1
    )


def test_100000_character_text(shared_client) -> None:
    response = shared_client.post("/v1/embed", json={"texts": ["x" * 100_000]})
    expect_error(response, 413, "texts[0]", "100000 characters", index=0)


@pytest.mark.parametrize(
    ("labels", "words", "index"),
    [
        ([], ["empty"], None),
        (["cat", "dog", "cat"], ["labels[2]", "duplicates labels[0]"], 2),
        (["cat", ""], ["labels[1]", "empty"], 1),
    ],
    ids=["empty-list", "duplicated", "empty-label"],
)
def test_bad_labels(shared_client, labels: list[str], words: list[str], index: int | None) -> None:
    response = shared_client.post("/v1/classify", json={"images": [GOOD], "labels": labels})
    expect_error(response, 422, *words, index=index)
    response = shared_client.put("/v1/labelsets/bad-labels", json={"labels": labels})
    expect_error(response, 422, *words)


def test_unknown_model_and_label_set(shared_client) -> None:
    expect_error(
        shared_client.post("/v1/embed", json={"model": "nope", "texts": ["a"]}), 404, "'nope'", "tiny@1"
    )
    expect_error(shared_client.post("/v1/embed", json={"model": "bad name!", "texts": ["a"]}), 422, "model")
    response = shared_client.post("/v1/classify", json={"images": [GOOD], "labelset": "never-made"})
    expect_error(response, 404, "never-made")
    expect_error(shared_client.get("/v1/labelsets/never-made"), 404, "never-made")
    expect_error(shared_client.delete("/v1/labelsets/never-made"), 404, "never-made")


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        ({"texts": "a single string"}, ["texts", "array"]),
        ({"texts": [1, 2]}, ["texts[0]", "string"]),
        ({"images": {"a": 1}}, ["images", "array"]),
        ({"texts": ["a"], "encoding_format": "hex"}, ["encoding_format"]),
        ({"texts": ["a"], "unexpected": True}, ["unexpected"]),
        ([1, 2, 3], ["body", "object"]),
    ],
    ids=["str-for-list", "ints", "object", "enum", "extra-field", "array-body"],
)
def test_wrong_json_types(shared_client, payload, words: list[str]) -> None:
    expect_error(shared_client.post("/v1/embed", json=payload), 422, *words)


def test_wrong_types_on_classify_and_openai(shared_client) -> None:
    response = shared_client.post("/v1/classify", json={"images": [GOOD], "labels": ["a"], "top_k": "many"})
    expect_error(response, 422, "top_k")
    response = shared_client.post("/v1/embeddings", json={"input": [[1, 2]], "model": "tiny"})
    expect_error(response, 422, "input")
    expect_error(shared_client.post("/v1/classify", json={"images": [], "labels": ["a"]}), 422, "images")
    response = shared_client.post("/v1/classify", json={"images": [GOOD], "labels": ["a"], "labelset": "x"})
    expect_error(response, 422, "exactly one")
    response = shared_client.post(
        "/v1/classify", json={"images": [GOOD], "labels": ["a"], "templates": ["no slot"]}
    )
    expect_error(response, 422, "templates[0]")
    response = shared_client.post(
        "/v1/classify", json={"images": [GOOD], "labels": ["a"], "templates": "nope"}
    )
    expect_error(response, 422, "unknown ensemble")


def test_invalid_json(shared_client) -> None:
    response = shared_client.post(
        "/v1/embed", content=b'{"texts": [', headers={"content-type": "application/json"}
    )
    expect_error(response, 422, "not valid JSON")


def test_oversized_body(shared_client) -> None:
    big = {"images": [b64(b"x" * 1_600_000)]}
    expect_error(shared_client.post("/v1/embed", json=big), 413, "2000000 bytes")

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds while streaming
        yield b'{"images": ["'
        for _ in range(30):
            yield b"A" * 100_000
        yield b'"]}'

    response = shared_client.post("/v1/embed", content=chunks(), headers={"content-type": "application/json"})
    expect_error(response, 413, "2000000 bytes")


def test_too_many_items(shared_client) -> None:
    expect_error(shared_client.post("/v1/embed", json={"texts": ["a"] * 513}), 413, "at most 512")
    expect_error(shared_client.post("/v1/embed", json={"images": [GOOD] * 65}), 413, "at most 64")


class _PictureHandler(http.server.BaseHTTPRequestHandler):
    picture = image_bytes(seed=21)

    def do_GET(self) -> None:
        if self.path.startswith("/redirect"):
            self.send_response(302)
            self.send_header("Location", "/redirect")
            self.end_headers()
            return
        body = self.picture * (100 if self.path == "/huge.png" else 1)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def picture_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _PictureHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join(5)


def test_url_to_a_private_address_is_refused(make_client, picture_server: str) -> None:
    client = make_client(url_fetch_enabled=True, url_allowed_hosts=["*"])
    response = client.post("/v1/embed", json={"images": [f"{picture_server}/a.png"]})
    expect_error(response, 400, "private or loopback", index=0)
    response = client.post("/v1/embed", json={"images": ["http://10.1.2.3/a.png"]})
    expect_error(response, 400, "private or loopback", index=0)


def test_url_rules_when_private_addresses_are_allowed(make_client, picture_server: str) -> None:
    client = make_client(
        url_fetch_enabled=True,
        url_allowed_hosts=["127.0.0.1"],
        url_allow_private=True,
        url_max_bytes=50_000,
        url_max_redirects=2,
    )
    fetched = client.post("/v1/embed", json={"images": [f"{picture_server}/a.png"]})
    inline = client.post("/v1/embed", json={"images": [b64(_PictureHandler.picture)]})
    assert (
        fetched.status_code == 200 and fetched.json()["image_embeddings"] == inline.json()["image_embeddings"]
    )
    expect_error(client.post("/v1/embed", json={"images": [f"{picture_server}/huge.png"]}), 400, "50000-byte")
    expect_error(client.post("/v1/embed", json={"images": [f"{picture_server}/redirect"]}), 400, "redirects")
    other_host = picture_server.replace("127.0.0.1", "localhost")
    expect_error(client.post("/v1/embed", json={"images": [f"{other_host}/a.png"]}), 400, "allowed hosts")
    by_name = make_client(url_fetch_enabled=True, url_allowed_hosts=["localhost"], url_allow_private=True)
    named = by_name.post("/v1/embed", json={"images": [f"{other_host}/a.png"]})
    assert named.status_code == 200 and named.json()["image_embeddings"] == inline.json()["image_embeddings"]
    userinfo = picture_server.replace("http://", "http://user:pw@")
    expect_error(client.post("/v1/embed", json={"images": [f"{userinfo}/a.png"]}), 400, "credentials")
