"""Distillation on the synthetic shapes set: does a distilled student keep the teacher's accuracy?

1. Train a teacher from scratch (CLIP loss) on the shapes set: a ResNet image tower three times
   wider than the student's, at twice its input resolution.
2. With the same budget (steps, batch, data), train the student: from scratch; with each
   distillation method alone (logit KD, feature, ICL, class-vector KD, weight inheritance); then
   the combinations: the two best KD losses on a weight-inherited student, each and together.
   KD losses read the teacher's stored targets (computed once, MobileCLIP-style), so the teacher
   is not re-run for every student.
3. Report zero-shot top-1/top-5 on held-out (colour, shape) compositions, parameters, GFLOPs and
   ONNX Runtime latency per tower (batch 1, one thread); plot accuracy against image latency.

    python bench/distill_shapes.py            # the full experiment (about 22 minutes on 2 cores)
    python bench/distill_shapes.py --quick    # a smoke run proving the pipeline (about 1.5 minutes)

Writes results.json, results.md and accuracy_vs_latency.png into --out (runs/bench-distill-shapes).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path

import torch

# run as `python bench/distill_shapes.py`, Python puts bench/ first on sys.path, where bench/export.py
# would hide the `export` package: look in the repository root instead
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training import synthetic
from training.cli import run_training, shapes_evaluator
from training.data import build_dataset
from training.evaluate import ModelReport, describe_model, markdown_report, onnx_latency
from training.models import load_clip, load_teacher
from training.recipes import SHAPES_LARGE_TEACHER_CONFIG, ShapesBudget, student_options, teacher_options
from training.targets import store_targets

KD_METHODS = ("logit_kd", "feature", "icl", "class_kd")


def methods(kd_weight: float) -> dict[str, tuple[str, str]]:
    """name: (losses, init); each method alone: a KD loss beside the CLIP loss with weight
    `kd_weight`, or weight inheritance with the CLIP loss."""
    table = {"scratch": ("clip", "random")}
    table.update({kd: (f"clip=1,{kd}={kd_weight:g}", "random") for kd in KD_METHODS})
    table["inherit"] = ("clip", "inherit")
    return table


def combinations(scores: dict[str, float], kd_weight: float) -> dict[str, tuple[str, str]]:
    """The two KD losses that did best alone, on a weight-inherited student: each, and both."""
    first, second = sorted(KD_METHODS, key=lambda m: -scores[m])[:2]
    return {
        f"inherit+{first}": (f"clip=1,{first}={kd_weight:g}", "inherit"),
        f"inherit+{second}": (f"clip=1,{second}={kd_weight:g}", "inherit"),
        f"inherit+{first}+{second}": (f"clip=1,{first}={kd_weight:g},{second}={kd_weight:g}", "inherit"),
    }


def train_student(job: tuple[str, str, str, Path, ShapesBudget, Path]) -> tuple[str, float]:
    """One student run, in its own process."""
    name, losses, init, out, budget, teacher_dir = job
    torch.set_num_threads(budget.threads or 1)
    started = time.perf_counter()
    options = student_options(
        out / name,
        budget,
        teacher_dir=teacher_dir,
        teacher_targets=out / "targets",
        losses=losses,
        init=init,
        progress=False,
    )
    run_training({**options, "evaluate": False})
    return name, time.perf_counter() - started


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick", action="store_true", help="few steps and images: proves the pipeline, not the figures"
    )
    p.add_argument("--steps", type=int, help="training steps per model (default 800, quick 20)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument(
        "--kd-weight", type=float, default=1.0, help="weight of each distillation loss (CLIP loss: 1)"
    )
    p.add_argument("--seed", type=int, default=0, help="training seed of every model (init, batch order)")
    p.add_argument("--eval-size", type=int, help="held-out benchmark images (default 600, quick 60)")
    p.add_argument(
        "--teacher-config",
        type=Path,
        default=SHAPES_LARGE_TEACHER_CONFIG,
        help="the teacher's open_clip JSON config (its text tower must match the student's to inherit it)",
    )
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads per student process (the teacher uses --jobs)"
    )
    p.add_argument("--jobs", type=int, default=2, help="students trained in parallel (one process each)")
    p.add_argument("--out", type=Path, default=Path("runs/bench-distill-shapes"))
    return p.parse_args()


def spread_labels(values: list[float], gap: float) -> list[float]:
    """Label heights near `values` (same order), at least `gap` apart, so stacked points stay legible."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    placed = [0.0] * len(values)
    previous = None
    for i in order:
        placed[i] = values[i] if previous is None else max(values[i], previous + gap)
        previous = placed[i]
    return placed


