"""`create_app(settings)`: builds every piece of state in the lifespan, wires the HTTP layer, nothing else.

State on `app.state`, given to the routes by `clipserve.service.api.deps`: settings, metrics, cache, registry,
fetcher, labelsets, classifier, embedder, collections, jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from clipserve.service.api import ROUTERS
from clipserve.service.api.docs import install_docs
from clipserve.service.api.errors import install_error_handlers
from clipserve.service.api.guards import AllowedHosts, ContentTypes, CrossSiteWrites
from clipserve.service.api.middleware import Auth, BodyLimit, RequestContext
from clipserve.service.classification import Classifier
from clipserve.service.collections import Collections
from clipserve.service.embedding import Embedder
from clipserve.service.inference.cache import VectorCache
from clipserve.service.inference.inputs import ImageFetcher
from clipserve.service.inference.loading import return_memory_when_idle, serve_from_the_heap
from clipserve.service.inference.registry import ModelRegistry
from clipserve.service.jobs import Jobs
from clipserve.service.keys import KeyRing
from clipserve.service.labelsets import LabelSets
from clipserve.service.metrics import Metrics
from clipserve.service.settings import Settings, resolved_allowed_hosts

log = logging.getLogger("clipserve.app")


async def _needs(collections: Collections, labelsets: LabelSets) -> dict[str, list[str]]:
    """The versions kept loaded beside the served ones, and why: collections (and their jobs) bound
    to them, label sets classifying with them while they move to a new version."""
    needs = await collections.versions_in_use()
    for ref, why in labelsets.versions_in_use().items():
        needs.setdefault(ref, []).extend(why)
    return needs


def _served(registry: ModelRegistry) -> str:
    """`tiny@3 (providers cpu; text cache local), ...`: what each model serves with, once loaded."""
    return ", ".join(
        f"{m.ref} (providers {', '.join(m.loaded.providers)}; text cache {m.text_cache})"
        for m in registry.models()
    )


def _lifespan(settings: Settings):
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        serve_from_the_heap()
        state = app.state
        state.cache = VectorCache(
            settings.redis_url,
            lru_size=settings.cache_lru_size,
            ttl_s=settings.cache_ttl_s,
            retry_s=settings.redis_retry_s,
            metrics=state.metrics,
            matrix_bytes=settings.cache_matrix_bytes,
        )
        if settings.text_cache == "auto":
            await state.cache.measure_round_trip()  # what each model's text tower is weighed against
        state.registry = registry = ModelRegistry(settings, state.metrics, state.cache)
        state.fetcher = ImageFetcher(settings)
        state.labelsets = LabelSets(registry, state.cache, settings, state.metrics)
        state.classifier = Classifier(registry, state.labelsets, state.fetcher, settings)
        state.embedder = Embedder(registry, state.fetcher, settings)
        state.collections = Collections(registry, state.embedder, settings, state.metrics)
        state.jobs = Jobs(registry, state.collections, state.fetcher, settings, state.metrics)
        registry.needs = functools.partial(_needs, state.collections, state.labelsets)
        registry.on_replace = state.labelsets.warm
        poller: asyncio.Task | None = None
        trimmer: asyncio.Task | None = None
        try:
            await registry.start()
            await registry.keep_needed()  # the versions collections are bound to, before the first request
            await state.jobs.start()
            if settings.reload_poll_s > 0:
                poller = asyncio.get_running_loop().create_task(
                    registry.poll_forever(), name="repository-poll"
                )
            trimmer = asyncio.get_running_loop().create_task(
                return_memory_when_idle(lambda: registry.idle), name="memory-return"
            )
            log.info("serving %s", _served(registry))
            yield
        finally:
            for task in (poller, trimmer):
                if task is not None:
                    task.cancel()
            await state.jobs.close()
            await state.labelsets.close()
            await state.collections.close()
            await registry.close()
            await state.fetcher.aclose()
            await state.cache.aclose()

    return lifespan


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    app = FastAPI(
        title="clipserve",
        version="1",
        description="Embeddings, zero-shot classification and retrieval with small CLIP models.",
        lifespan=_lifespan(settings),
        docs_url=None,
        redoc_url=None,
        # FastAPI's own OpenTelemetry hooks ask the global providers on every request; the service's
        # telemetry is /metrics and the request id, so they stay off
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.settings = settings
    app.state.metrics = Metrics()
    install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    install_docs(app)
    # Added innermost first: a request meets RequestContext, AllowedHosts, CORS, CrossSiteWrites,
    # Auth, ContentTypes and BodyLimit in that order, so a refusal costs no more than its check.
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(ContentTypes, routers=ROUTERS)
    app.add_middleware(Auth, keys=key_ring(settings), metrics_open=settings.metrics_open)
    app.add_middleware(CrossSiteWrites, cors_origins=settings.cors_origins)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["X-Request-ID", "Retry-After"],
        )
    app.add_middleware(AllowedHosts, allowed=resolved_allowed_hosts(settings.allowed_hosts, settings.host))
    app.add_middleware(RequestContext, metrics=app.state.metrics)
    return app


def key_ring(settings: Settings) -> KeyRing:
    """The API keys of the settings; KeyFileError when the key file cannot be used."""
    return KeyRing(settings.api_keys, settings.admin_key, settings.api_keys_file)
