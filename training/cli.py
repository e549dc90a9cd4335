"""`clip-distill`: train (the default), `eval` and `targets`.

Options come from defaults, then a YAML/JSON `--config` file (keys are the long flag names, with
dashes or underscores), then the flags given on the command line, which win.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from export.bundle import BundleError
from training import synthetic
from training.data import DataError, build_dataset
from training.losses import LossConfigError, LossWeights
from training.models import ClipModel, ModelSpecError, Teacher, inherit_weights, load_clip, load_teacher
from training.objective import LossSettings
from training.train import CheckpointError, TrainConfig, TrainResult, train

COMMANDS = ("train", "eval", "targets")
TRAIN_DEFAULTS: dict[str, Any] = {
    "teacher": None,
    "teacher_pretrained": None,
    "student": None,
    "student_pretrained": None,
    "init": "random",
    "inherit_from": None,
    "data": None,
    "eval_data": None,
    "out": "runs/distill",
    "steps": 100,
    "batch_size": 64,
    "lr": 5e-4,
    "weight_decay": 0.1,
    "warmup_steps": 10,
    "grad_clip": 1.0,
    "accumulation": 1,
    "seed": 0,
    "device": "cpu",
    "amp": True,
    "checkpoint_every": 0,
    "eval_every": 0,
    "num_workers": 0,
    "augment": False,
    "losses": None,
    "student_temperature": None,
    "teacher_temperature": None,
    "fixed_temperature": None,
    "feature_kind": "mse",
    "class_kd_temperature": 1.0,
    "projection": True,
    "label_head": False,
    "class_names": None,
    "templates": None,
    "on_bad_image": "skip",
    "teacher_targets": None,
    "resume": None,
    "stop_at": None,
    "publish": None,
    "name": None,
    "int8": False,
    "threads": None,
    "progress": True,
    "evaluate": True,
}


class UsageError(ValueError):
    pass


def _split(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v) for v in value]


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError as exc:
        raise UsageError(f"config file {path} does not exist") from exc
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise UsageError(f"config file {path} must hold a mapping of option names to values")
    options = {key.replace("-", "_"): value for key, value in data.items()}
    unknown = sorted(set(options) - set(TRAIN_DEFAULTS))
    if unknown:
        raise UsageError(f"unknown option(s) in {path}: {unknown}")
    return options


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="clip-distill", description="Distill a CLIP teacher into a small student."
    )
    p.add_argument("--config", type=Path, help="YAML or JSON file of options; flags override it")
    p.add_argument("--teacher", help="open_clip name, run folder, or comma-separated list (ensemble)")
    p.add_argument("--teacher-pretrained", help="tag, checkpoint file or 'none'; comma-separated per teacher")
    p.add_argument("--student", help="open_clip name or JSON config (embed_dim, vision, text)")
    p.add_argument("--student-pretrained", help="tag or checkpoint for the student's start")
    p.add_argument(
        "--init", choices=["random", "inherit"], help="inherit: weight inheritance from the teacher"
    )
    p.add_argument("--inherit-from", help="model to inherit weights from (default: the first teacher)")
    p.add_argument("--data", help="synthetic:shapes, captions .csv/.tsv/.jsonl, tar shards, or class folders")
    p.add_argument("--eval-data", help="class folders for zero-shot evaluation (synthetic data has its own)")
    p.add_argument("--out", help="run folder: checkpoints, metrics.jsonl, curves.png, final/")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--grad-clip", type=float, help="max gradient norm; 0 disables")
    p.add_argument("--accumulation", type=int, help="micro-batches per optimizer step")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="cpu, cuda, cuda:1 ...")
    p.add_argument(
        "--no-amp", dest="amp", action="store_const", const=False, help="no mixed precision on GPU"
    )
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (always one at the end)")
    p.add_argument("--eval-every", type=int)
    p.add_argument("--num-workers", type=int)
    p.add_argument("--augment", action="store_const", const=True, help="seeded random crops and flips")
    p.add_argument("--losses", help="e.g. clip=1,logit_kd=1,feature=0.5,icl=1,class_kd=1")
    p.add_argument("--student-temperature", type=float, help="fixed student temperature for logit KD")
    p.add_argument("--teacher-temperature", type=float, help="fixed teacher temperature for logit KD")
    p.add_argument(
        "--fixed-temperature", type=float, help="freeze the student's CLIP temperature at this value"
    )
    p.add_argument("--feature-kind", choices=["mse", "cosine"])
    p.add_argument("--class-kd-temperature", type=float)
    p.add_argument("--no-projection", dest="projection", action="store_const", const=False)
    p.add_argument(
        "--label-head", action="store_const", const=True, help="DHO-style labelled head for class_kd"
    )
    p.add_argument("--class-names", help="file with one class name per line, for class_kd")
    p.add_argument("--templates", help="file with one template per line ('a photo of a {}.')")
    p.add_argument("--on-bad-image", choices=["skip", "fail"])
    p.add_argument(
        "--teacher-targets", help="folder written by `clip-distill targets`: no teacher in the loop"
    )
    p.add_argument("--resume", help="checkpoint path, or 'auto' for the latest in --out")
    p.add_argument("--stop-at", type=int, help="stop (with a checkpoint) at this step; resume later")
    p.add_argument("--publish", help="model repository to publish the final student to")
    p.add_argument("--name", help="model name in the repository")
    p.add_argument("--int8", action="store_const", const=True, help="also publish an int8 image/text graph")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False)
    p.add_argument(
        "--no-eval", dest="evaluate", action="store_const", const=False, help="skip zero-shot evaluation"
    )
    return p


def resolve_options(argv: Sequence[str]) -> dict[str, Any]:
    args = train_parser().parse_args(argv)
    options = dict(TRAIN_DEFAULTS)
    if args.config is not None:
        options.update(read_config_file(args.config))
    options.update({k: v for k, v in vars(args).items() if v is not None and k != "config"})
    return options


def _read_lines(path: str | None) -> list[str] | None:
    if path is None:
        return None
    try:
        return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except FileNotFoundError as exc:
        raise UsageError(f"file {path} does not exist") from exc


def _class_setup(
    options: dict[str, Any], dataset_classes: list[str] | None
) -> tuple[list[str] | None, list[str]]:
    names = _read_lines(options["class_names"]) or dataset_classes
    templates = _read_lines(options["templates"]) or list(synthetic.CLASS_TEMPLATES)
    return names, templates


def shapes_evaluator(data_spec: str, size: int = 300):
    """Zero-shot top-1/top-5 on the held-out compositions of the synthetic shapes set."""
    from training.data import shapes_config_from_spec
    from training.evaluate import zero_shot

    config, _ = shapes_config_from_spec(data_spec)
    bench = synthetic.ShapesBenchmark(config, held_out_only=True, size=size)
    images, labels = zip(*(bench[i] for i in range(len(bench))), strict=True)

    def evaluate(clip: ClipModel) -> dict[str, float]:
        return zero_shot(clip, images, labels, bench.classes, synthetic.CLASS_TEMPLATES)

    return evaluate


def folder_evaluator(path: str, templates: list[str]):
    from training.data import ImageFolderSource
    from training.evaluate import zero_shot

    source = ImageFolderSource(Path(path))
    items = [source.load(i) for i in range(len(source))]

    def evaluate(clip: ClipModel) -> dict[str, float]:
        return zero_shot(clip, [i[0] for i in items], [i[2] for i in items], source.classes, templates)

    return evaluate


def _evaluator(options: dict[str, Any], templates: list[str]):
    if not options["evaluate"]:
        return None
    if options["eval_data"]:
        return folder_evaluator(options["eval_data"], templates)
    if str(options["data"]).startswith("synthetic:shapes"):
        return shapes_evaluator(options["data"])
    return None


def _build_student(options: dict[str, Any], teacher: Teacher | None) -> ClipModel:
    student = load_clip(options["student"], options["student_pretrained"], seed=options["seed"])
    if options["init"] == "inherit":
        if options["inherit_from"]:
            source = load_clip(options["inherit_from"])
        elif teacher is not None:
            source = teacher.members[0]
        else:
            raise UsageError("--init inherit needs a --teacher or --inherit-from model to inherit from")
        report = inherit_weights(student, source)
        print(
            f"weight inheritance from {source.architecture}: {len(report.copied)} copied, {len(report.sliced)} "
            f"sliced, {len(report.interpolated)} interpolated, {len(report.skipped)} skipped"
        )
    return student


def run_training(options: dict[str, Any]) -> TrainResult:
    """Everything `clip-distill` (train) does, callable from Python with an options mapping."""
    options = {**TRAIN_DEFAULTS, **options}
    if not options["student"]:
        raise UsageError("--student is required (an open_clip name or a JSON config)")
    if not options["data"]:
        raise UsageError("--data is required")
    if options["publish"] and not options["name"]:
        raise UsageError("--publish needs --name (the model's name in the repository)")
    if options["publish"]:
        from export.bundle import ModelRepository

        ModelRepository(options["publish"]).check_writable()
    if options["threads"]:
        torch.set_num_threads(int(options["threads"]))
    teacher_refs = _split(options["teacher"])
    has_teacher = bool(teacher_refs) or bool(options["teacher_targets"])
    losses = LossWeights.parse(options["losses"] or ("clip=1,logit_kd=1" if has_teacher else "clip"))
    settings = LossSettings(
        weights=losses,
        student_temperature=options["student_temperature"],
        teacher_temperature=options["teacher_temperature"],
        feature_kind=options["feature_kind"],
        class_kd_temperature=options["class_kd_temperature"],
        projection=options["projection"],
        fixed_temperature=options["fixed_temperature"],
        label_head=options["label_head"],
    )
    if teacher_refs and options["teacher_targets"]:
        raise UsageError("give --teacher or --teacher-targets, not both")
    teacher = (
        load_teacher(teacher_refs, _split(options["teacher_pretrained"]) or None, seed=options["seed"] + 1000)
        if teacher_refs
        else None
    )
    student = _build_student(options, teacher)
    dataset = build_dataset(options["data"], on_bad_image=options["on_bad_image"])
    class_names, templates = _class_setup(options, dataset.classes)
    class_vectors, targets, teacher_dims = None, None, None
    if options["teacher_targets"]:
        from training.targets import OfflineTargets

        targets = OfflineTargets.open(options["teacher_targets"])
        targets.check_covers(dataset)
        class_vectors, teacher_dims = targets.class_vectors, targets.embed_dims
    elif teacher is not None and "class_kd" in losses.weights and class_names:
        class_vectors = teacher.class_vectors(class_names, templates, torch.device("cpu"))
    config = TrainConfig(
        **{k: options[k] for k in TrainConfig.__dataclass_fields__ if k in options and options[k] is not None}
    )
    result = train(
        student,
        dataset,
        Path(options["out"]),
        config,
        settings,
        teacher=teacher if losses.needs_teacher else None,
        class_vectors=class_vectors,
        targets=targets,
        teacher_dims=teacher_dims,
        evaluator=_evaluator(options, templates),
        resume=options["resume"],
    )
    print(
        f"run {result.run_id}: {len(result.losses)} steps in {result.seconds:.1f}s, model in {result.final_dir}"
    )
    if options["publish"] and result.final_dir.is_dir() and len(result.losses) and _is_main():
        bundle = publish(student, result, options["publish"], options["name"], int8=options["int8"])
        print(f"published {bundle.ref} to {bundle.path}")
    return result


def _is_main() -> bool:
    return not (torch.distributed.is_initialized() and torch.distributed.get_rank() != 0)


def publish(student: ClipModel, result: TrainResult, repository: str | Path, name: str, int8: bool = False):
    """Export the final student through `export/` as a new, verified version in `repository`."""
    from export.bundle import ModelSource
    from export.exporter import export_bundle

    source = ModelSource(
        architecture=student.architecture,
        config=student.model_cfg,
        checkpoint_sha256=result.checkpoint_sha256,
        training_run=result.run_id,
    )
    return export_bundle(student.model.cpu().eval(), repository, name, source=source, int8=int8)


# ---- targets ------------------------------------------------------------------------------------


def targets_main(argv: Sequence[str]) -> None:
    p = argparse.ArgumentParser(
        prog="clip-distill targets", description="Store teacher embeddings for a dataset."
    )
    p.add_argument("--teacher", required=True)
    p.add_argument("--teacher-pretrained")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument(
        "--views", type=int, default=4, help="augmented views per image (view 0 is the whole image)"
    )
    p.add_argument("--no-augment", dest="augment", action="store_false")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--class-names", help="file with one class name per line: also store class vectors")
    p.add_argument("--templates")
    p.add_argument("--on-bad-image", choices=["skip", "fail"], default="skip")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=128)
    args = p.parse_args(argv)
    from training.targets import store_targets

    teacher = load_teacher(
        _split(args.teacher), _split(args.teacher_pretrained) or None, seed=args.seed + 1000
    )
    dataset = build_dataset(args.data, on_bad_image=args.on_bad_image)
    names = _read_lines(args.class_names) or dataset.classes
    templates = _read_lines(args.templates) or list(synthetic.CLASS_TEMPLATES)
    vectors = teacher.class_vectors(names, templates, torch.device("cpu")) if names else None
    out = store_targets(
        teacher,
        dataset,
        args.out,
        args.data,
        views=args.views,
        augment=args.augment,
        seed=args.seed,
        batch_size=args.batch_size,
        class_vectors=vectors,
        class_names=names,
        device=args.device,
    )
    print(f"stored teacher targets for {len(dataset)} samples x {args.views} views in {out}")


# ---- eval ---------------------------------------------------------------------------------------


def eval_main(argv: Sequence[str]) -> None:
    p = argparse.ArgumentParser(prog="clip-distill eval", description="Evaluate students (and teachers).")
    p.add_argument("--model", required=True, help="student: run folder, open_clip name or JSON config")
    p.add_argument("--pretrained")
    p.add_argument("--teacher", help="evaluated beside the student")
    p.add_argument("--teacher-pretrained")
    p.add_argument("--data", required=True, help="synthetic:shapes, class folders, or a captions file")
    p.add_argument("--templates")
    p.add_argument("--out", type=Path, required=True, help="folder for report.json and report.md")
    p.add_argument("--no-latency", dest="latency", action="store_false")
    args = p.parse_args(argv)
    from training.evaluate import describe_model, write_report

    templates = _read_lines(args.templates) or list(synthetic.CLASS_TEMPLATES)
    measure = _eval_measure(args.data, templates)
    entries = []
    if args.teacher:
        teacher = load_clip(args.teacher, args.teacher_pretrained)
        entries.append(describe_model("teacher", teacher, measure(teacher), latency=args.latency))
    student = load_clip(args.model, args.pretrained)
    entries.append(describe_model("student", student, measure(student), latency=args.latency))
    json_path, md_path = write_report(entries, args.out, title=f"clip-distill eval on {args.data}")
    print(md_path.read_text())
    print(f"report: {json_path}, {md_path}")


def _eval_measure(data: str, templates: list[str]):
    if data.startswith("synthetic:shapes"):
        return shapes_evaluator(data)
    path = Path(data)
    if path.is_dir() and any(p.is_dir() for p in path.iterdir()):
        return folder_evaluator(data, templates)
    from training.evaluate import retrieval

    dataset = build_dataset(data)
    pairs = [dataset[i] for i in range(len(dataset))]

    def measure(clip: ClipModel) -> dict[str, float]:
        return retrieval(clip, [s.image for s in pairs], [s.caption for s in pairs])

    return measure


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "train"
    try:
        if command == "eval":
            eval_main(argv)
        elif command == "targets":
            targets_main(argv)
        else:
            run_training(resolve_options(argv))
    except (UsageError, DataError, ModelSpecError, LossConfigError, CheckpointError, BundleError) as exc:
        print(f"clip-distill: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
