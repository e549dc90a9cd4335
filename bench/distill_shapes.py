"""Distillation on the synthetic shapes set: does a distilled student keep the teacher's accuracy?

1. The teacher (clipserve.training.recipes.TeacherRecipe: a ResNet image tower three times wider than the
   student's, at the same 64 px) is trained with the CLIP loss for five times the students'
   budget, once per machine, and cached under runs/teachers/ by a hash of its recipe. Its
   embeddings of the students' data are stored once beside it (MobileCLIP-style targets), so the
   teacher is not re-run for every student.
2. The transfer set: unlabeled images (no captions) drawn over every composition, the held-out ones
   too, with their own stored teacher targets. The image-side losses (feature, class-vector KD)
   learn from them, as PromptKD distils on unlabeled images of the target domain; the student never
   sees a caption of a held-out composition, and the benchmark's images are a split of their own.
3. Students, each with the same budget (steps, batch, data), at every seed: from scratch; with each
   distillation loss alone beside the CLIP loss (its weight and temperature from the sweep, see
   TUNED); weight inheritance, with the text tower trained or locked (LiT); and the two best losses
   on a weight-inherited, text-locked student, each and both.
4. Zero-shot top-1/top-5 on held-out (colour, shape) compositions; mean and spread over seeds;
   parameters, GFLOPs and ONNX Runtime latency per tower (batch 1, one thread); the best student
   exported with --int8 and classified through the service (HTTP API) in fp32 and int8; a plot of
   accuracy against image latency; the goals, each marked met or not.

    python bench/distill_shapes.py              # the experiment, seeds 0, 1 and 2 (builds the teacher once)
    python bench/distill_shapes.py --sweep      # the KD weight/temperature sweep (seed 0)
    python bench/distill_shapes.py --quick      # a smoke run proving the pipeline (3-4 minutes on 2 cores)

Writes results.json, results.md and accuracy_vs_latency.png into --out (runs/bench-distill-shapes);
--sweep writes sweep.json and sweep.md there, which the experiment's report then includes.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

# The same kernels on every x86 CPU with AVX2, so that a seed gives the same figures on another
# machine: ATen's vectorized ops, oneDNN's convolutions and MKL's GEMMs otherwise pick their code
# path by CPU (AVX2, AVX-512, AMX), and one student's top-1 moved by 7.7 points between two such paths
# on one machine. Set before torch loads; spawned student processes inherit them. A variable already
# set wins (ATEN_CPU_CAPABILITY=default, say, for CPUs without AVX2).
KERNEL_PINS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"}
os.environ.setdefault("ATEN_CPU_CAPABILITY", KERNEL_PINS["ATEN_CPU_CAPABILITY"])
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", KERNEL_PINS["ONEDNN_MAX_CPU_ISA"])
os.environ.setdefault("MKL_CBWR", KERNEL_PINS["MKL_CBWR"])

import torch  # noqa: E402

# run as `python bench/distill_shapes.py`, Python puts bench/ first on sys.path, where bench/export.py
# would hide the `export` package: look in the repository root instead
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clipserve.training import synthetic  # noqa: E402
from clipserve.training.cli import run_training, shapes_evaluator  # noqa: E402
from clipserve.training.data import build_dataset  # noqa: E402
from clipserve.training.evaluate import ModelReport, describe_model, markdown_report, onnx_latency  # noqa: E402
from clipserve.training.losses import LossWeights  # noqa: E402
from clipserve.training.models import load_clip, load_teacher  # noqa: E402
from clipserve.training.objective import IMAGE_SIDE_LOSSES  # noqa: E402
from clipserve.training.recipes import (  # noqa: E402
    SHAPES_STUDENT_64PX_CONFIG,
    TEACHER_CACHE_ROOT,
    ShapesBudget,
    TeacherRecipe,
    cached_teacher,
    student_options,
)
from clipserve.training.targets import store_targets  # noqa: E402

KD_METHODS = ("logit_kd", "feature", "icl", "class_kd")
KD_LABELS = {
    "logit_kd": "affinity mimicking (logit KD)",
    "feature": "feature distillation",
    "icl": "interactive contrastive (ICL)",
    "class_kd": "class-vector KD",
}
STUDENT_STEPS = 400
# unlabeled transfer images: every composition, a seed of their own (never the benchmark's split)
UNLABELED_SEED = 1000


@dataclass(frozen=True)
class KDSetting:
    """One distillation loss beside the CLIP loss (weight 1): its weight and loss options."""

    weight: float
    options: dict[str, Any] = field(default_factory=dict)

    def losses(self, kd: str) -> str:
        return f"clip=1,{kd}={self.weight:g}"

    def label(self) -> str:
        extra = "".join(f",{k.replace('_temperature', '_T')}={v:g}" for k, v in sorted(self.options.items()))
        return f"w={self.weight:g}{extra}"


# candidates for each loss (`--sweep`); the CLIP loss keeps weight 1 throughout
SWEEP: dict[str, list[KDSetting]] = {
    "logit_kd": [KDSetting(1.0), KDSetting(4.0)],
    "feature": [KDSetting(1.0), KDSetting(4.0)],
    "icl": [KDSetting(1.0), KDSetting(4.0)],
    "class_kd": [
        KDSetting(1.0, {"class_kd_temperature": 1.0}),
        KDSetting(4.0, {"class_kd_temperature": 4.0}),
    ],
}
# the sweep's choice per loss (seed 0, STUDENT_STEPS steps; sweep.md has every figure)
TUNED: dict[str, KDSetting] = {
    "logit_kd": KDSetting(1.0),
    "feature": KDSetting(1.0),
    "icl": KDSetting(4.0),
    "class_kd": KDSetting(1.0, {"class_kd_temperature": 1.0}),
}


@dataclass(frozen=True)
class Method:
    losses: str
    init: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def unlabeled(self) -> bool:
        """Whether the transfer set's unlabeled images feed this method (its image-side losses)."""
        return bool(set(IMAGE_SIDE_LOSSES) & set(LossWeights.parse(self.losses).weights))