def plot(reports: list[ModelReport], metric: str, target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    fig, ax = plt.subplots(figsize=(8, 5))
    xs = [r.latency_ms["image"] for r in reports]
    ys = [100 * r.accuracy[metric] for r in reports]
    span = max(ys) - min(ys) or 1.0
    label_ys = spread_labels(ys, gap=span / 18)
    for r, x, y, label_y in zip(reports, xs, ys, label_ys, strict=True):
        colour = "black" if r.role == "teacher" else ("gray" if r.name == "scratch" else "tab:blue")
        ax.scatter(x, y, color=colour, s=40, zorder=3)
        ax.annotate(
            r.name,
            (x, y),
            xytext=(x * 1.25, label_y),
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
    ax.set_ylabel(f"zero-shot {metric} on held-out compositions, %")
    ax.set_title("Distilled students vs teacher on synthetic shapes (same steps and data)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(target, dpi=110)
    plt.close(fig)


def main() -> None:
    args = parse_args()
    steps = args.steps or (20 if args.quick else 800)
    eval_size = args.eval_size or (60 if args.quick else 600)
    repeats = 20 if args.quick else 300
    # the teacher trains alone: give it every core the students will share
    torch.set_num_threads(args.threads * args.jobs)
    budget = ShapesBudget(
        steps=steps, batch_size=args.batch_size, lr=args.lr, threads=args.threads, seed=args.seed
    )
    teacher_budget = replace(budget, threads=args.threads * args.jobs)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    print(
        f"machine: {platform.processor() or platform.machine()}, {platform.platform()}; teacher on "
        f"{args.threads * args.jobs} torch threads, then {args.jobs} students at a time on {args.threads} each"
    )
    print(f"budget per model: {steps} steps x batch {args.batch_size} on {budget.data}, seed {args.seed}")

    evaluate = shapes_evaluator(budget.data, size=eval_size)

    t = time.perf_counter()
    teacher_run = run_training(
        {
            **teacher_options(out / "teacher", teacher_budget, progress=False, config=args.teacher_config),
            "evaluate": False,
        }
    )
    timings["teacher"] = time.perf_counter() - t
    teacher = load_teacher([str(teacher_run.out_dir)])

    t = time.perf_counter()
    data_spec = budget.data
    dataset = build_dataset(data_spec)
    classes = [f"{c} {s}" for c, s in synthetic.all_compositions()]
    vectors = teacher.class_vectors(classes, list(synthetic.CLASS_TEMPLATES), torch.device("cpu"))
    store_targets(
        teacher,
        dataset,
        out / "targets",
        data_spec,
        views=1,
        augment=False,
        class_vectors=vectors,
        class_names=classes,
        progress=False,
    )
    timings["teacher targets"] = time.perf_counter() - t

    # latency is measured per architecture after training (every student shares one), see below
    reports = [describe_model("teacher", teacher.members[0], evaluate(teacher.members[0]), latency=False)]
    reports[0].name = "teacher"

    def train_students(methods: dict[str, tuple[str, str]]) -> None:
        jobs = [
            (name, losses, init, out, budget, teacher_run.out_dir) for name, (losses, init) in methods.items()
        ]
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
            for name, seconds in pool.map(train_student, jobs):
                timings[name] = seconds

    def evaluate_student(name: str, losses: str, init: str) -> None:
        student = load_clip(str(out / name))
        report = describe_model("student", student, evaluate(student), latency=False)
        report.name = name
        reports.append(report)
        print(
            f"{name}: top1 {report.accuracy['top1']:.3f} ({losses}, init {init}), trained in {timings[name]:.0f}s"
        )

    table = methods(args.kd_weight)
    train_students(table)
    for name, (losses, init) in table.items():
        evaluate_student(name, losses, init)
    scores = {r.name: r.accuracy["top1"] for r in reports if r.role == "student"}
    combined = combinations(scores, args.kd_weight)
    train_students(combined)
    for name, (losses, init) in combined.items():
        evaluate_student(name, losses, init)

    # every student has the same towers: measure the teacher and one student, alternating, on quiet
    # cores (training is over), and give each student that figure
    rounds: dict[str, list[dict[str, float]]] = {"teacher": [], "student": []}
    student_model = load_clip(str(out / "scratch"))
    for _ in range(3):
        rounds["teacher"].append(onnx_latency(teacher.members[0], repeats=repeats))
        rounds["student"].append(onnx_latency(student_model, repeats=repeats))
    latency = {
        role: {tower: statistics.median(r[tower] for r in runs) for tower in runs[0]}
        for role, runs in rounds.items()
    }
    for report in reports:
        report.latency_ms = latency[report.role]
    print("ONNX Runtime ms, 3 rounds of the median of", repeats, "runs:", json.dumps(rounds))

    teacher_report = reports[0]
    best = max(
        (r for r in reports if r.role == "student" and r.name != "scratch"), key=lambda r: r.accuracy["top1"]
    )
    scratch = next(r for r in reports if r.name == "scratch")
    summary = {
        "steps": steps,
        "batch_size": args.batch_size,
        "eval_images": eval_size,
        "seed": args.seed,
        "threads": args.threads,
        "jobs": args.jobs,
        "kd_weight": args.kd_weight,
        "teacher_config": str(args.teacher_config),
        "combinations": {name: {"losses": losses, "init": init} for name, (losses, init) in combined.items()},
        "best_student": best.name,
        "accuracy_ratio_to_teacher": best.accuracy["top1"] / max(teacher_report.accuracy["top1"], 1e-9),
        "image_latency_speedup": teacher_report.latency_ms["image"] / best.latency_ms["image"],
        "gain_over_scratch_top1": best.accuracy["top1"] - scratch.accuracy["top1"],
        "seconds": {**timings, "total": time.perf_counter() - started},
    }
    (out / "results.json").write_text(
        json.dumps({"summary": summary, "models": [vars(r) for r in reports]}, indent=2) + "\n"
    )
    markdown = markdown_report(
        reports, title=f"Distillation on synthetic shapes ({steps} steps x {args.batch_size})"
    )
    (out / "results.md").write_text(markdown)
    plot(reports, "top1", out / "accuracy_vs_latency.png")
    print()
    print(markdown)
    print(json.dumps(summary, indent=2))
    print(f"plot: {out / 'accuracy_vs_latency.png'}")


if __name__ == "__main__":
    main()
