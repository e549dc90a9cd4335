"""Each distillation loss, trained alone through the real objective (clipserve.training.objective.Distiller),
moves a student toward a fixed, better teacher faster than the CLIP loss alone.

The task is tiny and runs in well under a second per loss: 8 classes, image and text inputs are
noisy class prototypes, and the towers are linear maps into a 16-d embedding. The teacher maps each
class's image and text prototypes onto one unit vector of its own, with a logit scale of 40; the
student starts from a random init with CLIP's initial scale (1/0.07). Each loss is judged by the
agreement it is meant to create, measured on held-out pairs:

- affinity mimicking (logit_kd): KL between the teacher's and the student's batch affinities, each
  at its own scale (TinyCLIP);
- feature distillation: cosine between the student's and the teacher's embeddings (CLIP-KD FD);
- interactive contrastive (icl): retrieval of the teacher's texts from the student's images (CLIP-KD);
- class-vector KD: KL and top-1 agreement of the student's class distribution over the teacher's class
  vectors with the teacher's (PromptKD).

And class-vector KD on unlabeled images reaches classes that no caption shows, which the same loss on
the captioned pairs cannot.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clipserve.training.data import Batch
from clipserve.training.losses import LossWeights
from clipserve.training.models import ClipModel, TowerOutputs
from clipserve.training.objective import Distiller, LossSettings

pytestmark = pytest.mark.usefixtures("torch_one_thread")

CLASSES, INPUT_DIM, EMBED_DIM = 8, 24, 16
TEACHER_SCALE = 40.0
STEPS, BATCH = 40, 32


class LinearTowers(nn.Module):
    """Just enough of an open_clip CLIP for the objective: two towers and a learned logit scale."""

    def __init__(self, seed: int, scale: float = 1 / 0.07):
        super().__init__()
        torch.manual_seed(seed)
        self.image = nn.Linear(INPUT_DIM, EMBED_DIM)
        self.text = nn.Linear(INPUT_DIM, EMBED_DIM)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(scale)))

    def encode_image(self, x: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        out = self.image(x)
        return F.normalize(out, dim=-1) if normalize else out

    def encode_text(self, x: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        out = self.text(x)
        return F.normalize(out, dim=-1) if normalize else out


def _wrap(model: nn.Module) -> ClipModel:
    cfg = {"embed_dim": EMBED_DIM, "text_cfg": {"context_length": 1}}
    return ClipModel(model, cfg, {"size": [1, 1]}, None, "linear-towers")


class Task:
    """Noisy prototypes per class, and a teacher that maps both modalities of a class onto one vector."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.image_protos = torch.randn(CLASSES, INPUT_DIM, generator=g)
        self.text_protos = torch.randn(CLASSES, INPUT_DIM, generator=g)
        self.class_embeds = F.normalize(torch.randn(CLASSES, EMBED_DIM, generator=g), dim=-1)
        self.teacher = LinearTowers(seed=1, scale=TEACHER_SCALE)
        with torch.no_grad():
            # least squares: prototype -> its class's vector, for both towers
            for layer, protos in (
                (self.teacher.image, self.image_protos),
                (self.teacher.text, self.text_protos),
            ):
                layer.weight.copy_((torch.linalg.pinv(protos) @ self.class_embeds).T)
                layer.bias.zero_()
        self.teacher.eval().requires_grad_(False)
        self.class_vectors = F.normalize(self.teacher.encode_text(self.text_protos, normalize=True), dim=-1)

    def pairs(
        self, n: int, seed: int, classes: int = CLASSES, first: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`n` noisy pairs of classes first..first+classes-1."""
        g = torch.Generator().manual_seed(seed)
        labels = first + torch.randint(classes, (n,), generator=g)
        images = self.image_protos[labels] + 0.6 * torch.randn(n, INPUT_DIM, generator=g)
        texts = self.text_protos[labels] + 0.6 * torch.randn(n, INPUT_DIM, generator=g)
        return images, texts, labels

    @torch.no_grad()
    def teacher_outputs(self, images: torch.Tensor, texts: torch.Tensor) -> TowerOutputs:
        return TowerOutputs(
            self.teacher.encode_image(images, normalize=True),
            self.teacher.encode_text(texts, normalize=True),
            self.teacher.logit_scale.exp(),
        )


@pytest.fixture(scope="module")
def task() -> Task:
    return Task()


def _train(
    task: Task, losses: str, captioned_classes: int = CLASSES, unlabeled: bool = False
) -> LinearTowers:
    """`losses` for STEPS steps on pairs of the first `captioned_classes` classes; with `unlabeled`,
    also on images of every class without their texts (for the image-side losses)."""
    model = LinearTowers(seed=7)
    student = _wrap(model)
    distiller = Distiller(
        student,
        LossSettings(weights=LossWeights.parse(losses)),
        teacher_dims=[EMBED_DIM],
        class_vectors=[task.class_vectors],
    )
    optimizer = torch.optim.Adam(distiller.parameters(), lr=2e-2)
    for step in range(STEPS):
        images, texts, labels = task.pairs(BATCH, seed=100 + step, classes=captioned_classes)
        batch = Batch({student.image_key: images}, {student.text_key: texts}, labels, torch.arange(BATCH))
        extra = extra_outputs = None
        if unlabeled:
            more, more_texts, more_labels = task.pairs(BATCH, seed=500 + step)
            extra = Batch({student.image_key: more}, {}, more_labels, torch.arange(BATCH))
            extra_outputs = [task.teacher_outputs(more, more_texts)]
        loss, _ = distiller(batch, [task.teacher_outputs(images, texts)], extra, extra_outputs)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def _kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> float:
    return float(F.kl_div(student_logits.log_softmax(-1), teacher_logits.softmax(-1), reduction="batchmean"))


@torch.no_grad()
def agreement(task: Task, model: LinearTowers) -> dict[str, float]:
    """Higher is closer to the teacher, for every entry (KLs are negated)."""
    images, texts, _ = task.pairs(256, seed=99)
    t = task.teacher_outputs(images, texts)
    s_img, s_txt = model.encode_image(images, normalize=True), model.encode_text(texts, normalize=True)
    s_scale = model.logit_scale.exp()
    t_aff, s_aff = t.logit_scale * t.image @ t.text.T, s_scale * s_img @ s_txt.T
    affinity_kl = (_kl(t_aff, s_aff) + _kl(t_aff.T, s_aff.T)) / 2
    feature_cos = float(((s_img * t.image).sum(-1).mean() + (s_txt * t.text).sum(-1).mean()) / 2)
    # cross-model retrieval: the teacher text of the student image's own pair, judged by class
    t_txt_classes = (t.text @ task.class_vectors.T).argmax(-1)
    hits = t_txt_classes[(s_img @ t.text.T).argmax(-1)] == t_txt_classes
    t_class, s_class = (
        t.logit_scale * t.image @ task.class_vectors.T,
        t.logit_scale * s_img @ task.class_vectors.T,
    )
    return {
        "logit_kd": -affinity_kl,
        "feature": feature_cos,
        "icl": float(hits.float().mean()),
        "class_kd": -_kl(t_class, s_class),
        "class_top1_agreement": float((t_class.argmax(-1) == s_class.argmax(-1)).float().mean()),
    }


@pytest.fixture(scope="module")
def clip_only(task: Task) -> dict[str, float]:
    return agreement(task, _train(task, "clip"))


def test_the_teacher_is_better_than_a_random_student(task: Task) -> None:
    """The premise: the fixed teacher solves the tiny task; a random student does not."""
    images, texts, labels = task.pairs(256, seed=5)
    t = task.teacher_outputs(images, texts)
    assert float(((t.image @ task.class_vectors.T).argmax(-1) == labels).float().mean()) > 0.95
    random_student = agreement(task, LinearTowers(seed=7).eval())
    assert random_student["class_top1_agreement"] < 0.4


@pytest.mark.parametrize(
    ("loss", "margin"),
    [("logit_kd", 0.05), ("feature", 0.3), ("icl", 0.2), ("class_kd", 0.05)],
)
def test_each_kd_loss_alone_moves_the_student_toward_the_teacher_faster_than_clip(
    task: Task, clip_only: dict[str, float], loss: str, margin: float
) -> None:
    start = agreement(task, LinearTowers(seed=7).eval())
    trained = agreement(task, _train(task, loss))
    report = json.dumps({"start": start[loss], "clip": clip_only[loss], loss: trained[loss]})
    assert trained[loss] > start[loss] + margin, report
    assert trained[loss] > clip_only[loss] + margin, report
    if loss == "class_kd":
        assert trained["class_top1_agreement"] > max(0.9, clip_only["class_top1_agreement"] + 0.2)


def test_class_vector_kd_on_unlabeled_images_teaches_the_classes_no_caption_shows(task: Task) -> None:
    """PromptKD's setting: captions cover 6 of the 8 classes; images of all 8 come without captions.
    Class-vector KD on those images makes the student agree with the teacher on the 2 uncaptioned
    classes; on the captioned pairs alone it cannot (it learns to give them no mass)."""

    @torch.no_grad()
    def agreement_on_uncaptioned(model: LinearTowers) -> float:
        images, _, _ = task.pairs(256, seed=77, classes=2, first=CLASSES - 2)
        teacher = task.teacher.encode_image(images, normalize=True) @ task.class_vectors.T
        student = model.encode_image(images, normalize=True) @ task.class_vectors.T
        return float((teacher.argmax(-1) == student.argmax(-1)).float().mean())

    captioned = CLASSES - 2
    on_pairs = agreement_on_uncaptioned(_train(task, "clip,class_kd", captioned))
    on_unlabeled = agreement_on_uncaptioned(_train(task, "clip,class_kd", captioned, unlabeled=True))
    assert on_unlabeled > 0.9 and on_unlabeled > on_pairs + 0.3, (on_pairs, on_unlabeled)


def test_class_vector_kd_uses_the_teacher_scale_on_both_sides(task: Task) -> None:
    """PromptKD: a student whose embeddings equal the teacher's has zero class-vector KD loss, whatever
    its own (untrained) logit scale; with the student's scale the loss would stay positive."""
    images, texts, labels = task.pairs(BATCH, seed=3)
    model = LinearTowers(seed=7)
    model.load_state_dict({**task.teacher.state_dict(), "logit_scale": torch.tensor(math.log(1 / 0.07))})
    student = _wrap(model)
    distiller = Distiller(
        student,
        LossSettings(weights=LossWeights.parse("class_kd")),
        teacher_dims=[EMBED_DIM],
        class_vectors=[task.class_vectors],
    )
    batch = Batch({student.image_key: images}, {student.text_key: texts}, labels, torch.arange(BATCH))
    _, parts = distiller(batch, [task.teacher_outputs(images, texts)])
    assert float(parts["class_kd"]) == pytest.approx(0.0, abs=1e-5)
