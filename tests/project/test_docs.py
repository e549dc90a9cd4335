"""The API docs: `/docs` (Swagger UI) and `/redoc` load in headless Chromium with every request
outside 127.0.0.1 refused, so they need no CDN; they and `/openapi.json` answer without a key when
auth is on, while the data routes still need one; Swagger's Authorize is offered."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

import pytest

from tests.fixtures.browser import CHROMIUM, CHROMIUM_ARGS, screenshot

OPERATIONS = ("/v1/embed", "/v1/classify", "/v1/rank", "/v1/collections/{name}/search")


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def offline_page(browser) -> Iterator[tuple[object, list[str]]]:
    """A page whose every request off 127.0.0.1 is aborted (and recorded)."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(30_000)
    refused: list[str] = []

    def only_loopback(route) -> None:
        url = route.request.url
        if urlsplit(url).hostname == "127.0.0.1" or url.startswith(("data:", "blob:", "about:")):
            route.continue_()
        else:
            refused.append(url)
            route.abort()

    context.route("**/*", only_loopback)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page, refused
    context.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"


def test_swagger_ui_lists_the_operations_with_the_network_blocked(
    offline_page, live_server: Callable[..., str]
) -> None:
    page, refused = offline_page
    base = live_server(api_keys=["docs-key"])
    response = page.goto(base + "/docs")
    assert response is not None and response.status == 200
    page.wait_for_selector(".opblock-summary-path", state="attached")
    paths = page.eval_on_selector_all(".opblock-summary-path", "els => els.map(e => e.textContent.trim())")
    for operation in OPERATIONS:
        assert operation in paths, paths
    assert page.is_visible("button.authorize"), "Swagger's Authorize button is missing"
    screenshot(page, "docs-swagger")
    assert refused == [], f"the docs asked for {refused}"


def test_redoc_lists_the_operations_with_the_network_blocked(
    offline_page, live_server: Callable[..., str]
) -> None:
    page, refused = offline_page
    base = live_server(api_keys=["docs-key"])
    response = page.goto(base + "/redoc")
    assert response is not None and response.status == 200
    page.wait_for_selector("text=Embed texts and/or images", state="attached")
    text = page.inner_text("body")
    for summary in ("Zero-shot classification", "Rank candidates against a query", "Search a collection"):
        assert summary in text
    screenshot(page, "docs-redoc")
    assert refused == [], f"the docs asked for {refused}"


def test_docs_and_schema_are_open_with_auth_on_and_data_routes_are_not(make_client) -> None:
    client = make_client(api_keys=["docs-key"])
    for path in ("/docs", "/redoc", "/openapi.json", "/favicon.ico", "/static/docs/swagger-ui-bundle.js"):
        assert client.get(path).status_code == 200, path
    assert client.post("/v1/embed", json={"texts": ["a red circle"]}).status_code == 401
    schema = client.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": schema["components"]["securitySchemes"]["bearer"]["description"],
    }
    assert schema["paths"]["/v1/embed"]["post"]["security"] == [{"bearer": ["read"]}]
    assert schema["paths"]["/v1/labelsets/{name}"]["put"]["security"] == [{"bearer": ["write"]}]
    assert schema["paths"]["/v1/admin/reload"]["post"]["security"] == [{"bearer": ["admin"]}]
    assert "security" not in schema["paths"]["/readyz"]["get"]
    page = client.get("/docs").text
    assert "cdn" not in page.lower() and "/static/docs/swagger-ui-bundle.js" in page


def test_docs_assets_are_only_the_bundles(client) -> None:
    for name in ("../docs.py", "missing.js", "%2E%2E%2Fdocs.py"):
        response = client.get(f"/static/docs/{name}")
        assert response.status_code == 404, name


def test_favicon_is_served(client) -> None:
    response = client.get("/favicon.ico")
    assert response.status_code == 200 and response.headers["content-type"].startswith("image/svg+xml")
    assert response.text.startswith("<svg")


def test_try_it_out_with_the_example_answers_200(offline_page, live_server: Callable[..., str]) -> None:
    """Swagger UI's "Try it out" on /v1/embed and /v1/classify sends the route's example as it is."""
    page, refused = offline_page
    page.goto(live_server() + "/docs")
    for operation in (
        "operations-embeddings-embed_v1_embed_post",
        "operations-classification-classify_v1_classify_post",
    ):
        block = page.locator(f"#{operation}")
        block.locator(".opblock-summary").click()
        block.locator("button.execute").click()
        code = block.locator(".live-responses-table tbody .response-col_status").first
        code.wait_for()
        assert code.inner_text().strip() == "200", block.locator(".live-responses-table").inner_text()
    screenshot(page, "docs-try-it-out")
    assert refused == []
