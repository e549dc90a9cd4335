"""Distillation losses. Each is a small module over tensors with explicit hyperparameters.

Conventions: embeddings are L2-normalized rows, row i of the images matches row i of the texts;
`scale` is the multiplier of cosine similarities (exp of a CLIP model's logit_scale).
Teacher tensors come in lists, one entry per ensemble member, and never receive gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

LOSS_NAMES = ("clip", "logit_kd", "feature", "icl", "class_kd")
_ALIASES = {"affinity": "logit_kd", "kd": "logit_kd", "fd": "feature", "contrastive": "clip"}


class LossConfigError(ValueError):
    pass


def canonical_loss_name(name: str) -> str:
    key = _ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in LOSS_NAMES:
        known = ", ".join(LOSS_NAMES + tuple(_ALIASES))
        raise LossConfigError(f"unknown loss {name!r}; known losses: {known}")
    return key


def _targets(n: int, device: torch.device) -> torch.Tensor:
    return torch.arange(n, device=device)


class ClipContrastiveLoss(nn.Module):
    """Symmetric InfoNCE over the batch (CLIP)."""

    def forward(self, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        logits = scale * image @ text.T
        labels = _targets(image.shape[0], image.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def soft_cross_entropy(student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    return -(teacher_probs * F.log_softmax(student_logits, dim=-1)).sum(dim=-1).mean()


class LogitDistillationLoss(nn.Module):
    """Affinity mimicking: soft cross-entropy of the student's image->text and text->image logits to
    the teacher's. Its minimum (the teacher's entropy) is reached when the student's affinities equal
    the teacher's. Fixed temperatures replace the models' own scales when given. Several teachers:
    their probabilities are averaged after the softmax."""

    def __init__(self, student_temperature: float | None = None, teacher_temperature: float | None = None):
        super().__init__()
        self.student_temperature = student_temperature
        self.teacher_temperature = teacher_temperature

    def _teacher_probs(
        self, images: Sequence[torch.Tensor], texts: Sequence[torch.Tensor], scales: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        img_probs, txt_probs = [], []
        for image, text, scale in zip(images, texts, scales, strict=True):
            factor = 1.0 / self.teacher_temperature if self.teacher_temperature else scale
            logits = factor * image @ text.T
            img_probs.append(logits.softmax(dim=-1))
            txt_probs.append(logits.T.softmax(dim=-1))
        return torch.stack(img_probs).mean(0), torch.stack(txt_probs).mean(0)

    def forward(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        scale: torch.Tensor,
        teacher_images: Sequence[torch.Tensor],
        teacher_texts: Sequence[torch.Tensor],
        teacher_scales: Sequence[torch.Tensor],
    ) -> torch.Tensor:
        with torch.no_grad():
            img_probs, txt_probs = self._teacher_probs(teacher_images, teacher_texts, teacher_scales)
        factor = 1.0 / self.student_temperature if self.student_temperature else scale
        logits = factor * image @ text.T
        return (soft_cross_entropy(logits, img_probs) + soft_cross_entropy(logits.T, txt_probs)) / 2


class FeatureDistillationLoss(nn.Module):
    """Match normalized embeddings: `mse` (squared distance) or `cosine` (1 - cos), averaged over
    teachers. Inputs are already in each teacher's space (see TeacherProjection)."""

    def __init__(self, kind: str = "mse"):
        super().__init__()
        if kind not in ("mse", "cosine"):
            raise LossConfigError(f"feature distillation kind must be 'mse' or 'cosine', got {kind!r}")
        self.kind = kind

    def _distance(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        student = F.normalize(student, dim=-1)
        if self.kind == "mse":
            return (student - teacher).pow(2).sum(dim=-1).mean()
        return (1 - (student * teacher).sum(dim=-1)).mean()

    def forward(
        self,
        image: Sequence[torch.Tensor],
        text: Sequence[torch.Tensor],
        teacher_images: Sequence[torch.Tensor],
        teacher_texts: Sequence[torch.Tensor],
    ) -> torch.Tensor:
        pairs = list(zip(image, teacher_images, strict=True)) + list(zip(text, teacher_texts, strict=True))
        return torch.stack([self._distance(s, t.detach()) for s, t in pairs]).mean()


class InteractiveContrastiveLoss(nn.Module):
    """CLIP-KD's ICL: the student's images contrasted against the teacher's texts, and the student's
    texts against the teacher's images, averaged over teachers."""

    def forward(
        self,
        image: Sequence[torch.Tensor],
        text: Sequence[torch.Tensor],
        scale: torch.Tensor,
        teacher_images: Sequence[torch.Tensor],
        teacher_texts: Sequence[torch.Tensor],
    ) -> torch.Tensor:
        losses = []
        for s_img, s_txt, t_img, t_txt in zip(image, text, teacher_images, teacher_texts, strict=True):
            s_img, s_txt = F.normalize(s_img, dim=-1), F.normalize(s_txt, dim=-1)
            labels = _targets(s_img.shape[0], s_img.device)
            img_to_teacher_text = scale * s_img @ t_txt.detach().T
            txt_to_teacher_image = scale * s_txt @ t_img.detach().T
            losses.append(
                (F.cross_entropy(img_to_teacher_text, labels) + F.cross_entropy(txt_to_teacher_image, labels))
                / 2
            )
        return torch.stack(losses).mean()


class ClassVectorDistillationLoss(nn.Module):
    """PromptKD-style KD on unlabeled images: KL of the student's image logits over the teacher's
    class vectors to the teacher's image logits over the same vectors, both at temperature T and
    scaled by T^2. Both sides use one logit scale, the teacher's (`student_scale="teacher"`): in
    PromptKD both scales are CLIP's (100) and equal; here the student's is learned and starts at
    1/0.07, and with it the student's distribution would stay flatter than the teacher's however well
    its embeddings agree. `student_scale="own"` uses the student's scale. Reduction: mean over images
    (PromptKD sums and divides by images x classes, then multiplies by a large KD weight). With
    `num_classes`, a DHO-style second head (a linear classifier on the student's image embedding) is
    trained with cross-entropy wherever labels are given (label -1 means unlabeled)."""

    def __init__(
        self,
        temperature: float = 1.0,
        embed_dim: int | None = None,
        num_classes: int | None = None,
        student_scale: str = "teacher",
    ):
        super().__init__()
        if temperature <= 0:
            raise LossConfigError(f"class-vector KD temperature must be > 0, got {temperature}")
        if student_scale not in ("teacher", "own"):
            raise LossConfigError(
                f"class-vector KD student_scale must be 'teacher' or 'own', got {student_scale!r}"
            )
        self.temperature = temperature
        self.student_scale = student_scale
        self.label_head = nn.Linear(embed_dim, num_classes) if embed_dim and num_classes else None

    def forward(
        self,
        image: Sequence[torch.Tensor],
        scale: torch.Tensor,
        teacher_images: Sequence[torch.Tensor],
        teacher_scales: Sequence[torch.Tensor],
        class_vectors: Sequence[torch.Tensor],
        student_image: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        losses = []
        for s_img, t_img, t_scale, vectors in zip(
            image, teacher_images, teacher_scales, class_vectors, strict=True
        ):
            vectors = vectors.detach()
            s_scale = t_scale.detach() if self.student_scale == "teacher" else scale
            s_logits = s_scale * F.normalize(s_img, dim=-1) @ vectors.T / self.temperature
            with torch.no_grad():
                t_probs = (t_scale * t_img @ vectors.T / self.temperature).softmax(dim=-1)
            kl = F.kl_div(F.log_softmax(s_logits, dim=-1), t_probs, reduction="batchmean")
            losses.append(kl * self.temperature**2)
        loss = torch.stack(losses).mean()
        if self.label_head is not None and labels is not None and student_image is not None:
            known = labels >= 0
            if known.any():
                loss = loss + F.cross_entropy(self.label_head(student_image[known]), labels[known])
        return loss


class TeacherProjection(nn.Module):
    """Maps student embeddings into each teacher's space: identity when dims match, else a learned
    linear projection (or an error when projections are disabled)."""

    def __init__(self, student_dim: int, teacher_dims: Sequence[int], allow_projection: bool = True):
        super().__init__()
        layers: list[nn.Module] = []
        for i, dim in enumerate(teacher_dims):
            if dim == student_dim:
                layers.append(nn.Identity())
            elif allow_projection:
                layers.append(nn.Linear(student_dim, dim, bias=False))
            else:
                raise LossConfigError(
                    f"student embed dim {student_dim} differs from teacher {i}'s {dim} and projections are "
                    "disabled: enable projection or pick a student with the teacher's embed dim"
                )
        self.layers = nn.ModuleList(layers)

    def forward(self, embeddings: torch.Tensor) -> list[torch.Tensor]:
        return [layer(embeddings) for layer in self.layers]


@dataclass(frozen=True)
class LossWeights:
    """Which losses run, with their weights; e.g. {'clip': 1.0, 'logit_kd': 1.0}."""

    weights: dict[str, float]

    @classmethod
    def parse(cls, spec: str | dict[str, float] | Sequence[str]) -> LossWeights:
        """'clip=1,logit_kd=2' or ['clip', 'feature=0.5'] or a mapping."""
        if isinstance(spec, dict):
            items = list(spec.items())
        else:
            entries = spec.split(",") if isinstance(spec, str) else list(spec)
            items = []
            for entry in filter(None, (e.strip() for e in entries)):
                name, _, weight = entry.partition("=")
                try:
                    items.append((name, float(weight) if weight else 1.0))
                except ValueError as exc:
                    raise LossConfigError(f"loss weight in {entry!r} is not a number") from exc
        weights = {canonical_loss_name(name): float(weight) for name, weight in items}
        if not weights:
            raise LossConfigError("no loss selected")
        return cls(weights)

    @property
    def needs_teacher(self) -> bool:
        return any(name != "clip" for name in self.weights)
