"""The training objective: the student, the learned projections into teacher space, and the weighted
sum of the selected losses. One module, so that DDP sees every trainable parameter in one place."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from pydantic import ConfigDict, Field
from torch import nn

from clipserve.training.data import Batch
from clipserve.training.losses import (
    ClassVectorDistillationLoss,
    ClipContrastiveLoss,
    FeatureDistillationLoss,
    InteractiveContrastiveLoss,
    LogitDistillationLoss,
    LossConfigError,
    LossWeights,
    TeacherProjection,
)
from clipserve.training.models import ClipModel, TowerOutputs
from clipserve.training.settings import LossOptions


class LossSettings(LossOptions):
    """The objective's options (defined once, in settings.py) and the weights of its losses."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    weights: LossWeights = Field(default_factory=lambda: LossWeights({"clip": 1.0}))


@dataclass
class UnlabeledImages:
    """Embeddings of a batch of images without captions: the student's (L2-normalized) and each
    teacher's, for the image-side distillation losses."""

    student: torch.Tensor
    teacher: list[torch.Tensor]


# losses that learn from images alone, and so from unlabeled images
IMAGE_SIDE_LOSSES = ("feature", "class_kd")


def _gather(tensor: torch.Tensor, with_grad: bool) -> torch.Tensor:
    """All ranks' rows, in rank order, so every loss sees the global batch as one process would."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    if with_grad:
        return torch.cat(dist_fn.all_gather(tensor), dim=0)
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


class Distiller(nn.Module):
    def __init__(
        self,
        student: ClipModel,
        settings: LossSettings,
        teacher_dims: list[int] | None = None,
        class_vectors: list[torch.Tensor] | None = None,
    ):
        super().__init__()
        self.student = student.model
        self.image_key, self.text_key = student.image_key, student.text_key
        self.settings = settings
        weights = settings.weights.weights
        teacher_dims = teacher_dims or []
        if settings.weights.needs_teacher and not teacher_dims:
            raise LossConfigError(
                f"losses {sorted(weights)} need a teacher (or stored teacher targets); none given"
            )
        if "class_kd" in weights and not class_vectors:
            raise LossConfigError(
                "the class_kd loss needs class names (a dataset with classes, or --class-names)"
            )
        if settings.fixed_temperature:
            with torch.no_grad():
                self.student.logit_scale.fill_(math.log(1.0 / settings.fixed_temperature))
            self.student.logit_scale.requires_grad_(False)
        needs_projection = bool({"feature", "icl", "class_kd"} & set(weights))
        self.projection = (
            TeacherProjection(student.embed_dim, teacher_dims, settings.projection)
            if needs_projection
            else None
        )
        self.clip = ClipContrastiveLoss()
        self.logit_kd = LogitDistillationLoss(settings.student_temperature, settings.teacher_temperature)
        self.feature = FeatureDistillationLoss(settings.feature_kind)
        self.icl = InteractiveContrastiveLoss()
        num_classes = class_vectors[0].shape[0] if class_vectors and settings.label_head else None
        self.class_kd = ClassVectorDistillationLoss(
            settings.class_kd_temperature, student.embed_dim, num_classes
        )
        for i, vectors in enumerate(class_vectors or []):
            self.register_buffer(f"class_vectors_{i}", vectors.clone(), persistent=False)
        self._num_class_vectors = len(class_vectors or [])

    def class_vectors(self) -> list[torch.Tensor]:
        return [getattr(self, f"class_vectors_{i}") for i in range(self._num_class_vectors)]

    def forward(
        self,
        batch: Batch,
        teacher: list[TowerOutputs] | None,
        unlabeled: Batch | None = None,
        unlabeled_teacher: list[TowerOutputs] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted losses of one batch of captioned pairs; with `unlabeled` images (and the
        teacher's outputs for them), the image-side distillation losses learn from those instead."""
        image = _gather(self.student.encode_image(batch.images[self.image_key], normalize=True), True)
        text = _gather(self.student.encode_text(batch.tokens[self.text_key], normalize=True), True)
        scale = self.student.logit_scale.exp()
        if teacher is not None:
            teacher = [
                TowerOutputs(_gather(t.image, False), _gather(t.text, False), t.logit_scale) for t in teacher
            ]
        images_only = None
        if unlabeled is not None and unlabeled_teacher is not None:
            student_images = self.student.encode_image(unlabeled.images[self.image_key], normalize=True)
            images_only = UnlabeledImages(
                _gather(student_images, True), [_gather(t.image, False) for t in unlabeled_teacher]
            )
        parts = self._losses(image, text, scale, teacher, _gather(batch.labels, False), images_only)
        weights = self.settings.weights.weights
        total = sum(weights[name] * value for name, value in parts.items())
        return total, {name: value.detach() for name, value in parts.items()}

    def _losses(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        scale: torch.Tensor,
        teacher: list[TowerOutputs] | None,
        labels: torch.Tensor,
        unlabeled: UnlabeledImages | None = None,
    ) -> dict[str, torch.Tensor]:
        weights = self.settings.weights.weights
        parts: dict[str, torch.Tensor] = {}
        if "clip" in weights:
            parts["clip"] = self.clip(image, text, scale)
        if teacher is None:
            return parts
        t_images = [t.image for t in teacher]
        t_texts = [t.text for t in teacher]
        t_scales = [t.logit_scale for t in teacher]
        if "logit_kd" in weights:
            parts["logit_kd"] = self.logit_kd(image, text, scale, t_images, t_texts, t_scales)
        if self.projection is not None:
            p_images, p_texts = self.projection(image), self.projection(text)
            # the image-side losses: on the unlabeled images when there are any, else the captioned ones
            kd_p_images, kd_t_images = p_images, t_images
            if unlabeled is not None:
                kd_p_images, kd_t_images = self.projection(unlabeled.student), unlabeled.teacher
            if "feature" in weights:
                parts["feature"] = self.feature(kd_p_images, p_texts, kd_t_images, t_texts)
            if "icl" in weights:
                parts["icl"] = self.icl(p_images, p_texts, scale, t_images, t_texts)
            if "class_kd" in weights:
                parts["class_kd"] = self.class_kd(
                    kd_p_images,
                    scale,
                    kd_t_images,
                    t_scales,
                    self.class_vectors(),
                    student_image=image,
                    labels=labels,
                )
        return parts
