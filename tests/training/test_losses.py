"""Each distillation loss against known values, its minimum, and where its gradients go."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clipserve.training.losses import (
    ClassVectorDistillationLoss,
    ClipContrastiveLoss,
    FeatureDistillationLoss,
    InteractiveContrastiveLoss,
    LogitDistillationLoss,
    LossConfigError,
    LossWeights,
    TeacherProjection,
    canonical_loss_name,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _unit(rows: int, dim: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _pairs(
    rows: int = 8, dim: int = 16, seed: int = 0, noise: float = 0.3
) -> tuple[torch.Tensor, torch.Tensor]:
    image = _unit(rows, dim, seed)
    text = F.normalize(image + noise * _unit(rows, dim, seed + 1), dim=-1)
    return image, text


def test_clip_loss_known_value_for_orthogonal_pairs() -> None:
    # image i == text i, all rows orthogonal: logits are scale on the diagonal, 0 elsewhere
    n, scale = 4, torch.tensor(2.0)
    eye = torch.eye(n)
    expected = -math.log(math.exp(2) / (math.exp(2) + n - 1))
    assert ClipContrastiveLoss()(eye, eye, scale).item() == pytest.approx(expected, rel=1e-6)


def test_clip_loss_uniform_when_all_embeddings_equal() -> None:
    n = 6
    same = F.normalize(torch.ones(n, 4), dim=-1)
    assert ClipContrastiveLoss()(same, same, torch.tensor(5.0)).item() == pytest.approx(math.log(n), rel=1e-6)


def test_logit_kd_identical_student_and_teacher_is_the_minimum() -> None:
    image, text = _pairs()
    scale = torch.tensor(10.0)
    loss = LogitDistillationLoss()
    at_teacher = loss(image, text, scale, [image], [text], [scale])
    # soft cross-entropy at the teacher's own distribution equals the teacher's entropy
    logits = scale * image @ text.T
    entropy = (
        -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean()
        - (logits.T.softmax(-1) * logits.T.log_softmax(-1)).sum(-1).mean()
    ) / 2
    assert at_teacher.item() == pytest.approx(entropy.item(), rel=1e-5)
    for seed in range(3):
        other_image, other_text = _pairs(seed=10 + seed)
        assert loss(other_image, other_text, scale, [image], [text], [scale]) > at_teacher


def test_logit_kd_shuffled_pairs_raise_it() -> None:
    image, text = _pairs()
    scale = torch.tensor(10.0)
    loss = LogitDistillationLoss()
    aligned = loss(image, text, scale, [image], [text], [scale])
    shuffled = loss(
        image,
        text[torch.randperm(8, generator=torch.Generator().manual_seed(3))],
        scale,
        [image],
        [text],
        [scale],
    )
    assert shuffled > aligned + 0.1


def test_logit_kd_gradient_is_zero_at_the_teacher_and_only_reaches_the_student() -> None:
    image, text = _pairs()
    student_image = image.clone().requires_grad_(True)
    teacher_image = image.clone().requires_grad_(True)
    scale = torch.tensor(10.0)
    loss = LogitDistillationLoss()(student_image, text, scale, [teacher_image], [text], [scale])
    loss.backward()
    assert student_image.grad is not None and student_image.grad.abs().max() < 1e-5
    assert teacher_image.grad is None


def test_logit_kd_fixed_temperatures_replace_the_scales() -> None:
    image, text = _pairs()
    fixed = LogitDistillationLoss(student_temperature=0.1, teacher_temperature=0.1)
    own = LogitDistillationLoss()
    ten = torch.tensor(10.0)
    assert fixed(
        image, text, torch.tensor(3.0), [image], [text], [torch.tensor(50.0)]
    ).item() == pytest.approx(own(image, text, ten, [image], [text], [ten]).item(), rel=1e-6)


def test_logit_kd_ensemble_averages_probabilities_after_softmax() -> None:
    image, text = _pairs()
    other_image, other_text = _pairs(seed=5)
    scale = torch.tensor(10.0)
    loss = LogitDistillationLoss()
    both = loss(image, text, scale, [image, other_image], [text, other_text], [scale, scale])
    p1 = (scale * image @ text.T).softmax(-1)
    p2 = (scale * other_image @ other_text.T).softmax(-1)
    q1 = (scale * image @ text.T).T.softmax(-1)
    q2 = (scale * other_image @ other_text.T).T.softmax(-1)
    logits = scale * image @ text.T
    expected = (
        -(((p1 + p2) / 2) * logits.log_softmax(-1)).sum(-1).mean()
        - (((q1 + q2) / 2) * logits.T.log_softmax(-1)).sum(-1).mean()
    ) / 2
    assert both.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_feature_distillation_is_zero_at_the_teacher_and_known_for_orthogonal(kind: str) -> None:
    image, text = _pairs()
    loss = FeatureDistillationLoss(kind)
    assert loss([image], [text], [image], [text]).item() == pytest.approx(0.0, abs=1e-6)
    eye = torch.eye(4)
    rolled = eye.roll(1, dims=0)
    # orthogonal unit vectors: squared distance 2, cosine distance 1
    expected = 2.0 if kind == "mse" else 1.0
    assert loss([eye], [eye], [rolled], [rolled]).item() == pytest.approx(expected, rel=1e-6)
    shuffled = text[torch.randperm(8, generator=torch.Generator().manual_seed(1))]
    assert loss([image], [shuffled], [image], [text]) > 0.1


def test_feature_distillation_rejects_unknown_kind() -> None:
    with pytest.raises(LossConfigError, match="'mse' or 'cosine'"):
        FeatureDistillationLoss("l1")


def test_interactive_contrastive_matches_clip_loss_across_models() -> None:
    image, text = _pairs()
    t_image, t_text = _pairs(seed=7)
    scale = torch.tensor(10.0)
    icl = InteractiveContrastiveLoss()([image], [text], scale, [t_image], [t_text])
    labels = torch.arange(8)
    expected = (
        F.cross_entropy(scale * image @ t_text.T, labels) + F.cross_entropy(scale * text @ t_image.T, labels)
    ) / 2
    assert icl.item() == pytest.approx(expected.item(), rel=1e-6)
    shuffled = InteractiveContrastiveLoss()([image], [text[torch.randperm(8)]], scale, [image], [text])
    aligned = InteractiveContrastiveLoss()([image], [text], scale, [image], [text])
    assert shuffled > aligned


def test_class_vector_kd_zero_when_student_sees_what_teacher_sees_and_label_head_learns() -> None:
    image, _ = _pairs()
    vectors = _unit(5, 16, 42)
    scale = torch.tensor(10.0)
    loss = ClassVectorDistillationLoss(temperature=2.0)
    assert loss([image], scale, [image], [scale], [vectors]).item() == pytest.approx(0.0, abs=1e-6)
    other, _ = _pairs(seed=9)
    assert loss([other], scale, [image], [scale], [vectors]) > 0.01
    with_head = ClassVectorDistillationLoss(temperature=2.0, embed_dim=16, num_classes=5)
    labels = torch.tensor([0, 1, 2, 3, 4, -1, -1, 0])
    total = with_head([image], scale, [image], [scale], [vectors], student_image=image, labels=labels)
    known = labels >= 0
    expected_ce = F.cross_entropy(with_head.label_head(image[known]), labels[known])
    assert total.item() == pytest.approx(expected_ce.item(), rel=1e-5)


def test_projection_identity_for_equal_dims_and_error_when_disabled() -> None:
    projection = TeacherProjection(16, [16, 32])
    out = projection(torch.ones(2, 16))
    assert out[0].shape == (2, 16) and torch.equal(out[0], torch.ones(2, 16))
    assert out[1].shape == (2, 32)
    with pytest.raises(LossConfigError, match="differs from teacher 1's 32"):
        TeacherProjection(16, [16, 32], allow_projection=False)


def test_gradients_reach_only_the_student_through_every_loss() -> None:
    image, text = _pairs()
    s_image = image.clone().requires_grad_(True)
    s_text = text.clone().requires_grad_(True)
    t_image, t_text = _pairs(seed=3)
    t_image.requires_grad_(True)
    t_text.requires_grad_(True)
    scale = torch.tensor(10.0)
    vectors = _unit(5, 16, 1).requires_grad_(True)
    total = (
        LogitDistillationLoss()(s_image, s_text, scale, [t_image], [t_text], [scale])
        + FeatureDistillationLoss()([s_image], [s_text], [t_image], [t_text])
        + InteractiveContrastiveLoss()([s_image], [s_text], scale, [t_image], [t_text])
        + ClassVectorDistillationLoss()([s_image], scale, [t_image], [scale], [vectors])
    )
    total.backward()
    assert s_image.grad is not None and s_image.grad.abs().sum() > 0
    assert s_text.grad is not None and s_text.grad.abs().sum() > 0
    assert t_image.grad is None and t_text.grad is None and vectors.grad is None


def test_loss_names_parse_with_weights_and_aliases() -> None:
    weights = LossWeights.parse("clip=1, affinity=2,feature")
    assert weights.weights == {"clip": 1.0, "logit_kd": 2.0, "feature": 1.0}
    assert weights.needs_teacher
    assert not LossWeights.parse(["clip"]).needs_teacher


@pytest.mark.parametrize("spec", ["clip,dino", "bogus=1"])
def test_unknown_loss_name_is_a_clear_error(spec: str) -> None:
    with pytest.raises(LossConfigError, match=r"unknown loss .*known losses: clip, logit_kd"):
        LossWeights.parse(spec)


def test_bad_loss_weight_is_a_clear_error() -> None:
    with pytest.raises(LossConfigError, match="not a number"):
        LossWeights.parse("clip=heavy")
    assert canonical_loss_name(" KD ") == "logit_kd"
