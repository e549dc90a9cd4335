"""`clip-distill`: train (the default), `eval` and `targets`.

The options of each command are the fields of its class in training/settings.py. For `train` they
come from the fields' defaults, then a YAML/JSON `--config` file (keys are the option names, with
dashes or underscores), then the environment (CLIP_DISTILL_*), then the flags, which win.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from clipserve.contract.bundle import BundleError
from clipserve.contract.cli_settings import SettingsError, load_settings, validated
from clipserve.training import synthetic
from clipserve.training.data import DataError, PairDataset, build_dataset
from clipserve.training.losses import LossConfigError, LossWeights
from clipserve.training.models import (
    ClipModel,
    ModelSpecError,
    Teacher,
    check_model_ref,
    inherit_weights,
    load_clip,
    load_teacher,
)
from clipserve.training.objective import IMAGE_SIDE_LOSSES, LossSettings
from clipserve.training.settings import EvalSettings, TargetsSettings, TrainSettings
from clipserve.training.train import CheckpointError, TrainConfig, TrainResult, train

PROG = "clip-distill"
COMMANDS = {
    "train": "distill a teacher into a student, or train one alone (the default command)",
    "eval": "a student (and a teacher beside it): accuracy, parameters, GFLOPs, ONNX Runtime latency",
    "targets": "store a teacher's embeddings of a dataset, to train without the teacher in the loop",
    "task": "a small classifier for one label set, from a teacher and unlabeled images (DHO, PromptKD)",
}
COMMANDS_HELP = "commands:\n" + "\n".join(f"  {name:<8} {what}" for name, what in COMMANDS.items())
COMMANDS_HELP += f"\n\n`{PROG} COMMAND --help` lists the options of each; these are train's."


class UsageError(ValueError):
    pass


def _read_lines(path: Path | None) -> list[str] | None:
    if path is None:
        return None
    try:
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError as exc:
        raise UsageError(f"file {path} does not exist") from exc


def _templates(path: Path | None) -> list[str]:
    return _read_lines(path) or list(synthetic.CLASS_TEMPLATES)


def shapes_evaluator(data_spec: str, size: int = 300):
    """Zero-shot top-1/top-5 on the held-out compositions of the synthetic shapes set."""
    from clipserve.training.data import shapes_config_from_spec
    from clipserve.training.evaluate import zero_shot

    config, _ = shapes_config_from_spec(data_spec)
    bench = synthetic.ShapesBenchmark(config, held_out_only=True, size=size)
    images, labels = zip(*(bench[i] for i in range(len(bench))), strict=True)

    def evaluate(clip: ClipModel) -> dict[str, float]:
        return zero_shot(clip, images, labels, bench.classes, synthetic.CLASS_TEMPLATES)

    return evaluate


def folder_evaluator(path: str, templates: list[str]):
    from clipserve.training.data import ImageFolderSource
    from clipserve.training.evaluate import zero_shot

    source = ImageFolderSource(Path(path))
    items = [source.load(i) for i in range(len(source))]

    def evaluate(clip: ClipModel) -> dict[str, float]:
        return zero_shot(clip, [i[0] for i in items], [i[2] for i in items], source.classes, templates)

    return evaluate


def _evaluator(options: TrainSettings, templates: list[str]):
    if not options.evaluate:
        return None
    if options.eval_data:
        return folder_evaluator(options.eval_data, templates)
    if options.data.startswith("synthetic:shapes"):
        return shapes_evaluator(options.data)
    return None


def _build_student(options: TrainSettings, teacher: Teacher | None) -> ClipModel:
    student = load_clip(options.student, options.student_pretrained, seed=options.seed)
    if options.init == "inherit":
        if options.inherit_from:
            source = load_clip(options.inherit_from)
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


def _unlabeled_images(options: TrainSettings, losses: LossWeights) -> PairDataset | None:
    """The unlabeled transfer images, checked against what can learn from them; None without."""
    if options.unlabeled_targets and not options.unlabeled_data:
        raise UsageError("--unlabeled-targets belongs to --unlabeled-data; give both or neither")
    if not options.unlabeled_data:
        return None
    if not set(IMAGE_SIDE_LOSSES) & set(losses.weights):
        raise UsageError(
            f"--unlabeled-data feeds only the image-side distillation losses ({', '.join(IMAGE_SIDE_LOSSES)}); "
            f"add one to --losses (now {','.join(losses.weights)})"
        )
    if not options.teacher and not options.unlabeled_targets:
        raise UsageError(
            "--unlabeled-data needs the teacher's view of those images: --teacher, or --unlabeled-targets "
            "from `clip-distill targets --data <the unlabeled data>`"
        )
    return build_dataset(options.unlabeled_data, on_bad_image=options.on_bad_image)


def run_training(options: TrainSettings | Mapping[str, Any]) -> TrainResult:
    """Everything `clip-distill` (train) does, callable from Python with its settings or a mapping of
    them (what the mapping leaves out comes from the environment, then the defaults)."""
    if not isinstance(options, TrainSettings):
        options = validated(TrainSettings, options)
    if options.models_dir and not options.name:
        raise UsageError("--models-dir needs --name (the model's name in the repository)")
    if options.models_dir:
        from clipserve.contract.bundle import ModelRepository

        ModelRepository(options.models_dir).check_writable()
    if options.torch_threads:
        torch.set_num_threads(options.torch_threads)
    has_teacher = bool(options.teacher) or bool(options.teacher_targets)
    losses = LossWeights.parse(options.losses or ("clip=1,logit_kd=1" if has_teacher else "clip"))
    settings = LossSettings(weights=losses, **options.loss_options())
    if options.teacher and options.teacher_targets:
        raise UsageError("give --teacher or --teacher-targets, not both")
    # the student and the data first: a mistake is told in a second, not after the teacher has loaded
    for ref in (options.student, *([options.inherit_from] if options.inherit_from else [])):
        check_model_ref(ref)
    dataset = build_dataset(options.data, on_bad_image=options.on_bad_image)
    if not dataset.captioned:
        raise UsageError(
            f"--data {options.data} is a folder of images without captions: training needs image-text "
            "pairs; give such images as --unlabeled-data"
        )
    unlabeled = _unlabeled_images(options, losses)
    teacher = (
        load_teacher(options.teacher, options.teacher_pretrained or None, seed=options.seed + 1000)
        if options.teacher
        else None
    )
    student = _build_student(options, teacher)
    class_names = _read_lines(options.class_names) or dataset.classes
    templates = _templates(options.templates)
    from clipserve.training.targets import OfflineTargets

    class_vectors, targets, teacher_dims, unlabeled_targets = None, None, None, None
    if options.teacher_targets:
        targets = OfflineTargets.open(options.teacher_targets)
        targets.check_covers(dataset)
        class_vectors, teacher_dims = targets.class_vectors, targets.embed_dims
    elif teacher is not None and "class_kd" in losses.weights and class_names:
        class_vectors = teacher.class_vectors(class_names, templates, torch.device("cpu"))
    if unlabeled is not None and options.unlabeled_targets:
        unlabeled_targets = OfflineTargets.open(options.unlabeled_targets)
        unlabeled_targets.check_covers(unlabeled)
    config = TrainConfig(**options.loop())
    result = train(
        student,
        dataset,
        options.out,
        config,
        settings,
        teacher=teacher if losses.needs_teacher else None,
        class_vectors=class_vectors,
        targets=targets,
        teacher_dims=teacher_dims,
        evaluator=_evaluator(options, templates),
        resume=options.resume,
        unlabeled=unlabeled,
        unlabeled_targets=unlabeled_targets,
    )
    print(
        f"run {result.run_id}: {len(result.losses)} steps in {result.seconds:.1f}s, model in {result.final_dir}"
    )
    if options.models_dir and result.final_dir.is_dir() and len(result.losses) and _is_main():
        bundle = publish(student, result, options.models_dir, options.name, int8=options.int8)
        print(f"published {bundle.ref} to {bundle.path}")
    return result


def _is_main() -> bool:
    return not (torch.distributed.is_initialized() and torch.distributed.get_rank() != 0)


def publish(student: ClipModel, result: TrainResult, repository: str | Path, name: str, int8: bool = False):
    """Export the final student through `export/` as a new, verified version in `repository`."""
    from clipserve.contract.bundle import ModelSource
    from clipserve.export.exporter import export_bundle

    source = ModelSource(
        architecture=student.architecture,
        config=student.model_cfg,
        checkpoint_sha256=result.checkpoint_sha256,
        training_run=result.run_id,
    )
    # the student's own tokenizer: CLIP BPE, or the Hugging Face one its config names
    from open_clip.tokenizer import HFTokenizer

    tokenizer = student.tokenizer if isinstance(student.tokenizer, HFTokenizer) else None
    return export_bundle(
        student.model.cpu().eval(), repository, name, source=source, int8=int8, tokenizer=tokenizer
    )


# ---- targets ------------------------------------------------------------------------------------


def targets_main(argv: Sequence[str]) -> None:
    options = load_settings(TargetsSettings, argv, f"{PROG} targets", description=TargetsSettings.__doc__)
    from clipserve.training.targets import store_targets

    teacher = load_teacher(options.teacher, options.teacher_pretrained or None, seed=options.seed + 1000)
    dataset = build_dataset(options.data, on_bad_image=options.on_bad_image)
    names = _read_lines(options.class_names) or dataset.classes
    templates = _templates(options.templates)
    vectors = teacher.class_vectors(names, templates, torch.device("cpu")) if names else None
    out = store_targets(
        teacher,
        dataset,
        options.targets_dir,
        options.data,
        views=options.views,
        augment=options.augment,
        seed=options.seed,
        batch_size=options.batch_size,
        class_vectors=vectors,
        class_names=names,
        device=options.device,
    )
    print(f"stored teacher targets for {len(dataset)} samples x {options.views} views in {out}")


# ---- eval ---------------------------------------------------------------------------------------


def eval_main(argv: Sequence[str]) -> None:
    options = load_settings(EvalSettings, argv, f"{PROG} eval", description=EvalSettings.__doc__)
    from clipserve.training.evaluate import describe_model, write_report

    measure = _eval_measure(options.eval_data, _templates(options.templates))
    entries = []
    if options.teacher:
        teacher = load_clip(options.teacher, options.teacher_pretrained)
        entries.append(describe_model("teacher", teacher, measure(teacher), latency=options.latency))
    student = load_clip(options.model, options.pretrained)
    entries.append(describe_model("student", student, measure(student), latency=options.latency))
    json_path, md_path = write_report(
        entries, options.report_dir, title=f"{PROG} eval on {options.eval_data}"
    )
    print(md_path.read_text())
    print(f"report: {json_path}, {md_path}")


def _eval_measure(data: str, templates: list[str]):
    if data.startswith("synthetic:shapes"):
        return shapes_evaluator(data)
    path = Path(data)
    if path.is_dir() and any(p.is_dir() for p in path.iterdir()):
        return folder_evaluator(data, templates)
    from clipserve.training.evaluate import retrieval

    dataset = build_dataset(data)
    pairs = [dataset[i] for i in range(len(dataset))]

    def measure(clip: ClipModel) -> dict[str, float]:
        return retrieval(clip, [s.image for s in pairs], [s.caption for s in pairs])

    return measure


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "train"
    if command == "task":  # its own settings, errors and module: training/task.py
        from clipserve.training.task import main as task_main

        return task_main(argv)
    try:
        if command == "eval":
            eval_main(argv)
        elif command == "targets":
            targets_main(argv)
        else:
            # the commands first (a reader looks at the top), then train's options
            description = f"{TrainSettings.__doc__}\n\n{COMMANDS_HELP}"
            run_training(load_settings(TrainSettings, argv, PROG, description))
    except (
        SettingsError,
        UsageError,
        DataError,
        ModelSpecError,
        LossConfigError,
        CheckpointError,
        BundleError,
    ) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
