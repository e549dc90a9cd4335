"""The routers `create_app` includes, one per resource.

`ROUTERS` is the extension point: the retrieval routers (rank, collections) are appended here.
Routers get what they need through dependencies: `service.registry.get_registry` (served models,
see `service.registry` for the model API), `service.api.common.get_settings`, `get_fetcher`
(API image strings -> bytes, `service.inputs`), and raise `service.errors.ApiError` for
anything the caller got wrong.
"""

from __future__ import annotations

from fastapi import APIRouter

from service.api import admin, classify, collections, demo, embed, health, labelsets, models, openai, rank

ROUTERS: list[APIRouter] = [
    embed.router,
    classify.router,
    labelsets.router,
    openai.router,
    models.router,
    admin.router,
    health.router,
    demo.router,
    rank.router,
    collections.router,
]
