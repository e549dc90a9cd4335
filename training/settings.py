"""The options of `clip-distill` and its commands, one typed class each (see
clipserve/contract/cli_settings.py), all under the tool's one prefix CLIP_DISTILL_: a field
`batch_size` is the flag `--batch-size`, the key `batch_size` (or `batch-size`) of a `--config` file
and the environment variable CLIP_DISTILL_BATCH_SIZE, for every command that has it.

A name that several commands share is one variable for all of them, so it means the same in each:
the teacher, the dataset, the device, the templates. Where a meaning differs, so does the name: the
training run goes to `--out`, `targets` writes to `--targets-dir`, `eval` to `--report-dir`, and the
data `eval` measures on is `--eval-data`, as for the evaluation during training.

The training hyper-parameters are defined once, here: `LoopOptions` (the loop's: steps, batch size,
learning rate, schedule ...) and `LossOptions` (the objective's temperatures and choices). The
loop's `TrainConfig` (train.py), the objective's `LossSettings` (objective.py) and `TrainSettings`
build on them; nothing here needs torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import SettingsConfigDict

from clipserve.contract.cli_settings import CliSettings, CommaList

ENV_PREFIX = "CLIP_DISTILL_"
TEACHER_HELP = "open_clip name, run folder of ours, or several comma-separated (an ensemble)"
TEACHER_PRETRAINED_HELP = "tag, checkpoint file or 'none': one for every teacher, or one per teacher"
TEMPLATES_HELP = "file with one prompt template per line ('a photo of a {}.'); none: the shapes templates"
CLASS_NAMES_HELP = "file with one class name per line; none: the dataset's classes"
ON_BAD_IMAGE_HELP = "an image that cannot be read is skipped, or stops the run"


class LoopOptions(BaseModel):
    """The training loop's hyper-parameters: what `clip-distill` takes as flags and the loop as its
    `TrainConfig`."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(100, ge=1, description="optimizer steps")
    batch_size: int = Field(64, ge=1, description="samples per optimizer step")
    lr: float = Field(5e-4, gt=0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay")
    warmup_steps: int = Field(10, ge=0, description="linear warmup, then cosine decay")
    grad_clip: float = Field(1.0, ge=0, description="max gradient norm; 0 disables")
    accumulation: int = Field(1, ge=1, description="micro-batches per optimizer step")
    seed: int = Field(0, description="initialisation and batch order")
    device: str = Field("cpu", description="cpu, cuda, cuda:1 ...")
    amp: bool = Field(True, description="mixed precision on GPU")
    augment: bool = Field(False, description="seeded random crops and flips")
    num_workers: int = Field(0, ge=0, description="data loader processes")
    unlabeled_batch_size: int | None = Field(
        None, ge=1, description="unlabeled images per optimizer step; none: half of --batch-size"
    )
    lock_text: bool = Field(
        False,
        description="keep the student's text tower as it starts (LiT's locked tower; with --init inherit "
        "the teacher's): only the image tower and the temperature learn",
    )
    checkpoint_every: int = Field(0, ge=0, description="steps between checkpoints (always one at the end)")
    eval_every: int = Field(0, ge=0, description="steps between zero-shot evaluations; 0: at the end only")
    stop_at: int | None = Field(None, ge=1, description="stop (with a checkpoint) at this step; resume later")
    progress: bool = Field(True, description="progress bar")


class LossOptions(BaseModel):
    """The objective's hyper-parameters besides the weights of the losses (`--losses`, parsed into the
    objective's `LossSettings.weights`)."""

    model_config = ConfigDict(extra="forbid")

    student_temperature: float | None = Field(
        None, gt=0, description="fixed student temperature for logit KD"
    )
    teacher_temperature: float | None = Field(
        None, gt=0, description="fixed teacher temperature for logit KD"
    )
    fixed_temperature: float | None = Field(
        None, gt=0, description="freeze the student's CLIP temperature at this value"
    )
    feature_kind: Literal["mse", "cosine"] = Field("mse", description="feature distillation distance")
    class_kd_temperature: float = Field(1.0, gt=0, description="temperature of class-vector KD")
    projection: bool = Field(
        True, description="a learned linear map where the student's embed dim differs from a teacher's"
    )
    label_head: bool = Field(False, description="DHO-style labelled head for class_kd")


class DistillSettings(CliSettings):
    """Base of the settings of every `clip-distill` command: the tool's one prefix."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX)


class TrainSources(BaseModel):
    """What a training run starts from: its options file, the models and the data."""

    config: Path | None = Field(
        None, description="YAML or JSON file of these options; the environment and flags override it"
    )
    # Models
    teacher: CommaList[str] = Field(default_factory=list, description=TEACHER_HELP)
    teacher_pretrained: CommaList[str] = Field(default_factory=list, description=TEACHER_PRETRAINED_HELP)
    student: str = Field(description="open_clip name or JSON config (embed_dim, vision, text)")
    student_pretrained: str | None = Field(None, description="tag or checkpoint for the student's start")
    init: Literal["random", "inherit"] = Field(
        "random", description="inherit: weight inheritance from the teacher (or --inherit-from)"
    )
    inherit_from: str | None = Field(
        None, description="model to inherit weights from; none: the first teacher"
    )
    # Data
    data: str = Field(description="synthetic:shapes, captions .csv/.tsv/.jsonl, tar shards, or class folders")
    eval_data: str | None = Field(
        None, description="class folders for zero-shot evaluation (synthetic data has its own)"
    )
    unlabeled_data: str | None = Field(
        None,
        description="images whose captions are not used, for the image-side distillation losses (class_kd, "
        "feature): they learn from these images instead of the captioned ones (PromptKD's unlabeled "
        "transfer set); any dataset spec",
    )
    unlabeled_targets: Path | None = Field(
        None,
        description="stored teacher targets of --unlabeled-data (clip-distill targets); none: the --teacher",
    )
    on_bad_image: Literal["skip", "fail"] = Field("skip", description=ON_BAD_IMAGE_HELP)
    teacher_targets: Path | None = Field(
        None, description="folder written by `clip-distill targets`: no teacher in the loop"
    )


# --help lists the fields of the bases from the last to the first, then the class's own: the sources,
# the loop, the losses, then where the run goes.
class TrainSettings(DistillSettings, LossOptions, LoopOptions, TrainSources):
    """`clip-distill` (or `clip-distill train`): distill a teacher into a student, or train one alone."""

    options_file: ClassVar[str | None] = "config"

    out: Path = Field(
        Path("runs/distill"), description="run folder: checkpoints, metrics.jsonl, curves.png, final/"
    )
    torch_threads: int | None = Field(None, ge=1, description="torch CPU threads; none: torch's choice")
    losses: str | None = Field(
        None,
        description="e.g. clip=1,logit_kd=1,feature=0.5,icl=1,class_kd=1; none: clip=1,logit_kd=1 with a "
        "teacher, clip alone without",
    )
    class_names: Path | None = Field(None, description=f"for class_kd: {CLASS_NAMES_HELP}")
    templates: Path | None = Field(None, description=TEMPLATES_HELP)
    evaluate: bool = Field(True, description="zero-shot evaluation (synthetic data or --eval-data)")
    resume: str | None = Field(None, description="checkpoint path, or 'auto' for the latest in --out")
    models_dir: Path | None = Field(
        None,
        description="model repository to publish the final student to (needs --name); none: not published",
    )
    name: str | None = Field(None, description="model name in the repository")
    int8: bool = Field(False, description="also publish int8 image/text graphs")

    def loop(self) -> dict:
        """The loop's options, for `TrainConfig`."""
        return self.model_dump(include=set(LoopOptions.model_fields))

    def loss_options(self) -> dict:
        """The objective's options but its weights, for `LossSettings`."""
        return self.model_dump(include=set(LossOptions.model_fields))


class EvalSettings(DistillSettings):
    """`clip-distill eval`: a student (and a teacher beside it) on zero-shot or retrieval, with its
    parameters, GFLOPs and the ONNX Runtime latency of the graphs export/ makes of it."""

    model: str = Field(description="the student: run folder, open_clip name or JSON config")
    pretrained: str | None = Field(None, description="the student's tag or checkpoint")
    teacher: str | None = Field(None, description="a model evaluated beside the student")
    teacher_pretrained: str | None = Field(None, description="the teacher's tag or checkpoint")
    eval_data: str = Field(description="synthetic:shapes, class folders, or a captions file")
    templates: Path | None = Field(None, description=TEMPLATES_HELP)
    report_dir: Path = Field(description="folder for report.json and report.md")
    latency: bool = Field(True, description="time each tower's exported ONNX graph")


class TargetsSettings(DistillSettings):
    """`clip-distill targets`: store a teacher's embeddings of a dataset, to train without the teacher."""

    teacher: CommaList[str] = Field(min_length=1, description=TEACHER_HELP)
    teacher_pretrained: CommaList[str] = Field(default_factory=list, description=TEACHER_PRETRAINED_HELP)
    data: str = Field(description="the dataset, as for training")
    targets_dir: Path = Field(
        description="folder for the stored targets (what training reads as --teacher-targets or "
        "--unlabeled-targets)"
    )
    views: int = Field(4, ge=1, description="augmented views per image (view 0 is the whole image)")
    augment: bool = Field(True, description="augmented views; off: every view is the whole image")
    seed: int = Field(0, description="seed of the augmentations")
    class_names: Path | None = Field(None, description=f"also store class vectors: {CLASS_NAMES_HELP}")
    templates: Path | None = Field(None, description=TEMPLATES_HELP)
    on_bad_image: Literal["skip", "fail"] = Field("skip", description=ON_BAD_IMAGE_HELP)
    device: str = Field("cpu", description="cpu, cuda, cuda:1 ...")
    batch_size: int = Field(128, ge=1, description="images per teacher call")
