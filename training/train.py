"""The training loop: AdamW with warmup and cosine decay, clipping, accumulation, AMP on GPU,
checkpoints with exact resume, DDP under torchrun, progress bar, metrics JSONL and PNG curves."""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.distributed as dist
from pydantic import Field
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel

from clipserve.contract.bundle import sha256_file
from clipserve.training.data import (
    BatchPlan,
    Collator,
    PairDataset,
    StepSampler,
    TargetLookup,
    sample_augment,
)
from clipserve.training.models import RUN_CONFIG_FILE, RUN_WEIGHTS_FILE, ClipModel, Teacher, TowerOutputs
from clipserve.training.objective import Distiller, LossSettings
from clipserve.training.progress import progress_bar
from clipserve.training.settings import LoopOptions

Evaluator = Callable[[ClipModel], dict[str, float]]


class CheckpointError(RuntimeError):
    pass


class TrainConfig(LoopOptions):
    """The loop's options: the hyper-parameters of `clip-distill` (defined once, in settings.py), and
    the floor of the cosine decay, which no command sets."""

    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="the learning rate's floor, as a share of --lr")


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Distributed:
    """Under torchrun (WORLD_SIZE > 1), join the process group: gloo on CPU, nccl on CUDA. WORLD_SIZE
    and LOCAL_RANK are the launcher's contract (torchrun sets them), not settings of ours."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Distributed()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


@dataclass
class TrainResult:
    out_dir: Path
    run_id: str
    final_dir: Path
    losses: list[float] = field(default_factory=list)
    final_metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def checkpoint_sha256(self) -> str:
        return sha256_file(self.final_dir / RUN_WEIGHTS_FILE)


def _schedule(config: TrainConfig) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        span = max(1, config.steps - config.warmup_steps)
        progress = min(1.0, (step - config.warmup_steps) / span)
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No decay on gains, biases, embeddings and the temperature, as in CLIP training."""
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        skip = (
            param.ndim < 2 or "embedding" in name or "logit_scale" in name or name.endswith("class_embedding")
        )
        (no_decay if skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _rng_state() -> dict[str, Any]:
    """Every generator's state as tensors and plain values, so a checkpoint loads with
    `torch.load(weights_only=True)` (numpy's own state holds an ndarray, which would need pickle)."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    numpy_state = {
        "kind": str(kind),
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "position": int(position),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    saved = state["numpy"]
    np.random.set_state(
        (
            saved["kind"],
            saved["keys"].numpy().astype(np.uint32),
            saved["position"],
            saved["has_gauss"],
            saved["cached_gaussian"],
        )
    )
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def fingerprint(
    student: ClipModel,
    settings: LossSettings,
    teacher_dims: list[int],
    config: TrainConfig,
    n: int,
    unlabeled: list[int] | None = None,
) -> dict:
    """What must not change between a checkpoint and the run that resumes it (`unlabeled`: the
    unlabeled images' count and batch size, when there are any)."""
    return {
        "model_cfg": student.model_cfg,
        "losses": sorted(settings.weights.weights),
        "teacher_dims": teacher_dims,
        "batch_size": config.batch_size,
        "accumulation": config.accumulation,
        "steps": config.steps,
        "dataset_size": n,
        "seed": config.seed,
        "unlabeled": unlabeled,
    }


def _describe_mismatch(saved: dict, current: dict) -> str:
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}"
        for k in current
        if saved.get(k) != current[k]
    ]
    return "; ".join(diffs)


class Checkpoints:
    def __init__(self, out_dir: Path):
        self.dir = out_dir / "checkpoints"

    def path(self, step: int) -> Path:
        return self.dir / f"step-{step:07d}.pt"

    def latest(self) -> Path | None:
        found = sorted(self.dir.glob("step-*.pt")) if self.dir.is_dir() else []
        return found[-1] if found else None

    def save(self, step: int, state: dict[str, Any]) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        target = self.path(step)
        tmp = target.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, target)
        return target


