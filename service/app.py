"""`create_app(settings)`: wires the parts in a lifespan, nothing else.

State on `app.state` (read through the dependencies in `service.api.common` and
`service.registry.get_registry`): settings, metrics, cache, registry, fetcher, labelsets, matrices.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from service.api import ROUTERS
from service.cache import VectorCache
from service.errors import install_error_handlers
from service.inputs import ImageFetcher
from service.labelsets import ClassMatrices, LabelSetStore
from service.metrics import Metrics
from service.middleware import Auth, BodyLimit, RequestContext
from service.registry import ModelRegistry
from service.schemas import EmbedRequest
from service.settings import Settings

log = logging.getLogger("clipserve.app")


def _lifespan(settings: Settings):
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        metrics: Metrics = app.state.metrics
        cache = VectorCache(
            settings.redis_url,
            lru_size=settings.cache_lru_size,
            ttl_s=settings.cache_ttl_s,
            retry_s=settings.redis_retry_s,
            metrics=metrics,
        )
        registry = ModelRegistry(settings, metrics, cache)
        matrices = ClassMatrices(cache, settings)
        app.state.cache, app.state.registry, app.state.matrices = cache, registry, matrices
        app.state.labelsets = LabelSetStore(cache, matrices)
        app.state.fetcher = ImageFetcher(settings)
        poller: asyncio.Task | None = None
        try:
            await registry.start()
            if settings.reload_poll_s > 0:
                poller = asyncio.get_running_loop().create_task(
                    registry.poll_forever(), name="repository-poll"
                )
            log.info("serving %s", ", ".join(m.ref for m in registry.models()))
            yield
        finally:
            if poller is not None:
                poller.cancel()
            await matrices.cancel_all()
            await registry.close()
            await app.state.fetcher.aclose()
            await cache.aclose()

    return lifespan


def _openapi_with_embed_body(app: FastAPI):
    """/v1/embed reads JSON or multipart itself; publish its JSON schema so /docs shows both."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components["EmbedRequest"] = EmbedRequest.model_json_schema(
                ref_template="#/components/schemas/{model}"
            )
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    app = FastAPI(
        title="clipserve",
        version="1",
        description="Embeddings, zero-shot classification and retrieval with small CLIP models.",
        lifespan=_lifespan(settings),
    )
    app.state.settings = settings
    app.state.metrics = Metrics()
    install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    app.openapi = _openapi_with_embed_body(app)  # type: ignore[method-assign]
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(Auth, api_keys=settings.api_keys, admin_key=settings.admin_key)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["X-Request-ID", "Retry-After"],
        )
    app.add_middleware(RequestContext, metrics=app.state.metrics)
    return app
