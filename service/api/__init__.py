"""The HTTP layer: thin routers (parse, one call, shape the response), their dependencies
(`deps`), the one mapping from domain errors to HTTP (`errors`) and the ASGI middleware.

`ROUTERS` is what `create_app` includes, one router per resource.
"""

from __future__ import annotations

from fastapi import APIRouter

from clipserve.service.api import (
    admin,
    classify,
    collections,
    demo,
    embed,
    health,
    jobs,
    labelsets,
    models,
    openai,
    rank,
)

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
    jobs.router,
]
