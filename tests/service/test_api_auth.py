"""Bearer API keys with scopes (read, write, admin, metrics), the key file and its rotation, what
/readyz shows without a key, CORS and request ids."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest
from fastapi.routing import APIRoute

from clipserve.service.keys import KeyFileError, KeyRing, parse_key_file, read_key_file, route_scope

READ = [
    ("post", "/v1/embed", {"texts": ["a"]}),
    ("get", "/v1/models", None),
    ("get", "/v1/labelsets", None),
]
PROTECTED = [*READ, ("get", "/metrics", None)]
# No data: the docs load before anyone has typed a key (Swagger's Authorize asks for it).
OPEN = ["/livez", "/readyz", "/", "/docs", "/redoc", "/openapi.json", "/favicon.ico"]
READER = "reader-key-0123456789"
WRITER = "writer-key-0123456789"
OPS = "ops-key-0123456789abc"
SCRAPER = "scraper-key-0123456789"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize(("method", "path", "body"), [*PROTECTED, *(("get", path, None) for path in OPEN)])
def test_auth_off_lets_everything_through(client, method, path, body) -> None:
    assert getattr(client, method)(path, **({"json": body} if body else {})).status_code == 200


def test_auth_on(make_client) -> None:
    client = make_client(api_keys="key-one,key-two", admin_key="admin-k")
    for method, path, body in READ:
        kwargs = {"json": body} if body else {}
        missing = getattr(client, method)(path, **kwargs)
        assert missing.status_code == 401 and "missing API key" in missing.json()["error"]["message"]
        assert missing.headers["www-authenticate"] == "Bearer"
        wrong = getattr(client, method)(path, headers=bearer("nope"), **kwargs)
        assert wrong.status_code == 401 and wrong.json()["error"]["message"] == "invalid API key"
        for key in ("key-one", "key-two"):
            ok = getattr(client, method)(path, headers=bearer(key), **kwargs)
            assert ok.status_code == 200, (path, ok.text)
        # the admin key is no data key any more
        admin = getattr(client, method)(path, headers=bearer("admin-k"), **kwargs)
        assert admin.status_code == 403 and "'read' scope" in admin.json()["error"]["message"]
    for path in OPEN:
        assert client.get(path).status_code == 200, path  # the pages load, then ask for a key
    assert client.get("/static/../v1/models").status_code in (401, 404)


def test_admin_key(make_client) -> None:
    client = make_client(api_keys=["user-k"], admin_key="admin-k")
    user = client.post("/v1/admin/reload", headers=bearer("user-k"))
    assert user.status_code == 403
    assert user.json()["error"]["message"].startswith(
        "this key lacks the 'admin' scope, which POST /v1/admin/reload"
    )
    assert client.post("/v1/admin/reload").status_code == 401
    admin = client.post("/v1/admin/reload", headers=bearer("admin-k"))
    assert admin.status_code == 200 and admin.json()["unchanged"] == ["tiny@1"]


def test_admin_api_is_off_without_an_admin_key(client) -> None:
    response = client.post("/v1/admin/reload")
    assert response.status_code == 403 and "no key has the admin scope" in response.json()["error"]["message"]


def test_every_route_needs_the_scope_its_kind_of_work_needs() -> None:
    """The scope of every route of the API, from the same function the middleware asks."""
    from clipserve.service.api import ROUTERS

    expected = {
        ("POST", "/v1/admin/reload"): "admin",
        ("GET", "/metrics"): "metrics",
        ("POST", "/v1/collections"): "write",
        ("DELETE", "/v1/collections/{name}"): "write",
        ("POST", "/v1/collections/{name}/items"): "write",
        ("DELETE", "/v1/collections/{name}/items/{item_id:path}"): "write",
        ("POST", "/v1/collections/{name}/reembed"): "write",
        ("POST", "/v1/collections/{name}/rollback"): "write",
        ("DELETE", "/v1/jobs/{job_id}"): "write",
        ("PUT", "/v1/labelsets/{name}"): "write",
        ("DELETE", "/v1/labelsets/{name}"): "write",
    }
    seen = {}
    for route in (route for router in ROUTERS for route in router.routes):
        if isinstance(route, APIRoute):
            for method in route.methods:
                seen[(method, route.path)] = route_scope(method, route.path)
    assert {key: scope for key, scope in seen.items() if scope != "read"} == expected
    assert seen[("POST", "/v1/collections/{name}/search")] == "read"
    assert seen[("POST", "/v1/classify")] == seen[("POST", "/v1/embeddings")] == "read"
    # an item id may end in "/search": deleting it is still a write
    assert route_scope("DELETE", "/v1/collections/c/items/a/search") == "write"


def write_keys(path: Path, text: str) -> None:
    path.write_text(text)


def test_key_file_format_and_its_mistakes(tmp_path: Path) -> None:
    text = f"""# clipserve keys
{READER} read
{WRITER}   read,write   # ingestion job
\t{OPS}\tadmin,metrics

