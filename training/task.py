"""`clip-distill task`: a task student for one fixed label set, trained DHO-style.

DHO (dual-head optimization): one image tower, two linear heads on its L2-normalized embedding. The
CE head learns from the few labeled images (cross-entropy); the KD head learns the teacher's class
probabilities over the unlabeled (and labeled) images: the teacher's image embedding against its
class vectors (its text tower over the labels and templates), at its logit scale and a temperature
T, matched by KL x T^2 (PromptKD's class-vector KD). At inference the heads' probabilities are mixed,
w * p_ce + (1 - w) * p_kd, with w chosen on a held-out split of the labeled images; without labels w
is fixed (0: KD alone, PromptKD-style). The published task bundle's image graph ends in the mix and
both heads' probabilities (export/task_bundle.py).
"""

from __future__ import annotations

import csv
import json
import math
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import Field
from torch import nn

from clipserve.contract.bundle import (
    MANIFEST_FILE,
    TASK_OUTPUTS,
    BundleError,
    ImagePreprocess,
    ModelRepository,
    ModelSource,
    TaskSpec,
    load_bundle,
)
from clipserve.contract.cli_settings import CommaList, SettingsError, load_settings
from clipserve.training import synthetic
from clipserve.training.data import IMAGE_EXTENSIONS, DataError, build_dataset
from clipserve.training.models import ClipModel, ModelSpecError, inherit_weights, load_clip, load_teacher
from clipserve.training.progress import progress_bar
from clipserve.training.settings import TEACHER_HELP, TEACHER_PRETRAINED_HELP, DistillSettings

PROG = "clip-distill task"
# the mix weights tried on the held-out labeled images
MIX_GRID = tuple(float(w) for w in np.linspace(0.0, 1.0, 21))


class TaskError(ValueError):
    """A mistake in what `clip-distill task` was given; the message says what to do."""