LOCKED = {"lock_text": True}


def methods(tuned: dict[str, KDSetting] | None = None) -> dict[str, Method]:
    """name: method; each loss alone beside the CLIP loss, and weight inheritance with the CLIP loss,
    its text tower trained or locked."""
    tuned = tuned or TUNED
    table = {"scratch": Method("clip", "random")}
    table.update({kd: Method(tuned[kd].losses(kd), "random", tuned[kd].options) for kd in KD_METHODS})
    table["inherit"] = Method("clip", "inherit")
    table["inherit-locked"] = Method("clip", "inherit", LOCKED)
    return table


def combinations(scores: dict[str, float], tuned: dict[str, KDSetting] | None = None) -> dict[str, Method]:
    """The two KD losses that did best alone, on a weight-inherited student whose text tower (the
    teacher's) stays locked: each, and both."""
    tuned = tuned or TUNED
    first, second = sorted(KD_METHODS, key=lambda m: -scores[m])[:2]
    both = f"clip=1,{first}={tuned[first].weight:g},{second}={tuned[second].weight:g}"
    return {
        f"inherit+{first}": Method(tuned[first].losses(first), "inherit", {**tuned[first].options, **LOCKED}),
        f"inherit+{second}": Method(
            tuned[second].losses(second), "inherit", {**tuned[second].options, **LOCKED}
        ),
        f"inherit+{first}+{second}": Method(
            both, "inherit", {**tuned[first].options, **tuned[second].options, **LOCKED}
        ),
    }


@dataclass(frozen=True)
class Job:
    name: str
    seed: int
    method: Method
    out: Path
    budget: ShapesBudget
    teacher_dir: Path
    targets_dir: Path
    unlabeled: tuple[str, Path]  # the transfer set's spec and its stored teacher targets

    def record(self) -> dict[str, Any]:
        """What decides the student's weights; a finished run with the same record is reused (the sweep's
        runs at the tuned settings are the benchmark's, and an interrupted benchmark resumes)."""
        needs_teacher = LossWeights.parse(self.method.losses).needs_teacher or self.method.init == "inherit"
        return {
            "method": asdict(self.method),
            "seed": self.seed,
            "budget": asdict(self.budget),
            "teacher": self.teacher_dir.name if needs_teacher else None,
            "unlabeled": self.unlabeled[0] if self.method.unlabeled else None,
            "student": SHAPES_STUDENT_64PX_CONFIG.name,
            "kernels": kernels(),
        }


