"""Zero-shot classification of images against labels given in the request or a stored label set."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from clipserve.service.errors import InvalidInput
from clipserve.service.inference.engine import LabelScore, ModelEngine
from clipserve.service.inference.inputs import ImageFetcher
from clipserve.service.inference.registry import ModelRegistry
from clipserve.service.inference.task_engine import TaskEngine
from clipserve.service.labelsets import LabelSets
from clipserve.service.limits import check_classify, check_labels, check_prompts
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

    async def classify(
        self,
        images: Sequence[str | bytes],
        *,
        labels: Sequence[str] | None = None,
        templates: list[str] | str | None = None,
        labelset: str | None = None,
        model: str | None = None,
        top_k: int = 5,
    ) -> Classification:
        """Top-k labels per image, against `labels` (made prompts by `templates`) or the stored set
        `labelset`: the class matrix (cached, or built) and the image vectors are computed at once,
        then scored as the model was trained. Images are API strings or bytes already uploaded."""
        task = self.registry.task(model)
        if task is not None:
            return await self._classify_task(task, images, labels, templates, labelset, top_k)
        resolved = self._check(len(images), labels, templates, labelset, top_k)
        data = await self.fetcher.load(list(images))
        if labelset is not None:
            classes = await self.labelsets.classes(labelset, model)
            engine, chosen, matrix = classes.engine, classes.labels, classes.matrix
        else:
            assert labels is not None and resolved is not None
            engine, chosen = self.registry.resolve(model), list(labels)
            matrix = engine.class_matrix(chosen, resolved)
        return Classification(engine, await engine.classify(data, chosen, matrix, top_k))

    async def _classify_task(
        self,
        task: TaskEngine,
        images: Sequence[str | bytes],
        labels: Sequence[str] | None,
        templates: list[str] | str | None,
        labelset: str | None,
        top_k: int,
    ) -> Classification:
        """A task model: its graph's probabilities over its own labels (or those asked, among them)."""
        check_classify(len(images), top_k, self.settings)
        if labelset is not None:
            raise InvalidInput(
                f"labelset: {task.ref} is a task model and answers over its own labels; leave out labelset"
            )
        if templates is not None:
            raise InvalidInput(
                f"templates: {task.ref} is a task model without a text tower; leave out templates"
            )
        asked = None if labels is None else list(labels)
        task.columns(asked)  # labels not among the model's: refused before any image is decoded
        data = await self.fetcher.load(list(images))
        probabilities = await task.probabilities(data)
        return Classification(task, task.score(probabilities, asked, top_k))

    def _check(
        self,
        images: int,
        labels: Sequence[str] | None,
        templates: list[str] | str | None,
        labelset: str | None,
        top_k: int,
    ) -> tuple[str, ...] | None:
        """Every limit, before any work; the templates of a labels request."""
        check_classify(images, top_k, self.settings)
        if (labels is None) == (labelset is None):
            raise InvalidInput("give exactly one of labels or labelset")
        if labels is None:
            if templates is not None:
                raise InvalidInput("templates apply to labels; a label set keeps its own templates")
            return None
        check_labels(labels, self.settings.max_labels_per_request, self.settings.max_text_chars)
        resolved = resolve_templates(templates, self.settings)
        check_prompts(
            len(labels),
            len(resolved),
            self.settings.max_prompts_per_request,
            "max_prompts_per_request",
            "; store a larger vocabulary as a label set (PUT /v1/labelsets/{name}), which builds in the "
            "background",
        )
        return resolved