class TaskSettings(DistillSettings):
    """`clip-distill task`: a small classifier for one label set (a task student), distilled from a
    teacher on unlabeled images (KD head) and trained on a few labeled ones (CE head), the two heads
    mixed with a weight chosen on held-out labeled images (DHO); no labels: KD alone (PromptKD)."""

    options_file: ClassVar[str | None] = "config"

    config: Path | None = Field(
        None, description="YAML or JSON file of these options; the environment and flags override it"
    )
    # the teacher and the label set
    teacher: CommaList[str] = Field(
        min_length=1,
        description="a bundle folder (or a model folder of a repository: its latest version), or "
        f"{TEACHER_HELP}",
    )
    teacher_pretrained: CommaList[str] = Field(
        default_factory=list, description=f"{TEACHER_PRETRAINED_HELP} (not for a bundle)"
    )
    labels: Path = Field(description="file with one label per line: the classes the task student tells apart")
    templates: Path | None = Field(
        None,
        description="file with one prompt template per line ('a photo of a {}.'); none: the shapes templates",
    )
    # data
    unlabeled_data: str = Field(
        description="images the teacher labels: a folder of images, or any dataset spec (captions unused)"
    )
    labeled_data: str | None = Field(
        None,
        description="a few labeled images: folders named by label, or a CSV with columns image,label (paths "
        "relative to the CSV); none: KD alone",
    )
    held_out_fraction: float = Field(
        0.2, ge=0, lt=1, description="share of the labeled images (per label) kept to choose the mix weight"
    )
    on_bad_image: Literal["skip", "fail"] = Field(
        "skip", description="an unreadable image is skipped, or stops"
    )
    # the student
    student: str = Field(description="the student's image tower: open_clip name or JSON config")
    student_pretrained: str | None = Field(None, description="tag or checkpoint for the student's start")
    student_init: Literal["auto", "inherit", "random"] = Field(
        "auto",
        description="inherit: weight inheritance from the teacher; auto: inherit when the teacher is a torch "
        "model of a family the student can inherit from, else random",
    )
    # DHO
    kd_temperature: float = Field(
        1.0, gt=0, description="temperature T of the teacher's and the KD head's softmax"
    )
    ce_weight: float = Field(1.0, ge=0, description="weight of the CE head's loss")
    kd_weight: float = Field(1.0, ge=0, description="weight of the KD head's loss")
    mix_weight: float | None = Field(
        None,
        ge=0,
        le=1,
        description="weight of the CE head in the mix; none: chosen on the held-out labeled images (0, KD "
        "alone, without labels; 0.5 with labels but none held out)",
    )
    # optimisation
    out: Path = Field(
        Path("runs/task"), description="run folder: metrics.jsonl, curves.png, task.json, final/"
    )
    steps: int = Field(200, ge=1, description="optimizer steps")
    batch_size: int = Field(64, ge=1, description="unlabeled images per step")
    labeled_batch_size: int | None = Field(
        None, ge=1, description="labeled images per step; none: half of --batch-size"
    )
    lr: float = Field(1e-3, gt=0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay")
    warmup_steps: int = Field(10, ge=0, description="linear warmup, then cosine decay")
    eval_every: int = Field(
        0, ge=0, description="steps between evaluations of both heads and the mix; 0: 10 in all"
    )
    seed: int = Field(0, description="initialisation, split and batch order")
    torch_threads: int | None = Field(None, ge=1, description="torch CPU threads; none: torch's choice")
    progress: bool = Field(True, description="progress bar")
    # publishing
    models_dir: Path | None = Field(
        None, description="model repository to publish the task bundle to (needs --name); none: not published"
    )
    name: str | None = Field(None, description="the task model's name in the repository")
    int8: bool = Field(True, description="also publish the int8 graph")


# ---- teachers -----------------------------------------------------------------------------------


class TaskTeacher(Protocol):
    """What DHO needs of a teacher: its class probabilities over the labels for any images."""

    ref: str
    source: ModelSource | None
    logit_scale: float
    embed_dim: int

    def logits(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """[images, labels]: logit_scale * cos(image, class vector)."""
        ...


def _bundle_dir(ref: str) -> Path | None:
    """A bundle folder, or a model folder of a repository (its latest version); None otherwise."""
    path = Path(ref)
    if (path / MANIFEST_FILE).is_file():
        return path
    if path.is_dir():
        repository = ModelRepository(path.parent)
        if repository.versions(path.name):
            return repository.bundle_dir(path.name)
    return None


def image_transform(preprocess: dict[str, Any]):
    return open_clip.transform.image_transform_v2(
        open_clip.transform.PreprocessCfg(**preprocess), is_train=False
    )


def to_pixels(transform, images: Sequence[Image.Image]) -> torch.Tensor:
    return torch.stack([transform(image) for image in images])


class TorchTeacher:
    """A teacher clip-distill loads (open_clip name, JSON config, run folder; several: an ensemble,
    whose logits are averaged)."""

    def __init__(
        self, refs: list[str], pretrained: list[str], labels: list[str], templates: list[str], seed: int = 0
    ):
        self.teacher = load_teacher(refs, list(pretrained) or None, seed=seed + 1000)
        self.ref = ",".join(refs)
        first = self.teacher.members[0]
        self.clip: ClipModel = first
        self.source = ModelSource(
            architecture=first.architecture,
            pretrained=first.pretrained,
            checkpoint_sha256=first.checkpoint_sha256,
            config=first.model_cfg,
        )
        self.vectors = self.teacher.class_vectors(labels, templates, torch.device("cpu"))
        self.scales = [float(m.model.logit_scale.exp()) for m in self.teacher.members]
        self.logit_scale = float(np.mean(self.scales))
        self.embed_dim = first.embed_dim

    @torch.no_grad()
    def logits(self, images: Sequence[Image.Image], batch_size: int = 128) -> torch.Tensor:
        per_member = []
        for member, vectors, scale in zip(self.teacher.members, self.vectors, self.scales, strict=True):
            transform = image_transform(member.preprocess_cfg)
            chunks = []
            for start in range(0, len(images), batch_size):
                pixels = to_pixels(transform, images[start : start + batch_size])
                chunks.append(member.model.encode_image(pixels, normalize=True).float())
            per_member.append(scale * torch.cat(chunks) @ vectors.T)
        return torch.stack(per_member).mean(0)


class BundleTeacher:
    """A published bundle as the teacher, run by ONNX Runtime: its image graph, and its text graph
    and tokenizer for the class vectors (the service's: clipserve/contract/scoring.py)."""

    def __init__(self, bundle_dir: Path, labels: list[str], templates: list[str]):
        from clipserve.contract.scoring import class_vectors, prompts
        from clipserve.contract.tokenizer import load_tokenizer
        from clipserve.export.verify import make_session

        bundle = load_bundle(bundle_dir)
        manifest = bundle.manifest
        if manifest.task is not None:
            raise TaskError(
                f"teacher {bundle.ref} is a task model: a teacher needs an image and a text tower"
            )
        self.ref = bundle.ref
        self.source = manifest.source
        self.logit_scale = manifest.logit_scale
        self.embed_dim = manifest.embed_dim
        self.image_session = make_session(bundle.file_path("image"))
        text_session = make_session(bundle.file_path("text"))
        tokenizer = load_tokenizer(manifest.tokenizer, bundle.path)
        ids = tokenizer.encode(prompts(labels, templates)).ids
        embeds = text_session.run(None, {text_session.get_inputs()[0].name: ids})[0]
        self.vectors = torch.from_numpy(class_vectors(embeds, len(templates)))
        pre = manifest.image
        self.transform = image_transform(
            {
                "size": pre.size,
                "mean": pre.mean,
                "std": pre.std,
                "interpolation": pre.interpolation,
                "resize_mode": pre.resize_mode,
                "fill_color": pre.fill_color,
            }
        )

    def logits(self, images: Sequence[Image.Image], batch_size: int = 128) -> torch.Tensor:
        chunks = []
        name = self.image_session.get_inputs()[0].name
        for start in range(0, len(images), batch_size):
            pixels = to_pixels(self.transform, images[start : start + batch_size]).numpy()
            chunks.append(torch.from_numpy(self.image_session.run(None, {name: pixels})[0]).float())
        return self.logit_scale * F.normalize(torch.cat(chunks), dim=-1) @ self.vectors.T


def load_task_teacher(
    refs: Sequence[str], pretrained: Sequence[str], labels: list[str], templates: list[str], seed: int = 0
) -> TorchTeacher | BundleTeacher:
    """A bundle (alone), or the torch models clip-distill takes (several: an ensemble)."""
    bundle_dir = _bundle_dir(refs[0]) if len(refs) == 1 else None
    if bundle_dir is not None:
        if pretrained:
            raise TaskError(
                f"--teacher {refs[0]} is a bundle: its weights are in it; leave out --teacher-pretrained"
            )
        return BundleTeacher(bundle_dir, labels, templates)
    bundles = [ref for ref in refs if _bundle_dir(ref) is not None]
    if bundles:
        raise TaskError(
            f"a bundle teacher ({', '.join(bundles)}) cannot be part of an ensemble; give it alone"
        )
    return TorchTeacher(list(refs), list(pretrained), labels, templates, seed)


def teacher_probabilities(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The KD head's targets: the teacher's class distribution at temperature T."""
    return (logits / temperature).softmax(dim=-1)


# ---- the student --------------------------------------------------------------------------------


class TaskStudent(nn.Module):
    """An image tower and two linear heads on its L2-normalized embedding; forward gives TASK_OUTPUTS:
    the mix w * p_ce + (1 - w) * p_kd, p_ce and p_kd, each [batch, labels]."""

    def __init__(self, visual: nn.Module, embed_dim: int, num_labels: int, mix_weight: float = 0.0):
        super().__init__()
        self.visual = visual
        self.ce_head = nn.Linear(embed_dim, num_labels)
        self.kd_head = nn.Linear(embed_dim, num_labels)
        # zero heads: every label starts equal, and labels the targets never tell apart stay equal
        for head in (self.ce_head, self.kd_head):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        self.register_buffer("mix_weight", torch.tensor(float(mix_weight)))

    def init_heads(self, class_vectors: torch.Tensor, logit_scale: float) -> None:
        """Both heads start as the teacher's zero-shot classifier (for a student in its space)."""
        with torch.no_grad():
            for head in (self.ce_head, self.kd_head):
                head.weight.copy_(logit_scale * class_vectors)
                head.bias.zero_()

    def set_mix_weight(self, weight: float) -> None:
        self.mix_weight.fill_(float(weight))

    def head_logits(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = F.normalize(self.visual(pixel_values), dim=-1)
        return self.ce_head(embedding), self.kd_head(embedding)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ce_logits, kd_logits = self.head_logits(pixel_values)
        ce, kd = ce_logits.softmax(dim=-1), kd_logits.softmax(dim=-1)
        return self.mix_weight * ce + (1 - self.mix_weight) * kd, ce, kd


def mix(ce: torch.Tensor, kd: torch.Tensor, weight: float) -> torch.Tensor:
    return weight * ce + (1 - weight) * kd


# ---- DHO ----------------------------------------------------------------------------------------


@dataclass
class TaskData:
    """Preprocessed pixels and targets. `unlabeled_targets` / `labeled_targets`: the teacher's class
    probabilities at the KD temperature; `labels` index the label list."""

    unlabeled: torch.Tensor
    unlabeled_targets: torch.Tensor
    labeled: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    labeled_targets: torch.Tensor | None = None
    held_out: torch.Tensor | None = None
    held_out_labels: torch.Tensor | None = None
    # the teacher's top-1 on the held-out images, for the curves
    teacher_held_out_accuracy: float | None = None


@dataclass
class DhoConfig:
    steps: int = 200
    batch_size: int = 64
    labeled_batch_size: int | None = None
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 10
    kd_temperature: float = 1.0
    ce_weight: float = 1.0
    kd_weight: float = 1.0
    mix_weight: float | None = None
    eval_every: int = 0
    seed: int = 0
    progress: bool = True


@dataclass
class DhoResult:
    mix_weight: float
    mix_weight_from: Literal["held-out", "fixed"]
    held_out_accuracy: dict[str, float]
    records: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


@torch.no_grad()
def head_probabilities(
    student: TaskStudent, pixels: torch.Tensor, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """(p_ce, p_kd) of the student in eval mode, [images, labels] each."""
    was_training = student.training
    student.eval()
    try:
        ce, kd = [], []
        for start in range(0, len(pixels), batch_size):
            c, k = student.head_logits(pixels[start : start + batch_size])
            ce.append(c.softmax(-1))
            kd.append(k.softmax(-1))
        return torch.cat(ce), torch.cat(kd)
    finally:
        student.train(was_training)


def accuracy(probabilities: torch.Tensor, labels: torch.Tensor) -> float:
    return float((probabilities.argmax(dim=-1) == labels).float().mean())


def choose_mix_weight(ce: torch.Tensor, kd: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """The weight of the grid with the best held-out top-1; ties: the lower negative log-likelihood."""
    best: tuple[float, float, float] | None = None
    for weight in MIX_GRID:
        mixed = mix(ce, kd, weight)
        top1 = accuracy(mixed, labels)
        nll = float(-mixed.clamp_min(1e-12).log()[torch.arange(len(labels)), labels].mean())
        if best is None or (top1, -nll) > (best[1], -best[2]):
            best = (weight, top1, nll)
    assert best is not None
    return best[0], best[1]


def kd_loss(kd_logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || KD head) at temperature T, x T^2, mean over images."""
    log_probs = F.log_softmax(kd_logits / temperature, dim=-1)
    return F.kl_div(log_probs, targets, reduction="batchmean") * temperature**2


def _evaluate(
    student: TaskStudent, data: TaskData, probe: torch.Tensor, probe_teacher: torch.Tensor
) -> dict[str, float]:
    figures: dict[str, float] = {}
    ce, kd = head_probabilities(student, probe)
    teacher_top1 = probe_teacher.argmax(-1)
    figures["teacher agreement kd"] = accuracy(kd, teacher_top1)
    figures["teacher agreement ce"] = accuracy(ce, teacher_top1)
    if data.held_out is not None and data.held_out_labels is not None and len(data.held_out):
        ce, kd = head_probabilities(student, data.held_out)
        weight, top1 = choose_mix_weight(ce, kd, data.held_out_labels)
        figures["held-out ce"] = accuracy(ce, data.held_out_labels)
        figures["held-out kd"] = accuracy(kd, data.held_out_labels)
        figures["held-out mix"] = top1
        figures["mix weight"] = weight  # moved out of the accuracies by the caller
        if data.teacher_held_out_accuracy is not None:
            figures["held-out teacher"] = data.teacher_held_out_accuracy
    return figures


def _schedule(config: DhoConfig):
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def train_dho(
    student: TaskStudent, data: TaskData, config: DhoConfig, log_path: Path | None = None
) -> DhoResult:
    """Train both heads (and the image tower under them) for `config.steps`, evaluate them every
    `eval_every` steps, and set the student's mix weight: chosen on the held-out images when there
    are any and `config.mix_weight` is None, else `config.mix_weight` (0, KD alone, without labels)."""
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    has_labels = data.labeled is not None and data.labels is not None and len(data.labeled) > 0
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config))
    eval_every = config.eval_every or max(1, config.steps // 10)
    probe = data.unlabeled[:256]
    probe_teacher = data.unlabeled_targets[:256]
    unlabeled_batch = min(config.batch_size, len(data.unlabeled))
    labeled_batch = min(
        config.labeled_batch_size or max(1, config.batch_size // 2),
        len(data.labeled) if data.labeled is not None else 0,
    )
    records: list[dict[str, Any]] = []
    log = open(log_path, "w") if log_path else None  # noqa: SIM115 - closed in finally

    def record(entry: dict[str, Any]) -> None:
        records.append(entry)
        if log is not None:
            log.write(json.dumps(entry) + "\n")
            log.flush()

    order_u = torch.randperm(len(data.unlabeled), generator=generator)
    order_l = torch.randperm(len(data.labeled), generator=generator) if has_labels else None
    pos_u = pos_l = 0
    bar = progress_bar(total=config.steps, desc="dho", unit="step", disable=not config.progress)
    student.train()
    try:
        for step in range(1, config.steps + 1):
            if pos_u + unlabeled_batch > len(order_u):
                order_u, pos_u = torch.randperm(len(data.unlabeled), generator=generator), 0
            index = order_u[pos_u : pos_u + unlabeled_batch]
            pos_u += unlabeled_batch
            pixels, targets = data.unlabeled[index], data.unlabeled_targets[index]
            ce_part = torch.zeros(())
            if has_labels:
                assert order_l is not None and data.labeled is not None and data.labels is not None
                if pos_l + labeled_batch > len(order_l):
                    order_l, pos_l = torch.randperm(len(data.labeled), generator=generator), 0
                lindex = order_l[pos_l : pos_l + labeled_batch]
                pos_l += labeled_batch
                pixels = torch.cat([pixels, data.labeled[lindex]])
                if data.labeled_targets is not None:
                    targets = torch.cat([targets, data.labeled_targets[lindex]])
            ce_logits, kd_logits = student.head_logits(pixels)
            kd_part = kd_loss(kd_logits[: len(targets)], targets, config.kd_temperature)
            if has_labels:
                assert data.labels is not None
                ce_part = F.cross_entropy(ce_logits[unlabeled_batch:], data.labels[lindex])
            loss = config.kd_weight * kd_part + config.ce_weight * ce_part
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            entry: dict[str, Any] = {"step": step, "loss": loss.item(), "parts": {"kd": kd_part.item()}}
            if has_labels:
                entry["parts"]["ce"] = ce_part.item()
            record(entry)
            bar.update(1)
            bar.set_postfix({name: f"{value:.3f}" for name, value in entry["parts"].items()}, refresh=False)
            if step % eval_every == 0 or step == config.steps:
                figures = _evaluate(student, data, probe, probe_teacher)
                weight_then = figures.pop("mix weight", None)
                record(
                    {
                        "step": step,
                        "eval": figures,
                        **({"mix_weight": weight_then} if weight_then is not None else {}),
                    }
                )
    finally:
        bar.close()
        if log is not None:
            log.close()
    held_out: dict[str, float] = {}
    has_held_out = data.held_out is not None and data.held_out_labels is not None and len(data.held_out) > 0
    if config.mix_weight is not None or not has_held_out:
        weight = config.mix_weight if config.mix_weight is not None else (0.5 if has_labels else 0.0)
        weight_from: Literal["held-out", "fixed"] = "fixed"
    else:
        assert data.held_out is not None and data.held_out_labels is not None
        ce, kd = head_probabilities(student, data.held_out)
        weight, _ = choose_mix_weight(ce, kd, data.held_out_labels)
        weight_from = "held-out"
    if has_held_out:
        assert data.held_out is not None and data.held_out_labels is not None
        ce, kd = head_probabilities(student, data.held_out)
        held_out = {
            "ce": accuracy(ce, data.held_out_labels),
            "kd": accuracy(kd, data.held_out_labels),
            "mix": accuracy(mix(ce, kd, weight), data.held_out_labels),
        }
        if data.teacher_held_out_accuracy is not None:
            held_out["teacher"] = data.teacher_held_out_accuracy
    student.set_mix_weight(weight)
    student.eval()
    return DhoResult(weight, weight_from, held_out, records, time.perf_counter() - started)


# ---- the run's files ----------------------------------------------------------------------------

STUDENT_CONFIG_FILE = "student_config.json"
STUDENT_WEIGHTS_FILE = "task_student.pt"


def save_task_student(
    student: TaskStudent, model_cfg: dict[str, Any], labels: list[str], folder: Path
) -> Path:
    """The student's open_clip config (the image tower's origin) and its weights, heads and mix
    weight, loadable by `load_task_student`; returns the weights file."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / STUDENT_CONFIG_FILE).write_text(json.dumps(model_cfg, indent=2) + "\n")
    weights = folder / STUDENT_WEIGHTS_FILE
    torch.save({"state_dict": student.state_dict(), "labels": labels}, weights)
    return weights


def load_task_student(folder: Path | str) -> tuple[TaskStudent, list[str]]:
    """A task student saved by a run (its `final/` folder), in eval mode, with its labels."""
    folder = Path(folder)
    clip = load_clip(str(folder / STUDENT_CONFIG_FILE))
    saved = torch.load(folder / STUDENT_WEIGHTS_FILE, map_location="cpu", weights_only=True)
    student = TaskStudent(clip.model.visual, clip.embed_dim, len(saved["labels"]))
    student.load_state_dict(saved["state_dict"])
    return student.eval(), list(saved["labels"])


# ---- inputs -------------------------------------------------------------------------------------


def read_lines(path: Path, what: str) -> list[str]:
    try:
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError as exc:
        raise TaskError(f"{what} file {path} does not exist") from exc
    if not lines:
        raise TaskError(f"{what} file {path} is empty: give one per line")
    repeated = sorted({line for line in lines if lines.count(line) > 1})
    if repeated:
        raise TaskError(f"{what} file {path} repeats {', '.join(repeated[:5])}: give each once")
    return lines


def _open_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def read_labeled(spec: str, labels: list[str]) -> tuple[list[Image.Image], list[int]]:
    """Labeled images: folders named by label (underscores read as spaces), or a CSV with columns
    image,label; every label must be one of `labels`."""
    path = Path(spec)
    pairs: list[tuple[Path, str]] = []
    if path.suffix.lower() == ".csv":
        if not path.is_file():
            raise TaskError(f"--labeled-data {spec} does not exist")
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            missing = {"image", "label"} - set(reader.fieldnames or [])
            if missing:
                raise TaskError(
                    f"--labeled-data {spec} needs the columns image,label (missing {', '.join(sorted(missing))})"
                )
            pairs = [(path.parent / row["image"], row["label"].strip()) for row in reader]
    elif path.is_dir():
        folders = sorted(p for p in path.iterdir() if p.is_dir())
        if not folders:
            raise TaskError(
                f"--labeled-data {spec} has no label folders: give one folder per label, or a CSV"
            )
        pairs = [
            (image, folder.name.replace("_", " "))
            for folder in folders
            for image in sorted(folder.iterdir())
            if image.suffix.lower() in IMAGE_EXTENSIONS
        ]
    else:
        raise TaskError(
            f"--labeled-data {spec}: give a folder with one subfolder per label, or a CSV (image,label)"
        )
    unknown = sorted({label for _, label in pairs} - set(labels))
    if unknown:
        raise TaskError(
            f"--labeled-data {spec} has labels not in --labels: {', '.join(unknown[:5])}; the label set has "
            f"{len(labels)} labels ({', '.join(labels[:5])}{', ...' if len(labels) > 5 else ''})"
        )
    images, indices = [], []
    for image_path, label in pairs:
        try:
            images.append(_open_rgb(image_path))
        except (OSError, SyntaxError, ValueError) as exc:
            raise TaskError(f"labeled image {image_path} cannot be read ({type(exc).__name__})") from exc
        indices.append(labels.index(label))
    if not images:
        raise TaskError(f"--labeled-data {spec} holds no images")
    return images, indices


def held_out_split(labels: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) positions: per label, round(fraction * n) held out, at least one kept to train."""
    rng = np.random.default_rng(seed)
    train, held = [], []
    for label in sorted(set(labels)):
        where = [i for i, value in enumerate(labels) if value == label]
        rng.shuffle(where)
        count = min(len(where) - 1, round(fraction * len(where))) if fraction > 0 else 0
        held += where[:count]
        train += where[count:]
    return sorted(train), sorted(held)


# ---- the command --------------------------------------------------------------------------------


def _build_student(options: TaskSettings, teacher: TorchTeacher | BundleTeacher) -> tuple[ClipModel, bool]:
    """The student model, and whether it inherited the teacher's weights."""
    student = load_clip(options.student, options.student_pretrained, seed=options.seed)
    if options.student_init == "random":
        return student, False
    if not isinstance(teacher, TorchTeacher):
        if options.student_init == "inherit":
            raise TaskError(
                "--student-init inherit needs a torch teacher (run folder, open_clip name or config), not a bundle"
            )
        print("student starts at random: a bundle teacher has no torch weights to inherit")
        return student, False
    try:
        report = inherit_weights(student, teacher.clip)
    except ModelSpecError as exc:
        if options.student_init == "inherit":
            raise TaskError(str(exc)) from exc
        print(f"student starts at random: {exc}")
        return student, False
    print(
        f"weight inheritance from {teacher.clip.architecture}: {len(report.copied)} copied, "
        f"{len(report.sliced)} sliced, {len(report.interpolated)} interpolated, {len(report.skipped)} skipped"
    )
    return student, True


def _load_images(spec: str, on_bad_image: str) -> list[Image.Image]:
    dataset = build_dataset(spec, on_bad_image=on_bad_image)  # type: ignore[arg-type]
    return [dataset[i].image.convert("RGB") for i in range(len(dataset))]


def plot_task_curves(records: list[dict[str, Any]], target: Path) -> Path:
    """Losses of both heads, and their accuracy and the mix's over the steps (matplotlib PNG)."""
    from clipserve.training.train import plot_curves

    return plot_curves(records, target)


@dataclass
class TaskRun:
    out_dir: Path
    run_id: str
    student: TaskStudent
    result: DhoResult
    task: TaskSpec
    preprocess: ImagePreprocess
    bundle: Any = None


def run_task(options: TaskSettings | dict[str, Any]) -> TaskRun:
    """Everything `clip-distill task` does, callable from Python with its settings or a mapping."""
    from clipserve.contract.cli_settings import validated
    from clipserve.export.exporter import preprocess_from_model

    if not isinstance(options, TaskSettings):
        options = validated(TaskSettings, options)
    if options.models_dir and not options.name:
        raise TaskError("--models-dir needs --name (the task model's name in the repository)")
    if options.models_dir:
        ModelRepository(options.models_dir).check_writable()
    if options.torch_threads:
        torch.set_num_threads(options.torch_threads)
    labels = read_lines(options.labels, "--labels")
    templates = (
        read_lines(options.templates, "--templates") if options.templates else list(synthetic.CLASS_TEMPLATES)
    )
    # the cheap checks first: data and labels are read before the teacher loads
    unlabeled_images = _load_images(options.unlabeled_data, options.on_bad_image)
    labeled_images, labeled_indices = (
        read_labeled(options.labeled_data, labels) if options.labeled_data else ([], [])
    )
    teacher = load_task_teacher(options.teacher, options.teacher_pretrained, labels, templates, options.seed)
    student_clip, inherited = _build_student(options, teacher)
    student = TaskStudent(student_clip.model.visual, student_clip.embed_dim, len(labels))
    if inherited and student_clip.embed_dim == teacher.embed_dim and isinstance(teacher, TorchTeacher):
        student.init_heads(teacher.vectors[0], teacher.logit_scale)
    transform = image_transform(student_clip.preprocess_cfg)
    temperature = options.kd_temperature
    print(
        f"teacher {teacher.ref}: labelling {len(unlabeled_images)} unlabeled and {len(labeled_images)} labeled images"
    )
    data = TaskData(
        unlabeled=to_pixels(transform, unlabeled_images),
        unlabeled_targets=teacher_probabilities(teacher.logits(unlabeled_images), temperature),
    )
    if labeled_images:
        train_at, held_at = held_out_split(labeled_indices, options.held_out_fraction, options.seed)
        pixels = to_pixels(transform, labeled_images)
        label_tensor = torch.tensor(labeled_indices)
        teacher_logits = teacher.logits(labeled_images)
        data.labeled, data.labels = pixels[train_at], label_tensor[train_at]
        data.labeled_targets = teacher_probabilities(teacher_logits[train_at], temperature)
        if held_at:
            data.held_out, data.held_out_labels = pixels[held_at], label_tensor[held_at]
            data.teacher_held_out_accuracy = accuracy(teacher_logits[held_at], label_tensor[held_at])
        print(
            f"labeled images: {len(train_at)} to train the CE head, {len(held_at)} held out to choose the mix"
        )
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    run_id = f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
    config = DhoConfig(
        **{key: getattr(options, key) for key in DhoConfig.__dataclass_fields__ if hasattr(options, key)}
    )
    result = train_dho(student, data, config, out / "metrics.jsonl")
    plot_task_curves(result.records, out / "curves.png")
    task = TaskSpec(
        labels=labels,
        templates=templates,
        teacher=teacher.ref,
        teacher_source=teacher.source,
        kd_temperature=temperature,
        mix_weight=result.mix_weight,
        mix_weight_from=result.mix_weight_from,
        labeled_images=len(labeled_images),
        unlabeled_images=len(unlabeled_images),
        held_out_accuracy=result.held_out_accuracy,
        outputs=list(TASK_OUTPUTS),
    )
    final = out / "final"
    final.mkdir(exist_ok=True)
    weights = save_task_student(student, student_clip.model_cfg, labels, final)
    summary = {"run_id": run_id, "seconds": round(result.seconds, 1), "task": task.model_dump(mode="json")}
    (out / "task.json").write_text(json.dumps(summary, indent=2) + "\n")
    figures = ", ".join(f"{k} {v:.3f}" for k, v in result.held_out_accuracy.items())
    print(
        f"run {run_id}: {options.steps} steps in {result.seconds:.1f}s; mix weight {result.mix_weight:.2f} "
        f"({result.mix_weight_from}){'; held-out top-1: ' + figures if figures else ''}; curves in {out / 'curves.png'}"
    )
    preprocess = preprocess_from_model(student_clip.model)
    run = TaskRun(out, run_id, student, result, task, preprocess)
    if options.models_dir and options.name:
        from clipserve.contract.bundle import sha256_file
        from clipserve.export.task_bundle import export_task_bundle

        source = ModelSource(
            architecture=student_clip.architecture,
            config=student_clip.model_cfg,
            checkpoint_sha256=sha256_file(weights),
            training_run=run_id,
            open_clip_version=open_clip.__version__,
        )
        sample = (data.held_out if data.held_out is not None else data.unlabeled)[:8].numpy()
        run.bundle = export_task_bundle(
            student,
            options.models_dir,
            options.name,
            task=task,
            source=source,
            preprocess=preprocess,
            embed_dim=student_clip.embed_dim,
            logit_scale=teacher.logit_scale,
            int8=options.int8,
            images=sample,
            progress=options.progress,
        )
        print(f"published {run.bundle.ref} to {run.bundle.path}")
    return run


def main(argv: Sequence[str]) -> int:
    """`clip-distill task ARGS`: 0 on success; a mistake is one line on stderr and status 2."""
    from clipserve.export.errors import ExportError

    try:
        run_task(load_settings(TaskSettings, list(argv), PROG, TaskSettings.__doc__))
    except (SettingsError, TaskError, DataError, ModelSpecError, BundleError, ExportError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    return 0
