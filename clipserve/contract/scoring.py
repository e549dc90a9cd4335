"""Zero-shot classification as a model defines it, shared by the service and by training.

One rule for each step, so the classifier the service runs and the one training evaluates agree:

- a prompt is `template.replace("{}", label)` (`fill_template`), labels major, templates minor;
- a class vector is the mean of a label's L2-normalized prompt embeddings, renormalized
  (`class_vectors`);
- scores come from cosine similarities as the model was trained (`Scoring`): a softmax over the
  labels of `logit_scale * cos` (CLIP), or an independent sigmoid of `logit_scale * cos + logit_bias`
  per label (SigLIP);
- the top k are taken highest first (`top_k`).

numpy only: no torch, so the service imports it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

ScoringKind = Literal["softmax", "sigmoid"]


def fill_template(template: str, label: str) -> str:
    """The prompt for one label: every `{}` in the template replaced by the label, nothing else."""
    return template.replace("{}", label)


def prompts(labels: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every label in every template, label-major: the order `class_vectors` expects."""
    return [fill_template(template, label) for label in labels for template in templates]


def normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (all-zero rows stay zero), as float32."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def class_vectors(prompt_embeddings: np.ndarray, templates: int) -> np.ndarray:
    """[labels * templates, D] prompt embeddings (label-major) -> [labels, D] unit class vectors."""
    embeddings = normalize(prompt_embeddings)
    if templates < 1 or len(embeddings) % templates:
        raise ValueError(f"{len(embeddings)} prompt embeddings do not split into groups of {templates}")
    means = embeddings.reshape(-1, templates, embeddings.shape[-1]).mean(axis=1)
    return normalize(means)


@dataclass(frozen=True)
class Scoring:
    """How similarities become scores. `logit_scale` has exp() applied already."""

    kind: ScoringKind = "softmax"
    logit_scale: float = 100.0
    logit_bias: float = 0.0

    def logits(self, similarity: np.ndarray) -> np.ndarray:
        logits = self.logit_scale * np.asarray(similarity, dtype=np.float64)
        return logits + self.logit_bias if self.kind == "sigmoid" else logits

    def probabilities(self, similarity: np.ndarray) -> np.ndarray:
        """Per row (one image or query) over the last axis (labels or candidates), as float32.

        softmax: the scores of a row sum to 1; sigmoid: each label on its own, in (0, 1)."""
        logits = self.logits(similarity)
        if self.kind == "sigmoid":
            return (0.5 * (1.0 + np.tanh(0.5 * logits))).astype(np.float32)  # overflow-free sigmoid
        logits = logits - logits.max(axis=-1, keepdims=True)
        exp = np.exp(logits)
        return (exp / exp.sum(axis=-1, keepdims=True)).astype(np.float32)

    def ranked(self, similarity: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The top k per row by probability, highest first (`top_k`), and the probabilities."""
        probabilities = self.probabilities(similarity)
        return top_k(probabilities, k), probabilities


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores per row, highest first (equal scores among them in index order)."""
    scores = np.atleast_2d(scores)
    k = max(0, min(k, scores.shape[-1]))
    if k < scores.shape[-1]:
        part = np.argpartition(-scores, k - 1, axis=-1)[:, :k] if k else np.zeros((len(scores), 0), int)
        part = np.sort(part, axis=-1)  # label order first, so the stable sort breaks ties by it
    else:
        part = np.broadcast_to(np.arange(scores.shape[-1]), scores.shape)
    order = np.argsort(-np.take_along_axis(scores, part, axis=-1), axis=-1, kind="stable")
    return np.take_along_axis(part, order, axis=-1)