def load_checkpoint(path: Path, current_fingerprint: dict) -> dict[str, Any]:
    """A checkpoint of this run, read as tensors and plain values only (`weights_only=True`: a
    checkpoint file can run no code when it is loaded)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"cannot read checkpoint {path}: it holds more than tensors and plain values "
            "(made by an older clip-distill, or not a checkpoint); start the run without --resume"
        ) from exc
    except (OSError, RuntimeError, EOFError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(state, dict) or "fingerprint" not in state:
        raise CheckpointError(f"{path} is not a clip-distill checkpoint")
    mismatch = _describe_mismatch(state["fingerprint"], current_fingerprint)
    if mismatch:
        raise CheckpointError(f"checkpoint {path} does not match this run: {mismatch}")
    return state


def save_model_dir(student: ClipModel, target: Path, extra: dict[str, Any] | None = None) -> Path:
    """An open_clip `local-dir:` folder: config + safetensors weights; loadable as a teacher or for export."""
    target.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in student.model.state_dict().items()}
    save_file(state, str(target / RUN_WEIGHTS_FILE))
    config = {
        "model_cfg": student.model_cfg,
        "preprocess_cfg": student.preprocess_cfg,
        "architecture": student.architecture,
        **(extra or {}),
    }
    (target / RUN_CONFIG_FILE).write_text(json.dumps(config, indent=2, default=list) + "\n")
    return target


class MetricsLog:
    def __init__(self, path: Path, resume_step: int):
        self.path = path
        kept = []
        if resume_step and path.is_file():
            kept = [
                line
                for line in path.read_text().splitlines()
                if json.loads(line).get("step", 0) <= resume_step
            ]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.path.read_text().splitlines()]


def plot_curves(records: list[dict[str, Any]], target: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval" in r]
    fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(11 if evals else 6, 4), squeeze=False)
    ax = axes[0][0]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="total")
    for name in sorted({k for r in train for k in r.get("parts", {})}):
        ax.plot(
            [r["step"] for r in train],
            [r["parts"].get(name, float("nan")) for r in train],
            label=name,
            alpha=0.7,
        )
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.set_title("training loss")
    if evals:
        ax = axes[0][1]
        for metric in sorted({k for r in evals for k in r["eval"]}):
            ax.plot([r["step"] for r in evals], [r["eval"][metric] for r in evals], marker="o", label=metric)
        ax.set_xlabel("step")
        ax.set_ylabel("accuracy")
        ax.legend()
        ax.set_title("evaluation")
    fig.tight_layout()
    fig.savefig(target, dpi=100)
    plt.close(fig)
    return target


def _run_id(out_dir: Path) -> str:
    run_file = out_dir / "run.json"
    if run_file.is_file():
        return json.loads(run_file.read_text())["run_id"]
    return f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"


def _teacher_outputs(
    batch_targets: dict[str, torch.Tensor] | None, teacher: Teacher | None, batch
) -> list[TowerOutputs] | None:
    if batch_targets is not None:
        count = sum(1 for k in batch_targets if k.startswith("image_"))
        return [
            TowerOutputs(
                batch_targets[f"image_{i}"], batch_targets[f"text_{i}"], batch_targets[f"scale_{i}"][0]
            )
            for i in range(count)
        ]
    if teacher is None:
        return None
    return teacher.encode(batch.images, batch.tokens)


def build_collator(
    student: ClipModel, teacher: Teacher | None, config: TrainConfig, targets: TargetLookup | None
) -> Collator:
    members = [student] + ([] if teacher is None or targets is not None else teacher.members)
    transforms, tokenizers = {}, {}
    for member in members:
        cfg = open_clip.transform.PreprocessCfg(**member.preprocess_cfg)
        transforms.setdefault(member.image_key, open_clip.transform.image_transform_v2(cfg, is_train=False))
        tokenizers.setdefault(member.text_key, member.tokenizer)
    augment = (lambda index, epoch: sample_augment(config.seed, epoch, index)) if config.augment else None
    return Collator(transforms, tokenizers, augment=augment, targets=targets)


def train(
    student: ClipModel,
    dataset: PairDataset,
    out_dir: Path,
    config: TrainConfig,
    settings: LossSettings,
    teacher: Teacher | None = None,
    class_vectors: list[torch.Tensor] | None = None,
    targets: TargetLookup | None = None,
    teacher_dims: list[int] | None = None,
    evaluator: Evaluator | None = None,
    resume: str | Path | None = None,
    log: Callable[[str], None] = print,
    unlabeled: PairDataset | None = None,
    unlabeled_targets: TargetLookup | None = None,
) -> TrainResult:
    """Train `student` on `dataset`; `resume` is a checkpoint path or 'auto' (latest in out_dir, if any).
    `unlabeled` images (their captions unused; teacher outputs from `unlabeled_targets` or the live
    `teacher`) feed the image-side distillation losses, `config.unlabeled_batch_size` per step."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    device = torch.device(config.device)
    env = init_distributed(config.device)
    if device.type == "cuda" and env.world > 1:
        device = torch.device("cuda", env.local_rank)
    teacher_dims = teacher_dims or (teacher.embed_dims if teacher is not None else [])
    unlabeled_batch = config.unlabeled_batch_size or max(1, config.batch_size // 2)
    sizes = {"batch size": config.batch_size}
    if unlabeled is not None:
        sizes["unlabeled batch size"] = unlabeled_batch
    for what, size in sizes.items():
        if size % (config.accumulation * env.world):
            raise ValueError(
                f"{what} {size} must divide into {config.accumulation} accumulation steps x {env.world} processes"
            )
    torch.manual_seed(config.seed)
    if config.lock_text:
        student.model.lock_text_tower()
    distiller = Distiller(student, settings, teacher_dims, class_vectors).to(device)
    if teacher is not None:
        teacher.to(device)
    trainable = distiller
    if env.world > 1:
        trainable = DistributedDataParallel(distiller, find_unused_parameters=settings.label_head)
    # fused: one kernel over all parameters, several times faster than the for-each default on CPU
    optimizer = torch.optim.AdamW(
        _param_groups(distiller, config.weight_decay), lr=config.lr, betas=(0.9, 0.98), eps=1e-6, fused=True
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config))
    unlabeled_shape = None if unlabeled is None else [len(unlabeled), unlabeled_batch]
    print_fp = fingerprint(student, settings, teacher_dims, config, len(dataset), unlabeled_shape)
    checkpoints = Checkpoints(out_dir)

    start_step = 0
    resume_path = checkpoints.latest() if resume == "auto" else (Path(resume) if resume else None)
    if resume_path is not None:
        state = load_checkpoint(resume_path, print_fp)
        try:
            distiller.load_state_dict(state["model"])
        except RuntimeError as exc:
            raise CheckpointError(f"checkpoint {resume_path} does not fit this model: {exc}") from exc
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        start_step = int(state["step"])
        log(f"resumed from {resume_path} at step {start_step}")

    run_id = _run_id(out_dir)
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        run_info = {
            "run_id": run_id,
            "student": student.architecture,
            "config": config.model_dump(mode="json"),
        }
        (out_dir / "run.json").write_text(json.dumps(run_info, indent=2, default=str) + "\n")
    metrics = MetricsLog(out_dir / "metrics.jsonl", start_step) if env.is_main else None

    plan = BatchPlan(len(dataset), config.batch_size, config.seed)
    end_step = min(config.steps, config.stop_at or config.steps)
    sampler = StepSampler(plan, start_step, end_step, config.accumulation, env.rank, env.world)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=build_collator(student, teacher, config, targets),
        num_workers=config.num_workers,
        persistent_workers=False,
    )
    amp = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda" and config.amp
        else contextlib.nullcontext()
    )
    result = TrainResult(out_dir, run_id, out_dir / "final")
    progress = progress_bar(
        total=config.steps,
        initial=start_step,
        disable=not (config.progress and env.is_main),
        desc="train",
        unit="step",
    )
    batches = iter(loader)
    unlabeled_batches = None
    if unlabeled is not None:
        unlabeled_plan = BatchPlan(len(unlabeled), unlabeled_batch, config.seed + 1)
        unlabeled_batches = iter(
            torch.utils.data.DataLoader(
                unlabeled,
                batch_sampler=StepSampler(
                    unlabeled_plan, start_step, end_step, config.accumulation, env.rank, env.world
                ),
                collate_fn=build_collator(student, teacher, config, unlabeled_targets),
                num_workers=config.num_workers,
                persistent_workers=False,
            )
        )
    distiller.train()
    for step in range(start_step, end_step):
        step_started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        step_parts: dict[str, float] = {}
        for micro in range(config.accumulation):
            batch = next(batches).to(device)
            extra = None if unlabeled_batches is None else next(unlabeled_batches).to(device)
            sync = contextlib.nullcontext()
            if env.world > 1 and micro < config.accumulation - 1:
                sync = trainable.no_sync()
            with sync:
                with amp:
                    outputs = _teacher_outputs(batch.targets, teacher, batch)
                    extra_outputs = None if extra is None else _teacher_outputs(extra.targets, teacher, extra)
                    loss, parts = trainable(batch, outputs, extra, extra_outputs)
                (loss / config.accumulation).backward()
            step_loss += loss.item() / config.accumulation
            for name, value in parts.items():
                step_parts[name] = step_parts.get(name, 0.0) + value.item() / config.accumulation
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(distiller.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            distiller.student.logit_scale.clamp_(0, math.log(100))
        result.losses.append(step_loss)
        done = step + 1
        progress.update(1)
        progress.set_postfix(loss=f"{step_loss:.4f}")
        if metrics is not None:
            seconds = time.perf_counter() - step_started
            metrics.write(
                {
                    "step": done,
                    "epoch": plan.epoch_of(step),
                    "loss": step_loss,
                    "parts": step_parts,
                    "lr": optimizer.param_groups[0]["lr"],
                    "logit_scale": float(distiller.student.logit_scale.detach().exp()),
                    "samples_per_s": config.batch_size / seconds,
                }
            )
        is_last = done == end_step
        if env.is_main and ((config.checkpoint_every and done % config.checkpoint_every == 0) or is_last):
            checkpoints.save(
                done,
                {
                    "step": done,
                    "model": distiller.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": _rng_state(),
                    "fingerprint": print_fp,
                    "run_id": run_id,
                },
            )
        if (
            evaluator is not None
            and env.is_main
            and ((config.eval_every and done % config.eval_every == 0) or done == config.steps)
        ):
            distiller.eval()
            scores = evaluator(student)
            distiller.train()
            metrics.write({"step": done, "eval": scores})
            result.final_metrics = scores
            log(f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    progress.close()
    distiller.eval()
    if env.is_main and end_step == config.steps:
        save_model_dir(student, result.final_dir, {"training_run": run_id})
        plot_curves(metrics.records(), out_dir / "curves.png")
    if env.world > 1:
        dist.barrier()
    result.seconds = time.perf_counter() - started
    return result