def kernels() -> dict[str, str]:
    """The kernel pins in force and the code path torch picked."""
    return {
        **{name: os.environ.get(name, "") for name in KERNEL_PINS},
        "torch": torch.backends.cpu.get_cpu_capability(),
    }


def train_student(job: Job) -> tuple[str, int, float, float]:
    """One student run, in its own process: (name, seed, wall seconds, process CPU seconds); 0 seconds
    when a finished run of the same job is already there."""
    record_path = job.out / "job.json"
    finished = (job.out / "final").is_dir() and record_path.is_file()
    if finished and json.loads(record_path.read_text()) == job.record():
        return job.name, job.seed, 0.0, 0.0
    shutil.rmtree(job.out, ignore_errors=True)
    torch.set_num_threads(job.budget.threads or 1)
    started, cpu = time.perf_counter(), _cpu_seconds()
    options = student_options(
        job.out,
        job.budget,
        teacher_dir=job.teacher_dir,
        teacher_targets=job.targets_dir,
        losses=job.method.losses,
        init=job.method.init,
        progress=False,
        config=SHAPES_STUDENT_64PX_CONFIG,
    )
    if job.method.unlabeled:
        options["unlabeled_data"], options["unlabeled_targets"] = job.unlabeled[0], str(job.unlabeled[1])
    run_training({**options, **job.method.options, "seed": job.seed, "evaluate": False})
    record_path.write_text(json.dumps(job.record(), indent=2) + "\n")
    return job.name, job.seed, time.perf_counter() - started, _cpu_seconds() - cpu


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick", action="store_true", help="few steps and images: proves the pipeline, not the figures"
    )
    p.add_argument("--sweep", action="store_true", help="run the KD weight/temperature sweep instead")
    p.add_argument(
        "--steps", type=int, help=f"training steps per student (default {STUDENT_STEPS}, quick 20)"
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        help="training seeds of the students (init, batch order); default 0 1 2",
    )
    p.add_argument("--seed", type=int, help="one seed (the same as --seeds N)")
    p.add_argument("--eval-size", type=int, help="held-out benchmark images (default 600, quick 60)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per student process")
    p.add_argument("--jobs", type=int, default=2, help="students trained in parallel (one process each)")
    p.add_argument("--out", type=Path, default=Path("runs/bench-distill-shapes"))
    p.add_argument(
        "--teacher-cache",
        type=Path,
        help=f"where teachers are cached (default {TEACHER_CACHE_ROOT}; quick: --out)",
    )
    p.add_argument(
        "--no-served-check", action="store_true", help="skip the fp32/int8 check through the service"
    )
    args = p.parse_args(argv)
    if args.seed is not None and args.seeds:
        p.error("give --seed or --seeds, not both")
    args.seeds = [args.seed] if args.seed is not None else (args.seeds or ([0] if args.quick else [0, 1, 2]))
    return args


# ---- plot ---------------------------------------------------------------------------------------


