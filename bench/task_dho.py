"""DHO on a tiny task: does the mix of the two heads beat either head alone?

The task (clipserve.training.synthetic.colour_task_images): 32 px images of one shape, labelled by its
colour among red, green, blue and yellow. A fixed teacher knows red from green (0.85 on the right
one) and cannot tell blue from yellow (half each); the few labeled images show blue and yellow only.
Each head alone is right on about half the labels; the mix, with its weight chosen on held-out
labeled images of all four, should be right on nearly all. A tiny ViT student from random init,
`--steps` DHO steps at each seed; top-1 of each head and the mix on a test split of its own, mean
and spread over seeds. The figures are printed (and written as JSON with --out), never asserted.

    python bench/task_dho.py                 # seeds 0-4, 80 steps
    python bench/task_dho.py --seeds 0 1 --steps 40
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from clipserve.training.models import load_clip
from clipserve.training.synthetic import colour_task_images
from clipserve.training.task import (
    DhoConfig,
    TaskData,
    TaskStudent,
    accuracy,
    head_probabilities,
    image_transform,
    mix,
    to_pixels,
    train_dho,
)

LABELS = ("red", "green", "blue", "yellow")
STUDENT = {
    "embed_dim": 32,
    "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2},
    "text": {"width": 32, "layers": 1, "heads": 2, "context_length": 32},
}


def teacher(labels: list[int]) -> torch.Tensor:
    targets = torch.zeros(len(labels), len(LABELS))
    for row, label in enumerate(labels):
        if label < 2:
            targets[row] = 0.05
            targets[row, label] = 0.85
        else:
            targets[row, 2:] = 0.5
    return targets


def run(seed: int, steps: int, config_path: Path) -> dict[str, float]:
    clip = load_clip(str(config_path), seed=seed)
    transform = image_transform(clip.preprocess_cfg)
    unlabeled, unlabeled_labels = colour_task_images(LABELS, 11 + 10 * seed, 96)
    labeled, labels = colour_task_images(LABELS, 12 + 10 * seed, 24)
    labeled, labels = zip(*[(i, y) for i, y in zip(labeled, labels, strict=True) if y >= 2], strict=True)
    held_out, held_out_labels = colour_task_images(LABELS, 13 + 10 * seed, 32)
    test, test_labels = colour_task_images(LABELS, 14 + 10 * seed, 192)
    data = TaskData(
        unlabeled=to_pixels(transform, unlabeled),
        unlabeled_targets=teacher(unlabeled_labels),
        labeled=to_pixels(transform, labeled),
        labels=torch.tensor(labels),
        labeled_targets=teacher(list(labels)),
        held_out=to_pixels(transform, held_out),
        held_out_labels=torch.tensor(held_out_labels),
    )
    student = TaskStudent(clip.model.visual, clip.embed_dim, len(LABELS))
    config = DhoConfig(steps=steps, batch_size=32, labeled_batch_size=8, lr=1e-2, seed=seed, progress=False)
    result = train_dho(student, data, config)
    ce, kd = head_probabilities(student, to_pixels(transform, test))
    truth = torch.tensor(test_labels)
    return {
        "ce": accuracy(ce, truth),
        "kd": accuracy(kd, truth),
        "mix": accuracy(mix(ce, kd, result.mix_weight), truth),
        "mix_weight": result.mix_weight,
        "seconds": result.seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="folder for results.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = args.out or Path("runs/bench-task-dho")
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "student.json"
    config_path.write_text(json.dumps(STUDENT))
    started = time.perf_counter()
    rows = {}
    for seed in args.seeds:
        rows[seed] = run(seed, args.steps, config_path)
        figures = rows[seed]
        print(
            f"seed {seed}: test top-1 ce {figures['ce']:.3f}  kd {figures['kd']:.3f}  mix {figures['mix']:.3f}  "
            f"(w {figures['mix_weight']:.2f}, {figures['seconds']:.1f} s)",
            flush=True,
        )
    summary = {}
    for key in ("ce", "kd", "mix"):
        values = [row[key] for row in rows.values()]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        summary[key] = {
            "mean": statistics.mean(values),
            "stdev": spread,
            "min": min(values),
            "max": max(values),
        }
        print(
            f"{key:>4}: mean {summary[key]['mean']:.3f} ± {spread:.3f} (min {min(values):.3f}, max {max(values):.3f})"
        )
    print(f"{len(rows)} seeds x {args.steps} steps in {time.perf_counter() - started:.0f} s")
    (out / "results.json").write_text(
        json.dumps({"seeds": rows, "summary": summary, "steps": args.steps}, indent=2)
    )


if __name__ == "__main__":
    main()
