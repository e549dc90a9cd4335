"""One input convention on every route that takes images or texts: JSON (base64, data URIs, URLs)
or multipart files; plain strings for text items; the same shape back as was given; an unknown
field answered with the closest known name. And the schema: every request field described with
an example, every route described, and each route's example answers 2xx on a fresh service."""

from __future__ import annotations

import json
import re

import pytest

from tests.fixtures.service import b64, image_bytes

LABELS = ["red circle", "blue square", "green triangle"]


def png(seed: int = 0) -> bytes:
    return image_bytes(seed)


def test_classify_takes_a_multipart_upload_and_answers_as_for_json(client) -> None:
    as_json = client.post("/v1/classify", json={"images": [b64(png())], "labels": LABELS, "top_k": 2})
    assert as_json.status_code == 200, as_json.text
    as_form = client.post(
        "/v1/classify",
        files=[("images", ("red.png", png(), "image/png"))],
        data={"labels": LABELS, "top_k": "2"},
    )
    assert as_form.status_code == 200, as_form.text
    assert as_form.json()["results"] == as_json.json()["results"]


def test_a_form_with_a_file_that_is_not_an_image_is_a_400_naming_it(client) -> None:
    response = client.post(
        "/v1/classify", files=[("images", ("notes.txt", b"hello", "text/plain"))], data={"labels": LABELS}
    )
    assert response.status_code == 400
    assert response.json()["error"]["index"] == 0


def test_rank_takes_plain_strings_and_answers_as_for_objects(client) -> None:
    image = b64(png())
    plain = client.post(
        "/v1/rank", json={"query": {"image": image}, "candidates": ["a red circle", "a blue square"]}
    )
    objects = client.post(
        "/v1/rank",
        json={"query": {"image": image}, "candidates": [{"text": "a red circle"}, {"text": "a blue square"}]},
    )
    assert plain.status_code == 200, plain.text
    assert plain.json()["results"] == objects.json()["results"]
    text_query = client.post(
        "/v1/rank", json={"query": "a red circle", "candidates": ["a", {"image": image}]}
    )
    assert text_query.status_code == 200 and len(text_query.json()["results"]) == 2


def test_rank_takes_a_form_with_an_image_query_and_text_candidates(client) -> None:
    as_json = client.post(
        "/v1/rank", json={"query": {"image": b64(png())}, "candidates": ["a red circle", "a blue square"]}
    )
    as_form = client.post(
        "/v1/rank",
        files=[("query", ("q.png", png(), "image/png"))],
        data={"candidates": ["a red circle", "a blue square"]},
    )
    assert as_form.status_code == 200, as_form.text
    assert as_form.json()["results"] == as_json.json()["results"]


def test_collections_take_uploads_plain_strings_and_a_score_floor(client) -> None:
    assert client.post("/v1/collections", json={"name": "forms"}).status_code == 201
    uploaded = client.post(
        "/v1/collections/forms/items",
        files=[("items", (f"{seed}.png", png(seed), "image/png")) for seed in range(3)],
    )
    assert uploaded.status_code == 200 and uploaded.json() == {"upserted": 3}, uploaded.text
    item = client.get("/v1/collections/forms/items/1.png").json()
    assert item["metadata"] == {"file": "1.png"}
    texts = client.post("/v1/collections/forms/items", json={"items": ["a blue square"]})
    assert texts.status_code == 200, texts.text
    assert client.get("/v1/collections/forms/items/a blue square").status_code == 200
    by_file = client.post(
        "/v1/collections/forms/search", files=[("image", ("q.png", png(0), "image/png"))], data={"top_k": "2"}
    )
    assert by_file.status_code == 200, by_file.text
    hits = by_file.json()["results"]
    assert len(hits) == 2 and hits[0]["id"] == "0.png"
    floor = client.post(
        "/v1/collections/forms/search", json={"image": b64(png(0)), "top_k": 10, "min_score": 0.999}
    )
    assert [hit["id"] for hit in floor.json()["results"]] == ["0.png"]


def test_a_label_set_answers_the_same_shape_from_put_and_get(client) -> None:
    put = client.put("/v1/labelsets/same-shape", json={"labels": LABELS})
    assert put.status_code == 200, put.text
    got = client.get("/v1/labelsets/same-shape").json()
    listed = client.get("/v1/labelsets").json()["labelsets"][0]
    for info in (put.json(), got, listed):
        assert info["labels"] == LABELS and info["label_count"] == 3
    assert set(put.json()) == set(got) == set(listed)


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/v1/embed", {"text": ["a red circle"]}, "unknown field 'text': did you mean 'texts'?"),
        ("/v1/classify", {"images": [], "label": ["a"]}, "unknown field 'label': did you mean 'labels'?"),
        (
            "/v1/rank",
            {"query": {"txt": "a"}, "candidates": ["b"]},
            "query: unknown field 'txt': did you mean 'text'?",
        ),
        ("/v1/collections", {"name": "x", "indx": "flat"}, "unknown field 'indx': did you mean 'index'?"),
    ],
)
def test_an_unknown_field_is_answered_with_the_closest_known_name(client, path, body, message) -> None:
    response = client.post(path, json=body)
    assert response.status_code == 422
    assert response.json()["error"]["message"] == message