def spread_labels(values: list[float], gap: float) -> list[float]:
    """Label heights near `values` (same order), at least `gap` apart, so stacked points stay legible."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    placed = [0.0] * len(values)
    previous = None
    for i in order:
        placed[i] = values[i] if previous is None else max(values[i], previous + gap)
        previous = placed[i]
    return placed


def plot(rows: list[dict[str, Any]], target: Path, title: str) -> None:
    """rows: name, role, latency_ms (image), mean, min and max of top-1 over seeds (fractions)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    xs = [r["latency_ms"] for r in rows]
    ys = [100 * r["mean"] for r in rows]
    span = max(ys) - min(ys) or 1.0
    label_ys = spread_labels(ys, gap=span / 16)
    for r, x, y, label_y in zip(rows, xs, ys, label_ys, strict=True):
        colour = "black" if r["role"] == "teacher" else ("gray" if r["name"] == "scratch" else "tab:blue")
        yerr = [[100 * (r["mean"] - r["min"])], [100 * (r["max"] - r["mean"])]]
        ax.errorbar(x, y, yerr=yerr, color=colour, fmt="o", ms=6, capsize=3, zorder=3)
        ax.annotate(
            r["name"],
            (x, y),
            xytext=(x * 1.3, label_y),
            textcoords="data",
            va="center",
            fontsize=9,
            arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.6},
        )
    ax.set_xscale("log")
    ax.set_xlim(min(xs) / 1.5, max(xs) * 3)
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("ONNX Runtime image-tower latency, ms (batch 1, 1 thread, log scale)")
    ax.set_ylabel("held-out zero-shot top-1, % (bars: seed min-max)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(target, dpi=110)
    plt.close(fig)


# ---- the pieces ---------------------------------------------------------------------------------


def teacher_targets(teacher_dir: Path, data_spec: str, classes: list[str], log=print) -> Path:
    """The teacher's embeddings of the students' data (and its class vectors), stored beside the
    cached teacher once per data spec."""
    key = hashlib.sha256(data_spec.encode()).hexdigest()[:10]
    target = teacher_dir / f"targets-{key}"
    if (target / "targets.json").is_file():
        return target
    log(f"storing the teacher's targets for {data_spec} in {target}")
    scratch = target.with_name(target.name + f".building-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    teacher = load_teacher([str(teacher_dir)])
    vectors = teacher.class_vectors(classes, list(synthetic.CLASS_TEMPLATES), torch.device("cpu"))
    store_targets(
        teacher,
        build_dataset(data_spec),
        scratch,
        data_spec,
        views=1,
        augment=False,
        class_vectors=vectors,
        class_names=classes,
        progress=False,
    )
    os.replace(scratch, target)
    return target


def unlabeled_data(budget: ShapesBudget) -> str:
    """The transfer set: as many unlabeled images as the students' steps take (half a batch each),
    drawn over every composition from a seed of their own."""
    size = budget.steps * max(1, budget.batch_size // 2)
    return f"synthetic:shapes?size={size}&image_size={budget.image_size}&seed={UNLABELED_SEED}&held_out=none"


def train_all(jobs: list[Job], workers: int, timings: dict[str, dict[str, float]]) -> None:
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        for name, seed, wall, cpu in pool.map(train_student, jobs):
            timings[f"{name}@{seed}"] = {"wall": round(wall, 1), "process_cpu": round(cpu, 1)}
            done = f"in {wall:.0f} s wall, {cpu:.0f} s CPU" if wall else "(reused a finished run of this job)"
            print(f"  trained {name} (seed {seed}) {done}", flush=True)


def served_check(model_dir: Path, out: Path, data_spec: str, eval_size: int) -> dict[str, Any]:
    """Export a student with --int8 and classify the held-out images through the service's HTTP API
    with each precision; top-1 per precision."""
    from fastapi.testclient import TestClient

    from clipserve.service.app import create_app
    from clipserve.service.settings import Settings
    from clipserve.training.cli import publish
    from clipserve.training.data import shapes_config_from_spec
    from clipserve.training.train import TrainResult

    repo = out / "models"
    shutil.rmtree(repo, ignore_errors=True)
    student = load_clip(str(model_dir))
    run_id = json.loads((model_dir.parent / "run.json").read_text())["run_id"]
    result = TrainResult(model_dir.parent, run_id, model_dir)
    bundle = publish(student, result, repo, "shapes-student", int8=True)
    config, _ = shapes_config_from_spec(data_spec)
    bench = synthetic.ShapesBenchmark(config, held_out_only=True, size=eval_size)
    encoded, labels = [], []
    for i in range(len(bench)):
        image, label = bench[i]
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        encoded.append(base64.b64encode(buffer.getvalue()).decode())
        labels.append(bench.classes[label])
    figures: dict[str, Any] = {"bundle": bundle.ref, "images": len(encoded)}
    for precision in ("fp32", "int8"):
        settings = Settings(
            models_dir=repo,
            precision=precision,
            redis_url="none",
            intra_op_threads=1,
            preprocess_workers=1,
            reload_poll_s=0,
        )
        hits = 0
        with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
            for start in range(0, len(encoded), 64):
                body = {
                    "images": encoded[start : start + 64],
                    "labels": bench.classes,
                    "templates": list(synthetic.CLASS_TEMPLATES),
                    "top_k": 1,
                }
                response = client.post("/v1/classify", json=body)
                response.raise_for_status()
                for item in response.json()["results"]:
                    hits += item["labels"][0]["label"] == labels[start + item["index"]]
        figures[precision] = hits / len(encoded)
    figures["int8_minus_fp32_points"] = 100 * (figures["int8"] - figures["fp32"])
    return figures


def composition_breakdown(clip, data_spec: str, size: int) -> dict[str, float]:
    """Where zero-shot errors go on the held-out compositions: colour and shape right separately,
    how often the answer is a composition seen in training, top-1 when only the held-out
    compositions compete, and top-1 on seen compositions (the same drawing rules, 30 classes)."""
    import numpy as np

    from clipserve.training.data import shapes_config_from_spec
    from clipserve.training.evaluate import zero_shot_scores

    config, _ = shapes_config_from_spec(data_spec)
    classes = [f"{c} {s}" for c, s in synthetic.all_compositions()]
    held = [classes.index(f"{c} {s}") for c, s in config.held_out]
    out: dict[str, float] = {}
    for split, bench in (
        ("held_out", synthetic.ShapesBenchmark(config, held_out_only=True, size=size)),
        ("all", synthetic.ShapesBenchmark(config, held_out_only=False, size=size)),
    ):
        images, labels = zip(*(bench[i] for i in range(len(bench))), strict=True)
        labels = np.array(labels)
        similarity, _ = zero_shot_scores(clip, images, classes, synthetic.CLASS_TEMPLATES)
        predicted = similarity.argmax(1)
        if split == "held_out":
            colour = [classes[i].split()[0] for i in range(len(classes))]
            shape = [classes[i].split()[1] for i in range(len(classes))]
            out["held_out_top1"] = float((predicted == labels).mean())
            out["held_out_colour_right"] = float(
                np.mean([colour[p] == colour[t] for p, t in zip(predicted, labels, strict=True)])
            )
            out["held_out_shape_right"] = float(
                np.mean([shape[p] == shape[t] for p, t in zip(predicted, labels, strict=True)])
            )
            out["held_out_answered_seen_composition"] = float(np.mean([p not in held for p in predicted]))
            among_held = np.array(held)[similarity[:, held].argmax(1)]
            out["held_out_top1_among_held_out_only"] = float((among_held == labels).mean())
        else:
            seen = np.array([t not in held for t in labels])
            out["seen_top1"] = float((predicted[seen] == labels[seen]).mean())
    return out


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def goals(
    per_seed: dict[int, dict[str, float]], teacher_top1: float, speedup: float, served: dict | None
) -> dict[str, Any]:
    """Each goal of the experiment, met or not, from the mean over seeds."""
    names = list(next(iter(per_seed.values())))
    mean = {n: statistics.fmean(scores[n] for scores in per_seed.values()) for n in names}
    distilled = [n for n in names if n != "scratch"]
    best = max(distilled, key=lambda n: mean[n])
    inherit_kd = [n for n in names if n.startswith("inherit+")]
    best_inherit_kd = max(inherit_kd, key=lambda n: mean[n]) if inherit_kd else None
    out: dict[str, Any] = {
        "best_student": best,
        "best_vs_teacher": {
            "ratio": mean[best] / max(teacher_top1, 1e-9),
            "image_latency_speedup": speedup,
            "met": mean[best] >= 0.95 * teacher_top1 and speedup >= 4,
        },
        "teacher_beats_scratch_points": 100 * (teacher_top1 - mean["scratch"]),
        "each_loss_vs_scratch_points": {
            kd: {"gain": 100 * (mean[kd] - mean["scratch"]), "met": mean[kd] >= mean["scratch"] + 0.03}
            for kd in KD_METHODS
            if kd in mean
        },
    }
    if best_inherit_kd:
        alone = max((n for n in ("inherit", "inherit-locked") if n in mean), key=lambda n: mean[n])
        out["inherit_kd_vs_inherit_points"] = {
            "best": best_inherit_kd,
            "against": alone,
            "gain": 100 * (mean[best_inherit_kd] - mean[alone]),
            "met": mean[best_inherit_kd] > mean[alone],
        }
    if served:
        out["int8_vs_fp32_served"] = {
            "points": served["int8_minus_fp32_points"],
            "met": served["int8_minus_fp32_points"] >= -1.0,
        }
    return out


def sweep_markdown(sweep: dict[str, Any]) -> str:
    lines = [
        f"## KD sweep (seed {sweep['seed']}, {sweep['steps']} steps x {sweep['batch_size']}, CLIP loss weight 1)",
        "",
        f"Student from scratch at the same budget: {100 * sweep['scratch']:.1f}%.",
        "",
        "| loss | setting | held-out top-1 | chosen |",
        "|---|---|---|---|",
    ]
    for kd, rows in sweep["losses"].items():
        best = max(rows, key=lambda r: r["top1"])
        for row in rows:
            mark = "best" if row is best else ""
            lines.append(f"| {KD_LABELS[kd]} | {row['setting']} | {100 * row['top1']:.1f}% | {mark} |")
    return "\n".join(lines) + "\n"


def results_markdown(
    teacher: dict[str, Any],
    per_seed: dict[int, dict[str, float]],
    methods_used: dict[str, Method],
    reports: dict[str, ModelReport],
    goal: dict[str, Any],
    served: dict | None,
    sweep: dict | None,
    args: argparse.Namespace,
    steps: int,
    breakdown: dict[str, dict[str, float]],
) -> str:
    seeds = sorted(per_seed)
    header = ["model", "losses", "init", *[f"seed {s}" for s in seeds], "mean", "spread (sd)"]
    lines = [
        f"# Distillation on synthetic shapes: students {steps} steps x {args.batch_size}, seeds "
        + ", ".join(map(str, seeds)),
        "",
        f"Teacher: {teacher['recipe']['steps']} steps x {teacher['recipe']['batch_size']} "
        f"({teacher['recipe']['config']}), held-out top-1 {100 * teacher['top1']:.1f}%, built once in "
        f"{teacher['build_seconds']['wall']:.0f} s wall / {teacher['build_seconds']['process_cpu']:.0f} s CPU.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for name, method in methods_used.items():
        values = [per_seed[s][name] for s in seeds]
        stats = _stats(values)
        opts = "".join(f", {k}={v:g}" for k, v in method.options.items())
        opts += ", unlabeled images" if method.unlabeled else ""
        row = [name, method.losses + opts, method.init, *[f"{100 * v:.1f}%" for v in values]]
        row += [f"{100 * stats['mean']:.1f}%", f"{100 * stats['std']:.1f}"]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", markdown_report(list(reports.values()), title="Models (seed 0)").replace("# ", "## ", 1)]
    lines += ["## Goals", "", "```", json.dumps(goal, indent=2), "```", ""]
    metrics = list(next(iter(breakdown.values())))
    lines += [
        "## Where the errors go (held-out compositions)",
        "",
        "| model | " + " | ".join(m.replace("_", " ") for m in metrics) + " |",
        "|" + "---|" * (len(metrics) + 1),
    ]
    for name, row in breakdown.items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * row[m]:.1f}%" for m in metrics) + " |")
    lines.append("")
    if served:
        lines += [
            "## The best student through the service",
            "",
            f"{served['bundle']}, {served['images']} held-out images via POST /v1/classify: fp32 "
            f"{100 * served['fp32']:.1f}%, int8 {100 * served['int8']:.1f}% "
            f"({served['int8_minus_fp32_points']:+.1f} points).",
            "",
        ]
    if sweep:
        lines.append(sweep_markdown(sweep))
    return "\n".join(lines)


# ---- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    steps = args.steps or (20 if args.quick else STUDENT_STEPS)
    eval_size = args.eval_size or (60 if args.quick else 600)
    repeats = 20 if args.quick else 300
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    budget = ShapesBudget(steps=steps, batch_size=args.batch_size, lr=args.lr, threads=args.threads)
    recipe = (
        TeacherRecipe(steps=40, warmup_steps=5, eval_every=0, eval_size=eval_size, threads=1)
        if args.quick
        else TeacherRecipe()
    )
    cache = args.teacher_cache or (out / "teachers" if args.quick else TEACHER_CACHE_ROOT)
    print(
        f"machine: {platform.processor() or platform.machine()}, {platform.platform()}, {os.cpu_count()} CPUs; "
        f"{args.jobs} students at a time on {args.threads} torch thread(s) each; kernels {kernels()}"
    )
    print(f"student budget: {steps} steps x {args.batch_size} on {budget.data}; seeds {args.seeds}")
    timings: dict[str, Any] = {}

    t = time.perf_counter()
    was_cached = (recipe.directory(cache) / "build.json").is_file()
    teacher_dir, teacher_record = cached_teacher(recipe, root=cache, progress=not args.quick)
    timings["teacher (cached)" if was_cached else "teacher build"] = round(time.perf_counter() - t, 1)
    print(
        f"teacher {teacher_dir}: held-out top-1 {teacher_record['held_out']['top1']:.3f}, built once in "
        f"{teacher_record['build_seconds']['wall']:.0f} s wall, {teacher_record['build_seconds']['process_cpu']:.0f} s CPU"
    )
    classes = [f"{c} {s}" for c, s in synthetic.all_compositions()]
    t = time.perf_counter()
    targets_dir = teacher_targets(teacher_dir, budget.data, classes)
    unlabeled_spec = unlabeled_data(budget)
    unlabeled = (unlabeled_spec, teacher_targets(teacher_dir, unlabeled_spec, classes))
    timings["teacher targets"] = round(time.perf_counter() - t, 1)

    evaluate = shapes_evaluator(budget.data, size=eval_size)
    teacher_model = load_clip(str(teacher_dir))
    teacher_report = describe_model("teacher", teacher_model, evaluate(teacher_model), latency=False)
    teacher_report.name = "teacher"
    teacher_top1 = teacher_report.accuracy["top1"]

    def job(name: str, seed: int, method: Method) -> Job:
        return Job(name, seed, method, run_dir(name, seed), budget, teacher_dir, targets_dir, unlabeled)

    # a loss alone at its tuned setting is the sweep's run of that setting: one folder for both
    folders = {kd: f"{kd}@{TUNED[kd].label()}" for kd in KD_METHODS}

    def run_dir(name: str, seed: int) -> Path:
        return out / f"seed-{seed}" / folders.get(name, name)

    def score(name: str, seed: int) -> dict[str, float]:
        return evaluate(load_clip(str(run_dir(name, seed))))

    if args.sweep:
        seed = args.seeds[0]
        jobs = [job("scratch", seed, Method("clip", "random"))]
        for kd, settings in SWEEP.items():
            jobs += [
                job(f"{kd}@{s.label()}", seed, Method(s.losses(kd), "random", s.options)) for s in settings
            ]
        train_all(jobs, args.jobs, timings)
        sweep = {
            "seed": seed,
            "steps": steps,
            "batch_size": args.batch_size,
            "teacher_top1": teacher_top1,
            "scratch": score("scratch", seed)["top1"],
            "losses": {
                kd: [
                    {
                        "setting": s.label(),
                        "weight": s.weight,
                        **s.options,
                        "top1": score(f"{kd}@{s.label()}", seed)["top1"],
                    }
                    for s in settings
                ]
                for kd, settings in SWEEP.items()
            },
            "seconds": {
                "wall": round(time.perf_counter() - started, 1),
                "process_cpu_with_children": round(_cpu_seconds() - cpu_started + _children_cpu_seconds(), 1),
                "students": timings,
            },
        }
        (out / "sweep.json").write_text(json.dumps(sweep, indent=2) + "\n")
        (out / "sweep.md").write_text(sweep_markdown(sweep))
        print(sweep_markdown(sweep))
        return

    table = methods()
    train_all([job(name, s, m) for s in args.seeds for name, m in table.items()], args.jobs, timings)
    per_seed = {s: {name: score(name, s)["top1"] for name in table} for s in args.seeds}
    mean_alone = {name: statistics.fmean(per_seed[s][name] for s in args.seeds) for name in table}
    combined = combinations(mean_alone)
    train_all([job(name, s, m) for s in args.seeds for name, m in combined.items()], args.jobs, timings)
    for s in args.seeds:
        per_seed[s].update({name: score(name, s)["top1"] for name in combined})
    methods_used = {**table, **combined}
    for s in args.seeds:
        print(f"seed {s}: " + ", ".join(f"{n} {100 * v:.1f}%" for n, v in per_seed[s].items()))

    # every student has the same towers: measure the teacher and one student, alternating, on quiet
    # cores (training is over), and give each student that figure
    first = args.seeds[0]
    rounds: dict[str, list[dict[str, float]]] = {"teacher": [], "student": []}
    student_model = load_clip(str(run_dir("scratch", first)))
    for _ in range(3):
        rounds["teacher"].append(onnx_latency(teacher_model, repeats=repeats))
        rounds["student"].append(onnx_latency(student_model, repeats=repeats))
    latency = {
        role: {tower: statistics.median(r[tower] for r in runs) for tower in runs[0]}
        for role, runs in rounds.items()
    }
    teacher_report.latency_ms = latency["teacher"]
    reports = {"teacher": teacher_report}
    for name in methods_used:
        student = load_clip(str(run_dir(name, first)))
        report = describe_model("student", student, {"top1": per_seed[first][name]}, latency=False)
        report.name, report.latency_ms = name, latency["student"]
        reports[name] = report
    speedup = latency["teacher"]["image"] / latency["student"]["image"]

    best_name = max(
        (n for n in methods_used if n != "scratch"),
        key=lambda n: statistics.fmean(per_seed[s][n] for s in args.seeds),
    )
    served = None
    if not args.no_served_check:
        t = time.perf_counter()
        served = served_check(run_dir(best_name, first) / "final", out, budget.data, eval_size)
        timings["served check"] = round(time.perf_counter() - t, 1)
        print(f"served ({best_name}, seed {first}): {json.dumps(served)}")
    goal = goals(per_seed, teacher_top1, speedup, served)
    breakdown = {
        "teacher": composition_breakdown(teacher_model, budget.data, eval_size),
        **{
            f"{name} (seed {first})": composition_breakdown(
                load_clip(str(run_dir(name, first))), budget.data, eval_size
            )
            for name in dict.fromkeys(["scratch", best_name])
        },
    }
    sweep_path = out / "sweep.json"
    sweep = json.loads(sweep_path.read_text()) if sweep_path.is_file() and not args.quick else None
    teacher_info = {**teacher_record, "dir": str(teacher_dir), "top1": teacher_top1}
    summary = {
        "student_steps": steps,
        "batch_size": args.batch_size,
        "eval_images": eval_size,
        "seeds": args.seeds,
        "threads": args.threads,
        "jobs": args.jobs,
        "kernels": kernels(),
        "teacher": teacher_info,
        "tuned": {kd: {"weight": s.weight, **s.options} for kd, s in TUNED.items()},
        "methods": {n: {"losses": m.losses, "init": m.init, **m.options} for n, m in methods_used.items()},
        "top1": {str(s): v for s, v in per_seed.items()},
        "top1_over_seeds": {n: _stats([per_seed[s][n] for s in args.seeds]) for n in methods_used},
        "latency_ms": {"rounds": rounds, **latency},
        "served": served,
        "goals": goal,
        "breakdown": breakdown,
        "sweep": sweep,
        "seconds": {
            **timings,
            "total_wall": round(time.perf_counter() - started, 1),
            "total_process_cpu_with_children": round(
                _cpu_seconds() - cpu_started + _children_cpu_seconds(), 1
            ),
        },
    }
    (out / "results.json").write_text(
        json.dumps({"summary": summary, "models": [vars(r) for r in reports.values()]}, indent=2, default=str)
        + "\n"
    )
    markdown = results_markdown(
        teacher_info, per_seed, methods_used, reports, goal, served, sweep, args, steps, breakdown
    )
    (out / "results.md").write_text(markdown)
    rows = [
        {
            "name": "teacher",
            "role": "teacher",
            "latency_ms": latency["teacher"]["image"],
            "mean": teacher_top1,
            "min": teacher_top1,
            "max": teacher_top1,
        }
    ]
    for name in methods_used:
        values = [per_seed[s][name] for s in args.seeds]
        rows.append(
            {
                "name": name,
                "role": "student",
                "latency_ms": latency["student"]["image"],
                "mean": statistics.fmean(values),
                "min": min(values),
                "max": max(values),
            }
        )
    plot(
        rows,
        out / "accuracy_vs_latency.png",
        f"Students ({steps} steps) vs a cached teacher ({recipe.steps} steps) on synthetic shapes, "
        f"seeds {', '.join(map(str, args.seeds))}",
    )
    print()
    print(markdown)
    print(
        f"total: {summary['seconds']['total_wall']:.0f} s wall, {summary['seconds']['total_process_cpu_with_children']:.0f} s CPU"
    )
    print(f"plot: {out / 'accuracy_vs_latency.png'}")


if __name__ == "__main__":
    main()
