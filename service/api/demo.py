"""The demo page: `GET /` and its static files under `/static/`.

Plain HTML, CSS and JavaScript from `service/static/`, no build step; the page talks to the public
API from the browser, with the user's API key when auth is on. The page itself holds no data, so
these routes are left out of the OpenAPI schema and need no key.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from clipserve.service.errors import NotFound

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
}
# Cheap to revalidate, and a new release must never run against an old cached script.
CACHE_CONTROL = "no-cache"

router = APIRouter(include_in_schema=False)


def _static_file(name: str) -> FileResponse:
    path = STATIC_DIR / name
    media_type = MEDIA_TYPES.get(path.suffix)
    if media_type is None or "/" in name or not path.is_file():
        raise NotFound(f"no static file {name!r}")
    return FileResponse(path, media_type=media_type, headers={"Cache-Control": CACHE_CONTROL})


@router.get("/")
async def demo_page() -> FileResponse:
    return _static_file("index.html")


@router.get("/static/{name}")
async def static_file(name: str) -> FileResponse:
    return _static_file(name)