"""
    keys = parse_key_file(text, "keys.txt")
    ring = KeyRing(api_keys=["legacy"], keys_file=None)
    assert ring.scopes_of("legacy") == {"read", "write"}
    path = tmp_path / "keys.txt"
    write_keys(path, text)
    assert read_key_file(path) == keys
    ring = KeyRing(keys_file=path)
    assert ring.scopes_of(READER) == {"read"} and ring.scopes_of(WRITER) == {"read", "write"}
    assert ring.scopes_of(OPS) == {"admin", "metrics"} and ring.scopes_of("nope") is None
    assert ring.counts() == {"read": 2, "write": 1, "admin": 1, "metrics": 1}
    for bad, why in [
        (f"{READER} read write", "line 1: expected '<key> <scope>"),
        (f"{READER} reed", "line 1: unknown scope 'reed'"),
        ("short read", "line 1: the key has 5 characters, at least 16"),
        (f"{READER} read\n{READER} write", "line 2: the same key as line 1"),
        (f"{READER}", "line 1: expected '<key> <scope>"),
    ]:
        with pytest.raises(KeyFileError, match=why):
            parse_key_file(bad, "keys.txt")
    with pytest.raises(KeyFileError, match="cannot read the API keys file"):
        KeyRing(keys_file=tmp_path / "missing.txt")


def test_clip_serve_refuses_a_bad_key_file_in_one_line(tmp_path: Path, tiny_repo: Path) -> None:
    import subprocess
    import sys

    keys = tmp_path / "keys.txt"
    write_keys(keys, "short read\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPSERVE_")}
    env.update(CLIPSERVE_MODELS_DIR=str(tiny_repo), CLIPSERVE_API_KEYS_FILE=str(keys), CLIPSERVE_PORT="0")
    done = subprocess.run(
        [str(Path(sys.executable).parent / "clip-serve")], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"clip-serve: error: {keys} line 1: the key has 5 characters, at least 16 are needed "
        "(make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))')"
    ]


def test_scopes_through_the_api_and_rotation_without_a_restart(
    make_client, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "keys.txt"
    write_keys(path, f"{READER} read\n{WRITER} read,write\n{OPS} admin\n{SCRAPER} metrics\n")
    client = make_client(api_keys_file=path)
    assert client.get("/v1/collections", headers=bearer(READER)).status_code == 200
    created = client.post("/v1/collections", json={"name": "c"}, headers=bearer(READER))
    assert created.status_code == 403
    assert created.json()["error"]["message"] == (
        "this key lacks the 'write' scope, which POST /v1/collections needs (the key has: read)"
    )
    assert client.post("/v1/collections", json={"name": "c"}, headers=bearer(WRITER)).status_code == 201
    search = client.post("/v1/collections/c/search", json={"text": "a cat"}, headers=bearer(READER))
    assert search.status_code == 200
    assert client.delete("/v1/collections/c", headers=bearer(READER)).status_code == 403
    assert client.post("/v1/admin/reload", headers=bearer(OPS)).status_code == 200
    assert client.post("/v1/admin/reload", headers=bearer(WRITER)).status_code == 403
    assert client.get("/metrics", headers=bearer(SCRAPER)).status_code == 200
    assert client.get("/metrics", headers=bearer(READER)).status_code == 403
    assert client.post("/v1/embed", json={"texts": ["a"]}, headers=bearer(SCRAPER)).status_code == 403

    # rotation: the reader key is replaced; the change is seen within a second, without a restart
    rotated = "rotated-reader-key-0123"
    write_keys(path, f"{rotated} read\n{WRITER} read,write\n{OPS} admin\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # a new mtime even on a coarse clock
    deadline = time.monotonic() + 5
    while client.get("/v1/models", headers=bearer(rotated)).status_code != 200:
        assert time.monotonic() < deadline, "the new key was not taken within 5 s"
        time.sleep(0.2)
    assert client.get("/v1/models", headers=bearer(READER)).status_code == 401

    # a broken file keeps the keys in force and says why once in the log
    with caplog.at_level(logging.ERROR, logger="clipserve.keys"):
        write_keys(path, "oops\n")
        os.utime(path, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
        time.sleep(1.2)
        for _ in range(3):
            assert client.get("/v1/models", headers=bearer(rotated)).status_code == 200
            time.sleep(0.4)
    errors = [r.getMessage() for r in caplog.records if r.name == "clipserve.keys"]
    assert len(errors) == 1 and "line 1" in errors[0] and "stay in force" in errors[0]


def test_the_key_file_is_checked_at_most_once_a_second(tmp_path: Path) -> None:
    path = tmp_path / "keys.txt"
    write_keys(path, f"{READER} read\n")
    now = [100.0]
    ring = KeyRing(keys_file=path, clock=lambda: now[0])
    write_keys(path, f"{WRITER} read,write\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    now[0] += 0.5
    ring.refresh()
    assert ring.scopes_of(READER) == {"read"}, "checked again before a second had passed"
    now[0] += 0.6
    ring.refresh()
    assert ring.scopes_of(READER) is None and ring.scopes_of(WRITER) == {"read", "write"}


def test_metrics_open_for_a_scraper_while_data_needs_a_key(make_client) -> None:
    client = make_client(api_keys=["data-key"], metrics_open=True)
    assert client.get("/metrics").status_code == 200
    assert client.get("/v1/models").status_code == 401


def test_cors_and_request_id(make_client) -> None:
    client = make_client(cors_origins=["https://app.example"])
    preflight = client.options(
        "/v1/embed", headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    )
    assert preflight.headers["access-control-allow-origin"] == "https://app.example"
    response = client.get("/v1/models", headers={"X-Request-ID": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"
    other = client.options(
        "/v1/embed", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    )
    assert "access-control-allow-origin" not in other.headers
