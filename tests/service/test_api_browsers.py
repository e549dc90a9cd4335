"""Browsers cannot be used against the service: the Host allow-list (DNS rebinding), cross-site
writes (Origin), content types (415), CORS off unless configured; and a page from another origin,
in headless Chromium, cannot write to a real uvicorn.

The pages of the service itself (the demo page, /docs) are same-origin and keep working: their
browser tests are in test_demo.py and test_docs.py.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from clipserve.service.api.guards import same_origin
from clipserve.service.settings import is_loopback, resolved_allowed_hosts, split_host
from tests.fixtures.browser import CHROMIUM, CHROMIUM_ARGS
from tests.fixtures.service import b64, free_port, image_bytes

ITEM = {"items": [{"id": "planted", "text": "a red circle"}]}


def items_of(client, name: str = "c") -> int:
    return client.get(f"/v1/collections/{name}").json()["count"]


@pytest.fixture
def collection(client) -> object:
    assert client.post("/v1/collections", json={"name": "c"}).status_code == 201
    return client


# The Host allow-list ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("listen", "given", "resolved"),
    [
        ("127.0.0.1", [], ("localhost", "127.0.0.1", "[::1]")),
        ("::1", [], ("localhost", "127.0.0.1", "[::1]")),
        ("localhost", [], ("localhost", "127.0.0.1", "[::1]")),
        ("0.0.0.0", [], ("*",)),
        ("10.1.2.3", [], ("*",)),
        (
            "0.0.0.0",
            ["API.example.com:443", "*.svc.local", "::1"],
            ("api.example.com", "*.svc.local", "[::1]"),
        ),
    ],
)
def test_allowed_hosts_default_by_the_listening_address(listen, given, resolved) -> None:
    assert resolved_allowed_hosts(given, listen) == resolved
    assert is_loopback(listen) == (resolved[0] == "localhost" and not given)


def test_host_header_parsing() -> None:
    assert split_host("LocalHost.:8000") == ("localhost", 8000)
    assert split_host("[::1]:8000") == ("[::1]", 8000)
    assert split_host("[::1]") == ("[::1]", None)
    assert split_host("127.0.0.1") == ("127.0.0.1", None)
    assert same_origin("http://127.0.0.1:8000", "127.0.0.1:8000")
    assert same_origin("https://api.example.com", "api.example.com")  # a proxy's Host, default port
    assert not same_origin("http://127.0.0.1:9000", "127.0.0.1:8000")  # another port is another origin
    assert not same_origin("http://evil.example", "127.0.0.1:8000")
    assert not same_origin("null", "127.0.0.1:8000")


def test_a_rebound_host_name_is_refused_and_loopback_names_are_served(collection) -> None:
    client = collection
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example"):
        refused = client.post("/v1/collections/c/items", json=ITEM, headers={"Host": host})
        assert refused.status_code == 400, host
        error = refused.json()["error"]
        assert error["type"] == "host_not_allowed" and host in error["message"]
        assert "CLIPSERVE_ALLOWED_HOSTS" in error["message"]
        assert client.get("/v1/collections/c", headers={"Host": host}).status_code == 400
    assert items_of(client) == 0
    for host in ("localhost:8000", "127.0.0.1", "[::1]:8000", "LOCALHOST"):
        assert client.get("/v1/models", headers={"Host": host}).status_code == 200, host
    # probes come by IP address from an orchestrator: never refused for their Host
    assert client.get("/livez", headers={"Host": "10.0.0.7:8000"}).status_code == 200
    assert client.get("/readyz", headers={"Host": "10.0.0.7:8000"}).status_code == 200


def test_a_configured_allow_list_and_any_host_off_loopback(make_client) -> None:
    named = make_client(allowed_hosts="api.example.com,*.svc.cluster.local")
    assert named.get("/v1/models", headers={"Host": "api.example.com"}).status_code == 200
    assert named.get("/v1/models", headers={"Host": "clip.ns.svc.cluster.local:8000"}).status_code == 200
    assert named.get("/v1/models", headers={"Host": "svc.cluster.local"}).status_code == 400
    assert named.get("/v1/models", headers={"Host": "localhost"}).status_code == 400
    everywhere = make_client(host="0.0.0.0")
    assert everywhere.get("/v1/models", headers={"Host": "clip.internal:8000"}).status_code == 200


def test_an_allowed_host_given_as_a_url_is_a_settings_error(make_settings) -> None:
    with pytest.raises(ValueError, match="not a host name"):
        make_settings(allowed_hosts="https://api.example.com")


# Cross-site writes -------------------------------------------------------------------------------------


def test_writes_from_another_origin_are_refused_and_own_pages_pass(collection) -> None:
    client = collection
    for origin in ("http://evil.example", "http://127.0.0.1:9999", "null"):
        refused = client.post("/v1/collections/c/items", json=ITEM, headers={"Origin": origin})
        assert refused.status_code == 403, origin
        assert refused.json()["error"]["type"] == "cross_site_request"
    fetch_metadata = client.post(
        "/v1/collections/c/items", json=ITEM, headers={"Sec-Fetch-Site": "cross-site"}
    )
    assert fetch_metadata.status_code == 403
    assert items_of(client) == 0
    # the service's own pages: their Origin is the Host they were served from
    own = client.post("/v1/collections/c/items", json=ITEM, headers={"Origin": "http://127.0.0.1"})
    assert own.status_code == 200 and items_of(client) == 1
    # a cross-origin GET is let through: the browser keeps its answer from the page (no CORS)
    assert client.get("/v1/models", headers={"Origin": "http://evil.example"}).status_code == 200


def test_cors_is_off_unless_configured_and_a_listed_origin_may_write(make_client) -> None:
    closed = make_client()
    preflight = closed.options(
        "/v1/embed", headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    )
    assert "access-control-allow-origin" not in preflight.headers
    opened = make_client(cors_origins=["https://app.example"])
    allowed = opened.post("/v1/embed", json={"texts": ["a"]}, headers={"Origin": "https://app.example"})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    other = opened.post("/v1/embed", json={"texts": ["a"]}, headers={"Origin": "https://evil.example"})
    assert other.status_code == 403


# Content types ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", None, "application/xml"]
)
def test_a_json_body_needs_a_json_content_type(collection, content_type: str | None) -> None:
    client = collection
    headers = {"Content-Type": content_type} if content_type else {}
    for method, path, body in (
        ("post", "/v1/collections/c/items", ITEM),
        ("put", "/v1/labelsets/shapes", {"labels": ["a", "b"]}),
        ("post", "/v1/embeddings", {"input": "a"}),
        ("post", "/v1/collections", {"name": "d"}),
    ):
        # httpx sets no Content-Type for raw `content`: the header is what the test gives
        response = client.request(method, path, content=json.dumps(body), headers=headers)
        assert response.status_code == 415, (path, content_type, response.text)
        error = response.json()["error"]
        assert error["type"] == "unsupported_media_type" and "application/json" in error["message"]
    assert items_of(client) == 0
    assert client.get("/v1/labelsets/shapes").status_code == 404


def test_multipart_only_where_a_route_takes_files(collection) -> None:
    client = collection
    upload = {"items": ("red.png", image_bytes(0), "image/png")}
    assert client.post("/v1/collections/c/items", files=upload).status_code == 200
    for path in ("/v1/collections", "/v1/embeddings"):
        response = client.post(path, files={"input": ("a.txt", b"a", "text/plain")})
        assert response.status_code == 415, path
        assert "multipart/form-data" in response.json()["error"]["message"]
    raw = client.post("/v1/embed", content=image_bytes(1), headers={"Content-Type": "image/png"})
    assert raw.status_code == 200
    elsewhere = client.post("/v1/classify", content=image_bytes(1), headers={"Content-Type": "image/png"})
    assert elsewhere.status_code == 415 and "multipart form" in elsewhere.json()["error"]["message"]
    # a route that reads no body takes a request without one
    assert client.delete("/v1/collections/c/items/red.png").status_code == 200
    json_ok = client.post("/v1/embed", json={"images": [b64(image_bytes(2))]})
    assert json_ok.status_code == 200


# The two cross-site requests of issue 22, over real HTTP -----------------------------------------------


def test_the_cross_site_requests_of_the_issue_over_http(live_server: Callable[..., str]) -> None:
    base = live_server()
    with httpx.Client(base_url=base, timeout=30) as client:
        assert client.post("/v1/collections", json={"name": "c"}).status_code == 201
        text_plain = client.post(
            "/v1/collections/c/items",
            content=json.dumps(ITEM),
            headers={"Content-Type": "text/plain", "Origin": "http://evil.example"},
        )
        rebound = client.post("/v1/collections/c/items", json=ITEM, headers={"Host": "evil.example"})
        assert (text_plain.status_code, rebound.status_code) == (403, 400)
        assert client.get("/v1/collections/c").json()["count"] == 0


# A page of another origin, in Chromium --------------------------------------------------------------------

ATTACK = """<!doctype html><title>another site</title><script>
async function attack(service) {
  const item = JSON.stringify({items: [{id: "planted", text: "a red circle"}]});
  const form = new FormData();
  form.append("items", new Blob(["not used"], {type: "image/png"}), "planted.png");
  const tries = [
    {method: "POST", mode: "no-cors", headers: {"Content-Type": "text/plain"}, body: item},
    {method: "POST", mode: "no-cors", body: form},
    {method: "POST", mode: "no-cors", body: new URLSearchParams({items: "planted"})},
    {method: "POST", mode: "cors", headers: {"Content-Type": "application/json"}, body: item},
  ];
  const outcomes = [];
  for (const init of tries) {
    try { const r = await fetch(service + "/v1/collections/c/items", init); outcomes.push(r.type); }
    catch (e) { outcomes.push("blocked: " + e.name); }
  }
  return outcomes;
}
</script>"""


@pytest.fixture
def other_origin() -> Iterator[str]:
    """A plain web server on another port of 127.0.0.1 (another origin) serving ATTACK."""

    class Page(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = ATTACK.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def refusals(metrics: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("clipserve_request_seconds_count") and 'status="403"' in line
    )


def test_a_page_from_another_origin_cannot_write(live_server: Callable[..., str], other_origin: str) -> None:
    from playwright.sync_api import sync_playwright

    base = live_server()
    with httpx.Client(base_url=base, timeout=30) as client:
        assert client.post("/v1/collections", json={"name": "c"}).status_code == 201
        before = refusals(client.get("/metrics").text)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                page.goto(other_origin)
                outcomes = page.evaluate("service => attack(service)", base)
            finally:
                browser.close()
        # no-cors answers are opaque to the page; the CORS request is blocked by the browser itself
        assert outcomes[:3] == ["opaque"] * 3 and outcomes[3].startswith("blocked")
        assert client.get("/v1/collections/c").json()["count"] == 0
        # the three no-cors requests reached the service and were refused there, not lost on the way
        assert refusals(client.get("/metrics").text) - before == 3
