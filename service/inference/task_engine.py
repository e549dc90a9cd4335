"""Task models (bundle format 3, `clip-distill task`): an image graph that ends in class probabilities
over the model's own labels; no text tower and no embedding space. They answer /v1/classify over
their labels (or a subset of them, renormalized) and nothing else. Images are decoded in the
preprocessing pool and run as one batch per request, without the embedding models' batcher."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from clipserve.contract.bundle import Bundle, ModelRepository
from clipserve.contract.scoring import Scoring, top_k
from clipserve.service.errors import InvalidInput
from clipserve.service.inference.engine import LabelScore
from clipserve.service.inference.loading import tower_file
from clipserve.service.inference.preprocess import ImagePreprocessor
from clipserve.service.runtime import open_runtime, tower_options
from clipserve.service.settings import Settings

_SHOWN_LABELS = 10


def _some(labels: Sequence[str]) -> str:
    shown = ", ".join(labels[:_SHOWN_LABELS])
    return shown + (f", ... ({len(labels)} in all)" if len(labels) > _SHOWN_LABELS else "")


class TaskEngine:
    """One loaded version of a task model: its image graph's first output (the mixed probabilities)."""

    def __init__(self, bundle: Bundle, settings: Settings, pool: ThreadPoolExecutor):
        manifest = bundle.manifest
        if manifest.task is None:
            raise ValueError(f"{bundle.ref} is not a task model")
        self.bundle, self.manifest, self.task = bundle, manifest, manifest.task
        self.name, self.version = manifest.name, manifest.version
        self.labels = list(manifest.task.labels)
        self.dim = manifest.embed_dim
        self.content_hash = manifest.content_hash
        self.scoring: Scoring = Scoring("softmax", manifest.logit_scale)
        path, self.precision = tower_file(bundle, "image", settings)
        self.runtime = open_runtime(path, tower_options(settings, manifest, "image"))
        self._preprocessor = ImagePreprocessor(
            manifest.image, settings.max_image_pixels, settings.jpeg_draft_margin, settings.image_formats
        )
        self._pool = pool

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def describe(self) -> dict:
        """What `/v1/models` lists for it (the API adds OpenAI's own fields)."""
        return {
            "name": self.name,
            "version": self.version,
            "dim": self.dim,
            "content_hash": self.content_hash,
            "precision": {"image": self.precision},
            "providers": list(getattr(self.runtime, "active_providers", [])),
            "scoring": "softmax",
            "logit_scale": self.manifest.logit_scale,
            "logit_bias": None,
            "image_size": list(self.manifest.image.size),
            "context_length": None,
            "text_cache": None,
            "source": self.manifest.source.model_dump(exclude_none=True, exclude={"config"}),
            "task": True,
            "labels": len(self.labels),
        }

    def refuse_embedding(self) -> InvalidInput:
        return InvalidInput(
            f"model: {self.ref} is a task model: it classifies images among its own {len(self.labels)} labels "
            "through /v1/classify and has no embedding space; name an embedding model here"
        )

    def columns(self, labels: Sequence[str] | None) -> tuple[list[str], list[int]]:
        """The labels to answer over and their columns: all the model's, or those asked for (each one
        of the model's; otherwise a 400 naming the model's labels)."""
        if labels is None:
            return self.labels, list(range(len(self.labels)))
        unknown = [label for label in labels if label not in self.labels]
        if unknown:
            raise InvalidInput(
                f"labels: {self.ref} is a task model for its own labels; {_some(unknown)} "
                f"{'is' if len(unknown) == 1 else 'are'} not among them. Its labels: {_some(self.labels)}; "
                "leave out labels for all of them"
            )
        return list(labels), [self.labels.index(label) for label in labels]

    async def probabilities(self, images: Sequence[bytes]) -> np.ndarray:
        """[images, labels]: the graph's mixed probabilities (images decoded in the pool)."""
        loop = asyncio.get_running_loop()
        rows = await asyncio.gather(
            *(loop.run_in_executor(self._pool, self._preprocessor, data, i) for i, data in enumerate(images))
        )
        return await loop.run_in_executor(self._pool, self.runtime.run, np.stack(rows))

    def score(
        self, probabilities: np.ndarray, labels: Sequence[str] | None, k: int
    ) -> list[list[LabelScore]]:
        """Top-k of `labels` (all the model's when None), renormalized over them."""
        names, columns = self.columns(labels)
        chosen = probabilities[:, columns]
        chosen = chosen / np.maximum(chosen.sum(axis=1, keepdims=True), 1e-12)
        return [
            [LabelScore(names[j], float(row[j]), None) for j in order]
            for order, row in zip(top_k(chosen, k), chosen, strict=True)
        ]

    async def close(self) -> None:
        self.runtime.close()


def load_task(
    repository: ModelRepository, name: str, version: int | None, settings: Settings, pool
) -> TaskEngine:
    return TaskEngine(repository.load(name, version, verify=True), settings, pool)
