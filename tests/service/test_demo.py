"""The demo page at `/`: its routes, and the page itself in headless Chromium against a real uvicorn.

The browser is Debian's `chromium` (installed by `scripts/ensure-browser.sh`, which `make test`
runs), driven by the Python `playwright` package through `executable_path`. Screenshots are kept
in `artifacts/demo/` (gitignored) as test artifacts.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fixtures.browser import CHROMIUM, CHROMIUM_ARGS, screenshot

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts" / "demo"
LABELS = ["red circle", "blue square", "green triangle", "yellow diamond"]


def shape_png(color: str = "red", size: int = 96) -> bytes:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(image).ellipse((size // 5, size // 5, size * 4 // 5, size * 4 // 5), fill=color)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def test_page_and_static_files_are_served(client) -> None:
    page = client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "/static/app.js" in page.text and 'id="api-key"' in page.text
    script = client.get("/static/app.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert client.get("/static/style.css").headers["content-type"].startswith("text/css")
    assert "/" not in client.get("/openapi.json").json()["paths"]


@pytest.mark.parametrize(
    "name", ["missing.js", "__init__.py", "..%2Fapi%2Fdemo.py", "%2E%2E%2F%2E%2E%2Fpyproject.toml"]
)
def test_static_route_serves_only_the_page_files(client, name: str) -> None:
    response = client.get(f"/static/{name}")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found"


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).is_file(), f"{CHROMIUM} is missing: run scripts/ensure-browser.sh (make test does)"
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


DESKTOP = {"width": 1100, "height": 900}
PHONE = {"width": 390, "height": 844}


def open_page(browser, viewport: dict) -> Iterator[object]:
    context = browser.new_context(viewport=viewport)
    context.set_default_timeout(30_000)
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    yield opened
    context.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"


@pytest.fixture
def page(browser) -> Iterator[object]:
    yield from open_page(browser, DESKTOP)


@pytest.fixture
def phone(browser) -> Iterator[object]:
    yield from open_page(browser, PHONE)


def upload(page, selector: str, name: str, mime: str, data: bytes) -> None:
    page.set_input_files(selector, files=[{"name": name, "mimeType": mime, "buffer": data}])


def add_pictures(page, collection: str, pictures: dict[str, bytes]) -> None:
    """Add `pictures` (file name -> PNG) to `collection` from the page; wait until the page says so."""
    page.fill("#collection", collection)
    page.set_input_files(
        "#index-files",
        files=[{"name": name, "mimeType": "image/png", "buffer": data} for name, data in pictures.items()],
    )
    page.wait_for_function(
        f"document.getElementById('search-info').textContent.startsWith('Added {len(pictures)}')"
    )


def read_bars(page) -> list[tuple[str, float]]:
    rows = page.locator("#classify-results li")
    return [
        (
            rows.nth(i).locator(".label").inner_text(),
            float(rows.nth(i).locator(".score").inner_text().rstrip("%")),
        )
        for i in range(rows.count())
    ]


def test_upload_an_image_and_read_the_top_k_bars(page, live_server: Callable[..., str]) -> None:
    import httpx

    base = live_server()
    page.goto(base + "/")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('serving tiny')")
    page.fill("#labels", "\n".join(LABELS))
    page.fill("#top-k", "3")
    upload(page, "#image-file", "red-circle.png", "image/png", shape_png())
    page.wait_for_selector("#classify-results li")
    bars = read_bars(page)
    path = screenshot(page, "classify")
    assert path.stat().st_size > 10_000

    assert page.is_visible("#preview") and page.is_hidden("#classify-error")
    assert len(bars) == 3
    scores = [score for _, score in bars]
    assert scores == sorted(scores, reverse=True)
    direct = httpx.post(
        base + "/v1/classify",
        json={"images": [page.get_attribute("#preview", "src")], "labels": LABELS, "top_k": 3},
        timeout=30,
    ).json()
    expected = [(item["label"], round(item["score"] * 100, 1)) for item in direct["results"][0]["labels"]]
    assert bars == expected
    widths = page.eval_on_selector_all("#classify-results .fill", "els => els.map(e => e.style.width)")
    assert widths == [f"{score:.1f}%" for score in scores]


def test_a_label_set_can_be_picked_instead_of_typed_labels(page, live_server: Callable[..., str]) -> None:
    import httpx

    base = live_server()
    created = httpx.put(
        base + "/v1/labelsets/shapes", json={"labels": ["circle", "square", "cross"]}, timeout=60
    )
    assert created.status_code in (200, 201), created.text
    page.goto(base + "/")
    page.wait_for_selector("#labelset option[value='shapes']", state="attached")
    page.select_option("#labelset", "shapes")
    upload(page, "#image-file", "circle.png", "image/png", shape_png("blue"))
    page.wait_for_selector("#classify-results li")
    assert sorted(label for label, _ in read_bars(page)) == ["circle", "cross", "square"]


def test_a_non_image_file_shows_a_visible_error(page, live_server: Callable[..., str]) -> None:
    page.goto(live_server() + "/")
    upload(page, "#image-file", "notes.txt", "text/plain", b"not a picture")
    error = page.locator("#classify-error")
    error.wait_for(state="visible")
    assert "notes.txt is not an image" in error.inner_text()
    assert page.locator("#classify-results li").count() == 0
    screenshot(page, "non-image-error")


def test_bytes_that_are_not_an_image_leave_no_broken_preview(page, live_server: Callable[..., str]) -> None:
    page.goto(live_server() + "/")
    upload(page, "#image-file", "fake.png", "image/png", b"\x89PNG but not really an image")
    error = page.locator("#classify-error")
    error.wait_for(state="visible")
    assert error.inner_text() == "fake.png is not an image. Choose a PNG, JPEG, WebP or GIF file."
    assert page.is_hidden("#preview") and page.get_attribute("#preview", "src") is None


def test_an_error_goes_once_its_cause_is_fixed(page, live_server: Callable[..., str]) -> None:
    page.goto(live_server() + "/")
    upload(page, "#image-file", "notes.txt", "text/plain", b"not a picture")
    page.locator("#classify-error").wait_for(state="visible")
    upload(page, "#image-file", "red-circle.png", "image/png", shape_png())
    page.wait_for_selector("#classify-results li")
    assert page.is_hidden("#classify-error")
    page.fill("#labels", "")
    page.click("#classify-button")
    page.locator("#classify-error").wait_for(state="visible")
    assert page.inner_text("#classify-error") == "Type at least one label, or pick a label set."
    page.fill("#labels", "red circle, blue square")
    assert page.is_hidden("#classify-error")


def test_add_images_to_a_collection_and_search_it_by_a_sentence(
    page, live_server: Callable[..., str], tmp_path: Path
) -> None:
    page.goto(live_server(data_dir=tmp_path / "data") + "/")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('serving tiny')")
    add_pictures(
        page, "browser-test", {f"{colour}.png": shape_png(colour) for colour in ("red", "blue", "green")}
    )
    page.fill("#query", "a red circle")
    page.fill("#min-score", "-1")
    page.click("#search-button")
    page.wait_for_selector("#search-results li")
    items = page.locator("#search-results li")
    assert items.count() == 3
    assert sorted(items.nth(i).locator(".caption .name").inner_text() for i in range(3)) == [
        "blue.png",
        "green.png",
        "red.png",
    ]
    sources = page.eval_on_selector_all("#search-results img", "els => els.map(e => e.src)")
    assert all(source.startswith("data:image/jpeg;base64,") for source in sources)
    widths = page.eval_on_selector_all("#search-results img", "els => els.map(e => e.naturalWidth)")
    assert widths == [128, 128, 128]
    screenshot(page, "search")


def test_searching_an_unknown_collection_says_how_to_make_it(
    page, live_server: Callable[..., str], tmp_path: Path
) -> None:
    page.goto(live_server(data_dir=tmp_path / "data") + "/")
    page.wait_for_function("document.getElementById('collection-hint').textContent.length > 0")
    # the empty state: nothing pre-filled, and what to do
    assert page.input_value("#collection") == ""
    assert page.inner_text("#collection-hint") == (
        "No collections yet. Type a name above and add images: the page creates the collection for you."
    )
    page.fill("#collection", "nowhere")
    page.fill("#query", "a red circle")
    page.click("#search-button")
    error = page.locator("#search-error")
    error.wait_for(state="visible")
    assert error.inner_text() == (
        "There is no collection named nowhere yet. Add images to it above and the page creates it."
    )
    page.fill("#query", "a blue square")
    assert page.is_hidden("#search-error")


def test_search_shows_the_top_k_above_the_score_threshold(
    page, live_server: Callable[..., str], tmp_path: Path
) -> None:
    page.goto(live_server(data_dir=tmp_path / "data") + "/")
    long_name = "a-rather-long-file-name-of-a-red-circle.png"
    pictures = {long_name: shape_png("red")} | {f"{c}.png": shape_png(c) for c in ("blue", "green", "yellow")}
    add_pictures(page, "threshold", pictures)
    page.fill("#query", "a red circle")
    page.fill("#search-top-k", "2")
    page.fill("#min-score", "-1")
    page.click("#search-button")
    page.wait_for_function("document.querySelectorAll('#search-results li').length === 2")
    scores = [float(t.split()[1]) for t in page.locator("#search-results .score").all_inner_texts()]
    assert scores == sorted(scores, reverse=True)
    # above the best score, nothing is shown, and the page says why
    page.fill("#min-score", f"{scores[0] + 0.01:.3f}")
    page.click("#search-button")
    page.wait_for_function("document.querySelectorAll('#search-results li').length === 0")
    assert page.inner_text("#search-info").startswith("Nothing in threshold scores")
    page.fill("#search-top-k", "10")
    page.fill("#min-score", "-1")
    page.click("#search-button")
    page.wait_for_function("document.querySelectorAll('#search-results li').length === 4")
    names = page.locator("#search-results .caption .name")
    assert long_name in names.all_inner_texts()
    cut = page.eval_on_selector_all(
        "#search-results .caption .name", "els => els.filter(e => e.scrollWidth > e.clientWidth).length"
    )
    assert cut == 0, "a file name is cut off"


def test_the_page_works_with_auth_on(page, live_server: Callable[..., str]) -> None:
    base = live_server(api_keys=["demo-key"])
    response = page.goto(base + "/")
    assert response is not None and response.status == 200
    page.wait_for_function("document.getElementById('status').textContent.includes('needs an API key')")
    page.fill("#labels", "\n".join(LABELS))
    upload(page, "#image-file", "red-circle.png", "image/png", shape_png())
    error = page.locator("#classify-error")
    error.wait_for(state="visible")
    assert error.inner_text() == "This service needs an API key. Enter it above."
    page.fill("#api-key", "wrong-key")
    page.dispatch_event("#api-key", "change")
    page.wait_for_function("document.getElementById('status').textContent.includes('was not accepted')")
    page.fill("#api-key", "demo-key")
    page.dispatch_event("#api-key", "change")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('serving tiny')")
    # the image already chosen is classified again, and the old message is gone
    page.wait_for_selector("#classify-results li")
    assert page.is_hidden("#classify-error")
    assert len(read_bars(page)) == 4
    screenshot(page, "auth")


def test_no_request_of_the_page_fails_and_it_has_a_favicon(page, live_server: Callable[..., str]) -> None:
    failed: list[str] = []
    page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    page.goto(live_server() + "/")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('serving tiny')")
    assert page.get_attribute("link[rel=icon]", "href") == "/favicon.ico"
    favicon = page.request.get(page.url.rstrip("/") + "/favicon.ico")
    assert favicon.status == 200 and favicon.headers["content-type"].startswith("image/svg+xml")
    assert failed == []


def test_the_page_reads_well_on_a_phone(phone, live_server: Callable[..., str], tmp_path: Path) -> None:
    """390 px wide: nothing wider than the screen, bars across the width, whole file names."""
    phone.goto(live_server(data_dir=tmp_path / "data") + "/")
    phone.wait_for_function("document.getElementById('status').textContent.startsWith('serving tiny')")
    screenshot(phone, "phone-empty")
    phone.fill("#labels", "\n".join(LABELS))
    upload(phone, "#image-file", "red-circle.png", "image/png", shape_png())
    phone.wait_for_selector("#classify-results li")
    tracks = phone.eval_on_selector_all(
        "#classify-results .track", "els => els.map(e => e.getBoundingClientRect().width)"
    )
    assert tracks and min(tracks) >= 300, tracks
    page_width = phone.evaluate("document.documentElement.scrollWidth")
    assert page_width <= 390, f"the page is {page_width} px wide on a 390 px screen"
    screenshot(phone, "phone-classify")
    add_pictures(
        phone,
        "phone",
        {f"{colour}-shape-picture.png": shape_png(colour) for colour in ("red", "blue", "green")},
    )
    phone.fill("#query", "a red circle")
    phone.fill("#min-score", "-1")
    phone.click("#search-button")
    phone.wait_for_function("document.querySelectorAll('#search-results li').length === 3")
    cut = phone.eval_on_selector_all(
        "#search-results .caption .name", "els => els.filter(e => e.scrollWidth > e.clientWidth).length"
    )
    assert cut == 0
    assert phone.evaluate("document.documentElement.scrollWidth") <= 390
    screenshot(phone, "phone-search")


def test_desktop_screenshots_of_the_whole_page(page, live_server: Callable[..., str], tmp_path: Path) -> None:
    page.goto(live_server(data_dir=tmp_path / "data") + "/")
    page.wait_for_function("document.getElementById('collection-hint').textContent.length > 0")
    screenshot(page, "desktop-empty")
    page.fill("#labels", "\n".join(LABELS))
    upload(page, "#image-file", "red-circle.png", "image/png", shape_png())
    page.wait_for_selector("#classify-results li")
    tracks = page.eval_on_selector_all(
        "#classify-results .track", "els => els.map(e => e.getBoundingClientRect().width)"
    )
    assert min(tracks) >= 400, tracks
    screenshot(page, "desktop-classify")
