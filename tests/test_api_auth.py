"""Bearer API keys, the admin key, CORS and request ids."""

from __future__ import annotations

import pytest

PROTECTED = [
    ("post", "/v1/embed", {"texts": ["a"]}),
    ("get", "/v1/models", None),
    ("get", "/metrics", None),
    ("get", "/v1/labelsets", None),
]
# No data: the docs load before anyone has typed a key (Swagger's Authorize asks for it).
OPEN = ["/livez", "/readyz", "/", "/docs", "/redoc", "/openapi.json", "/favicon.ico"]


@pytest.mark.parametrize(("method", "path", "body"), [*PROTECTED, *(("get", path, None) for path in OPEN)])
def test_auth_off_lets_everything_through(client, method, path, body) -> None:
    assert getattr(client, method)(path, **({"json": body} if body else {})).status_code == 200


def test_auth_on(make_client) -> None:
    client = make_client(api_keys="key-one,key-two", admin_key="admin-k")
    for method, path, body in PROTECTED:
        kwargs = {"json": body} if body else {}
        missing = getattr(client, method)(path, **kwargs)
        assert missing.status_code == 401 and "missing API key" in missing.json()["error"]["message"]
        assert missing.headers["www-authenticate"] == "Bearer"
        wrong = getattr(client, method)(path, headers={"Authorization": "Bearer nope"}, **kwargs)
        assert wrong.status_code == 401 and wrong.json()["error"]["message"] == "invalid API key"
        for key in ("key-one", "key-two"):
            ok = getattr(client, method)(path, headers={"Authorization": f"Bearer {key}"}, **kwargs)
            assert ok.status_code == 200, (path, ok.text)
    for path in OPEN:
        assert client.get(path).status_code == 200, path  # the pages load, then ask for a key
    assert client.get("/static/../v1/models").status_code in (401, 404)


def test_admin_key(make_client) -> None:
    client = make_client(api_keys=["user-k"], admin_key="admin-k")
    user = client.post("/v1/admin/reload", headers={"Authorization": "Bearer user-k"})
    assert user.status_code == 401 and "admin key" in user.json()["error"]["message"]
    admin = client.post("/v1/admin/reload", headers={"Authorization": "Bearer admin-k"})
    assert admin.status_code == 200 and admin.json()["unchanged"] == ["tiny@1"]


def test_admin_api_is_off_without_an_admin_key(client) -> None:
    response = client.post("/v1/admin/reload")
    assert response.status_code == 403 and "no admin key" in response.json()["error"]["message"]


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
