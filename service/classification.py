"""Zero-shot classification of images against labels given in the request or a stored label set."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import numpy as np

from clipserve.service.api.schemas import ClassifyRequest
from clipserve.service.errors import InvalidInput
from clipserve.service.inference.engine import LabelScore, ModelEngine
from clipserve.service.inference.inputs import ImageFetcher
from clipserve.service.inference.registry import ModelRegistry
from clipserve.service.inference.task_engine import TaskEngine
from clipserve.service.labelsets import LabelSets
from clipserve.service.limits import check_images, check_labels, check_prompts, check_top_k
from clipserve.service.settings import Settings
from clipserve.service.templates import resolve_templates


@dataclass
class Classification:
    engine: ModelEngine | TaskEngine
    results: list[list[LabelScore]]


class Classifier:
    def __init__(
        self, registry: ModelRegistry, labelsets: LabelSets, fetcher: ImageFetcher, settings: Settings
    ):
        self.registry, self.labelsets, self.fetcher, self.settings = registry, labelsets, fetcher, settings

    async def classify(self, request: ClassifyRequest) -> Classification:
        """Top-k labels per image: the class matrix (cached, or built) and the image vectors are
        computed at once, then scored as the model was trained. A full image queue refuses the
        request before either starts, and when one fails the other stops."""
        task = self.registry.task(request.model)
        if task is not None:
            return await self._classify_task(task, request)
        templates = self._check(request)
        images = await self.fetcher.load(request.images)
        classes: Coroutine[Any, Any, np.ndarray]
        if request.labelset is not None:
            engine, labelset = await self.labelsets.bound(request.labelset, request.model)
            engine.admit_images(len(images))
            labels = labelset.labels
            classes = self.labelsets.matrix(engine, labelset)
        else:
            assert request.labels is not None and templates is not None
            engine, labels = self.registry.resolve(request.model), request.labels
            engine.admit_images(len(images))
            classes = engine.class_matrix(labels, templates)
        loop = asyncio.get_running_loop()
        work = [loop.create_task(classes), loop.create_task(engine.encode_images(images))]
        try:
            matrix, vectors = await asyncio.gather(*work)
        finally:
            for task in work:
                task.cancel()
        return Classification(engine, engine.score(vectors, labels, matrix, request.top_k))

    async def _classify_task(self, task: TaskEngine, request: ClassifyRequest) -> Classification:
        """A task model: its graph's probabilities over its own labels (or those asked, among them)."""
        if not request.images:
            raise InvalidInput("images: the list is empty; give at least one image")
        check_images(len(request.images), self.settings)
        check_top_k(request.top_k, self.settings)
        if request.labelset is not None:
            raise InvalidInput(
                f"labelset: {task.ref} is a task model and answers over its own labels; leave out labelset"
            )
        if request.templates is not None:
            raise InvalidInput(
                f"templates: {task.ref} is a task model without a text tower; leave out templates"
            )
        task.columns(request.labels)  # labels not among the model's: refused before any image is decoded
        images = await self.fetcher.load(request.images)
        probabilities = await task.probabilities(images)
        return Classification(task, task.score(probabilities, request.labels, request.top_k))

    def _check(self, request: ClassifyRequest) -> tuple[str, ...] | None:
        """Every limit, before any work; the templates of a labels request."""
        if not request.images:
            raise InvalidInput("images: the list is empty; give at least one image")
        check_images(len(request.images), self.settings)
        check_top_k(request.top_k, self.settings)
        if (request.labels is None) == (request.labelset is None):
            raise InvalidInput("give exactly one of labels or labelset")
        if request.labels is None:
            if request.templates is not None:
                raise InvalidInput("templates apply to labels; a label set keeps its own templates")
            return None
        check_labels(request.labels, self.settings.max_labels_per_request, self.settings.max_text_chars)
        templates = resolve_templates(request.templates, self.settings)
        check_prompts(
            len(request.labels),
            len(templates),
            self.settings.max_prompts_per_request,
            "max_prompts_per_request",
            "; store a larger vocabulary as a label set (PUT /v1/labelsets/{name}), which builds in the "
            "background",
        )
        return templates