def test_an_unknown_form_field_is_answered_with_the_closest_known_name(client) -> None:
    response = client.post("/v1/embed", files=[("image", ("a.png", png(), "image/png"))])
    assert response.status_code == 422
    assert response.json()["error"]["message"] == "unknown field 'image': did you mean 'images'?"


def request_models(schema: dict) -> dict[str, dict]:
    """The components that some operation takes as its body (and the models nested in them)."""
    components = schema["components"]["schemas"]
    names: set[str] = set()

    def visit(node: object) -> None:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if ref:
                name = ref.rsplit("/", 1)[1]
                if name not in names:
                    names.add(name)
                    visit(components[name])
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    models: dict[str, dict] = {}
    for operations in schema["paths"].values():
        for operation in operations.values():
            for content in operation.get("requestBody", {}).get("content", {}).values():
                body = content["schema"]
                if "properties" in body and "(form)" not in body.get("title", ""):
                    models[body["title"]] = body  # a body read as JSON or a form, inline
            visit(operation.get("requestBody", {}))
    return models | {name: components[name] for name in names}


def test_every_request_field_has_a_description_and_an_example(client) -> None:
    schema = client.get("/openapi.json").json()
    models = request_models(schema)
    assert {"EmbedRequest", "ClassifyRequest", "RankRequest", "UpsertItems", "SearchRequest"} <= set(models)
    for name, model in models.items():
        assert model.get("description"), f"{name} has no description"
        assert model.get("examples"), f"{name} has no example"
        for field, spec in model.get("properties", {}).items():
            assert spec.get("description"), f"{name}.{field} has no description"
            assert "examples" in spec, f"{name}.{field} has no example"
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            assert operation.get("summary") and operation.get("description"), f"{method} {path}"
    assert schema["paths"]["/v1/classify"]["post"]["description"]


# "Try it out" in the order a reader tries them: create before use, delete last.
TRY_ORDER = [
    ("post", "/v1/embed"),
    ("post", "/embed"),
    ("post", "/v1/classify"),
    ("post", "/classify"),
    ("put", "/v1/labelsets/{name}"),
    ("get", "/v1/labelsets/{name}"),
    ("get", "/v1/labelsets"),
    ("post", "/v1/embeddings"),
    ("post", "/v1/rank"),
    ("post", "/v1/collections"),
    ("post", "/v1/collections/{name}/items"),
    ("get", "/v1/collections/{name}/items/{item_id}"),
    ("post", "/v1/collections/{name}/search"),
    ("get", "/v1/collections/{name}"),
    ("get", "/v1/collections"),
    ("get", "/v1/jobs"),
    ("delete", "/v1/collections/{name}/items/{item_id}"),
    ("delete", "/v1/collections/{name}"),
    ("delete", "/v1/labelsets/{name}"),
    ("get", "/v1/models"),
    ("get", "/livez"),
    ("get", "/readyz"),
    ("get", "/metrics"),
]


# A refresh moves a collection to another model version; a fresh service serves one
# (tests/service/test_refresh_api.py runs these).
NEED_A_SECOND_VERSION = {
    ("post", "/v1/collections/{name}/reembed"),
    ("post", "/v1/collections/{name}/rollback"),
    ("get", "/v1/jobs/{job_id}"),
    ("delete", "/v1/jobs/{job_id}"),
}


def test_each_routes_example_answers_2xx_on_a_fresh_service(client) -> None:
    schema = client.get("/openapi.json").json()
    listed = {(m, p) for p, ops in schema["paths"].items() for m in ops} - {("post", "/v1/admin/reload")}
    assert listed - NEED_A_SECOND_VERSION == set(TRY_ORDER)
    for method, path in TRY_ORDER:
        operation = schema["paths"][path][method]
        url = path
        for parameter in operation.get("parameters", []):
            if parameter["in"] == "path":
                url = url.replace("{" + parameter["name"] + "}", parameter["example"])
        kwargs = {}
        content = operation.get("requestBody", {}).get("content", {})
        if "application/json" in content:
            # the demo model is `shapes-demo`; this service serves `tiny`
            body = json.dumps(content["application/json"]["example"]).replace('"shapes-demo"', '"tiny"')
            kwargs["json"] = json.loads(body)
        response = client.request(method.upper(), url, **kwargs)
        assert 200 <= response.status_code < 300, (method, path, kwargs, response.text)
    assert re.match(
        r"^\{",
        json.dumps(
            schema["paths"]["/v1/embed"]["post"]["requestBody"]["content"]["application/json"]["example"]
        ),
    )
