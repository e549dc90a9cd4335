"""What the routes are given, as `Annotated` aliases. Every object is built in the app's lifespan
(`clipserve.service.app`) and kept on `app.state`; the routes never build state of their own."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from clipserve.service.classification import Classifier
from clipserve.service.collections import Collections
from clipserve.service.embedding import Embedder
from clipserve.service.inference.registry import ModelRegistry
from clipserve.service.jobs import Jobs
from clipserve.service.labelsets import LabelSets
from clipserve.service.metrics import Metrics
from clipserve.service.settings import Settings


def _state(name: str):
    # async: FastAPI runs a plain `def` dependency in its thread pool, two thread hand-offs a request
    async def get(request: Request) -> object:
        return getattr(request.app.state, name)

    get.__name__ = f"get_{name}"
    return get


SettingsDep = Annotated[Settings, Depends(_state("settings"))]
MetricsDep = Annotated[Metrics, Depends(_state("metrics"))]
RegistryDep = Annotated[ModelRegistry, Depends(_state("registry"))]
EmbedderDep = Annotated[Embedder, Depends(_state("embedder"))]
ClassifierDep = Annotated[Classifier, Depends(_state("classifier"))]
LabelSetsDep = Annotated[LabelSets, Depends(_state("labelsets"))]
CollectionsDep = Annotated[Collections, Depends(_state("collections"))]
JobsDep = Annotated[Jobs, Depends(_state("jobs"))]
