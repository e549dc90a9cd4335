"""The API docs, served entirely from installed packages: `/docs` (Swagger UI), `/redoc` (ReDoc),
their scripts under `/static/docs/`, and `/favicon.ico`. Nothing is loaded from a CDN, so the docs
work offline and behind an air gap.

The Swagger UI and ReDoc bundles are the ones the `fastapi-offline` package ships; only its files
are used. The docs and `/openapi.json` need no API key (they hold no data); the schema declares
the Bearer scheme, with the scope it needs, on every protected route, so Swagger UI's "Authorize"
asks for the key once.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, HTMLResponse

from clipserve.service.errors import NotFound
from clipserve.service.keys import route_scope

ASSETS_PREFIX = "/static/docs"
FAVICON = Path(__file__).resolve().parent.parent / "static" / "favicon.svg"
ASSET_TYPES = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "redoc.standalone.js": "text/javascript; charset=utf-8",
}
# Routes that answer without a key (kept in step with the Auth middleware's open paths).
OPEN_ROUTES = ("/livez", "/readyz")
BEARER = "bearer"
# The pages may reach only this server: ReDoc's footer logo (fetched from its CDN) is refused by the
# browser before any request leaves, and hides itself.
SAME_ORIGIN_ONLY = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
    "script-src 'self' 'unsafe-inline' blob:; worker-src 'self' blob:; connect-src 'self'; "
    "font-src 'self' data:"
)


def _same_origin_only(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = SAME_ORIGIN_ONLY
    return page


def assets_dir() -> Path:
    """Where the installed package keeps the Swagger UI and ReDoc bundles."""
    return Path(str(resources.files("fastapi_offline") / "static"))


router = APIRouter(include_in_schema=False)


@router.get("/docs")
async def swagger_ui() -> HTMLResponse:
    return _same_origin_only(
        get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="clipserve API",
            swagger_js_url=f"{ASSETS_PREFIX}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS_PREFIX}/swagger-ui.css",
            swagger_favicon_url="/favicon.ico",
            swagger_ui_parameters={"persistAuthorization": True, "tryItOutEnabled": True},
        )
    )


@router.get("/redoc")
async def redoc() -> HTMLResponse:
    return _same_origin_only(
        get_redoc_html(
            openapi_url="/openapi.json",
            title="clipserve API",
            redoc_js_url=f"{ASSETS_PREFIX}/redoc.standalone.js",
            redoc_favicon_url="/favicon.ico",
            with_google_fonts=False,
        )
    )


@router.get(ASSETS_PREFIX + "/{name}")
async def docs_asset(name: str) -> FileResponse:
    media_type = ASSET_TYPES.get(name)
    path = assets_dir() / name
    if media_type is None or not path.is_file():
        raise NotFound(f"no docs asset {name!r}")
    # The bundles change only with the package: a day of caching saves 2.7 MB per docs load.
    return FileResponse(path, media_type=media_type, headers={"Cache-Control": "public, max-age=86400"})


@router.get("/favicon.ico")
async def favicon() -> FileResponse:
    return FileResponse(
        FAVICON, media_type="image/svg+xml", headers={"Cache-Control": "public, max-age=86400"}
    )


def with_bearer_scheme(app: FastAPI) -> dict:
    """The OpenAPI schema, with the Bearer scheme declared on every route that needs a key."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
        )
        schema.setdefault("components", {})["securitySchemes"] = {
            BEARER: {
                "type": "http",
                "scheme": "bearer",
                "description": "a key (CLIPSERVE_API_KEYS, CLIPSERVE_ADMIN_KEY or CLIPSERVE_API_KEYS_FILE) "
                "with the scope each operation lists: read, write, admin or metrics; needed only when "
                "the service has keys configured (docs/security.md)",
            }
        }
        components = schema["components"].setdefault("schemas", {})
        for path, operations in schema.get("paths", {}).items():
            for method, operation in operations.items():
                if path not in OPEN_ROUTES:
                    # OpenAPI 3.1 lets a non-OAuth scheme list roles: the key's scope this route needs
                    operation["security"] = [{BEARER: [route_scope(method.upper(), path)]}]
                _with_examples(path, operation, components)
        app.openapi_schema = schema
    return app.openapi_schema


# Path parameters, as "Try it out" fills them in: the names the body examples create.
PATH_EXAMPLES = {
    ("/v1/collections/", "name"): "my-images",
    ("/v1/labelsets/", "name"): "shapes",
    ("/v1/collections/", "item_id"): "red-circle",
}


def _with_examples(path: str, operation: dict, components: dict) -> None:
    """Each body's example (its model's first) where Swagger UI and ReDoc look for it, the models
    that bodies read by `clipserve.service.api.bodies` refer to among the components, and path examples."""
    for content in operation.get("requestBody", {}).get("content", {}).values():
        body = content.get("schema", {})
        components.update(body.pop("$defs", {}))
        model = body
        # an optional body is `anyOf: [model, null]`
        ref = body.get("$ref") or next((o["$ref"] for o in body.get("anyOf", []) if "$ref" in o), None)
        if ref:
            model = components.get(ref.rsplit("/", 1)[1], {})
        if "examples" in model and "example" not in content:
            content["example"] = model["examples"][0]
    for parameter in operation.get("parameters", []):
        for (prefix, name), example in PATH_EXAMPLES.items():
            if parameter.get("in") == "path" and parameter["name"] == name and path.startswith(prefix):
                parameter["example"] = example


def install_docs(app: FastAPI) -> None:
    """Local docs routes instead of FastAPI's CDN ones (create the app with docs_url=None, redoc_url=None)."""
    app.include_router(router)
    app.openapi = lambda: with_bearer_scheme(app)  # type: ignore[method-assign]
