"""Ready-made runs on the synthetic shapes set: a teacher from scratch, a student distilled from it,
and the first-run demo bundle (teacher -> student -> verified, published bundle)."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from clipserve.training import synthetic
from clipserve.training.losses import LossWeights

CONFIG_DIR = Path(__file__).parent / "configs"
# the demo's teacher (quick to train at first run) and the experiment's larger one; both share the
# student's text tower shape, so weight inheritance copies the whole text tower
SHAPES_TEACHER_CONFIG = CONFIG_DIR / "shapes-teacher.json"
SHAPES_LARGE_TEACHER_CONFIG = CONFIG_DIR / "shapes-teacher-large.json"
SHAPES_STUDENT_CONFIG = CONFIG_DIR / "shapes-student.json"
# the distillation experiment's student: the demo student's towers at the teacher's 64 px, so weight
# inheritance carries the image tower's spatial layout (its attention pool) over whole
SHAPES_STUDENT_64PX_CONFIG = CONFIG_DIR / "shapes-student-64px.json"
SHAPES_DATA = "synthetic:shapes"
# the demo student's recipe, from bench/distill_shapes.py: weight inheritance carries the gain over a
# student from scratch (+17 points on the mean of seeds 0 and 1); logit KD on top of it added 2.7
# points on that mean, within the 8-11 point spread between seeds, and needs the teacher's targets
BEST_STUDENT_LOSSES = "clip"
BEST_STUDENT_INIT = "inherit"


@dataclass(frozen=True)
class ShapesBudget:
    steps: int = 400
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 50
    threads: int | None = None
    image_size: int = 64
    seed: int = 0  # initialisation and batch order; the images are the same for every seed

    @property
    def data(self) -> str:
        """One pass over fresh images: every step sees new samples."""
        return f"{SHAPES_DATA}?size={self.steps * self.batch_size}&image_size={self.image_size}"

    def options(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "warmup_steps": self.warmup_steps,
            "torch_threads": self.threads,
            "data": self.data,
            "seed": self.seed,
        }


def teacher_options(
    out: Path, budget: ShapesBudget, progress: bool = True, config: Path = SHAPES_TEACHER_CONFIG
) -> dict[str, Any]:
    """A teacher trained from scratch with the CLIP loss alone."""
    return {**budget.options(), "student": str(config), "out": str(out), "progress": progress}


# ---- the experiment's teacher, built once per machine -------------------------------------------

# bump when training/ changes in a way that changes what a recipe trains (the cache key includes it)
TEACHER_CACHE_VERSION = 2
TEACHER_CACHE_ROOT = Path("runs/teachers")


@dataclass(frozen=True)
class TeacherRecipe(ShapesBudget):
    """The distillation experiment's teacher: the large shapes config, trained with the CLIP loss for
    several times the students' budget, until its held-out accuracy stops rising (see its build.json,
    which records the curve). Threads are pinned: the result is deterministic for a recipe on one
    machine; another CPU's kernels may round differently. A budget of its own (the same fields, its
    own values), plus the config and the evaluation during the build."""

    steps: int = 2000
    warmup_steps: int = 100
    threads: int | None = 1
    config: Path = SHAPES_LARGE_TEACHER_CONFIG
    eval_every: int = 400
    eval_size: int = 600

    def budget(self) -> ShapesBudget:
        return ShapesBudget(**{f.name: getattr(self, f.name) for f in fields(ShapesBudget)})

    def key(self) -> str:
        """A hash of everything that decides the weights: the recipe, the config's content, the version."""
        recipe = {k: v for k, v in asdict(self).items() if k != "config"}
        blob = json.dumps(
            {
                "recipe": recipe,
                "config": json.loads(Path(self.config).read_text()),
                "version": TEACHER_CACHE_VERSION,
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def directory(self, root: Path = TEACHER_CACHE_ROOT) -> Path:
        return Path(root) / f"shapes-teacher-{self.key()}"


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cached_teacher(
    recipe: TeacherRecipe | None = None,
    root: Path = TEACHER_CACHE_ROOT,
    progress: bool = True,
    log=print,
) -> tuple[Path, dict[str, Any]]:
    """The teacher's run folder and its build record, trained now if this machine has none for the
    recipe. The build goes to a scratch folder that is renamed into place when complete, so an
    interrupted build is started again rather than used."""
    import fcntl

    recipe = recipe or TeacherRecipe()
    target = recipe.directory(root)
    record_path = target / "build.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    # one build per recipe at a time: a second caller waits for the first build, then uses it
    with open(target.with_name(target.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if record_path.is_file() and (target / "final").is_dir():
            return target, json.loads(record_path.read_text())
        return _build_teacher(recipe, target, progress, log)


def _build_teacher(recipe: TeacherRecipe, target: Path, progress: bool, log) -> tuple[Path, dict[str, Any]]:
    from clipserve.training.cli import run_training, shapes_evaluator
    from clipserve.training.models import load_clip

    log(
        f"building the teacher once for this machine ({recipe.steps} steps x {recipe.batch_size} on "
        f"{recipe.threads} threads; cached in {target})"
    )
    scratch = target.with_name(target.name + f".building-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    wall, cpu = time.perf_counter(), _cpu_seconds()
    result = run_training(
        {
            **teacher_options(scratch, recipe.budget(), progress=progress, config=recipe.config),
            "eval_every": recipe.eval_every,
            "evaluate": True,
        }
    )
    wall, cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
    curve = [
        {"step": r["step"], **r["eval"]}
        for r in (json.loads(line) for line in (scratch / "metrics.jsonl").read_text().splitlines())
        if "eval" in r
    ]
    final = shapes_evaluator(recipe.budget().data, size=recipe.eval_size)(load_clip(str(scratch)))
    record = {
        "key": recipe.key(),
        "recipe": {**asdict(recipe), "config": str(recipe.config)},
        "run_id": result.run_id,
        "build_seconds": {"wall": round(wall, 1), "process_cpu": round(cpu, 1)},
        # the curve on the training loop's 300 held-out images, the final figure on the benchmark's
        "held_out_curve": curve,
        "held_out": final,
    }
    (scratch / "build.json").write_text(json.dumps(record, indent=2) + "\n")
    if target.exists():
        shutil.rmtree(target)
    os.replace(scratch, target)
    log(f"teacher built in {wall:.0f} s wall, {cpu:.0f} s CPU: held-out top-1 {final['top1']:.3f}")
    return target, record


def student_options(
    out: Path,
    budget: ShapesBudget,
    teacher_dir: Path | None = None,
    teacher_targets: Path | None = None,
    losses: str = BEST_STUDENT_LOSSES,
    init: str = BEST_STUDENT_INIT,
    progress: bool = True,
    config: Path = SHAPES_STUDENT_CONFIG,
) -> dict[str, Any]:
    options = {
        **budget.options(),
        "student": str(config),
        "out": str(out),
        "losses": losses,
        "init": init,
        "progress": progress,
    }
    needs_teacher = LossWeights.parse(losses).needs_teacher
    if needs_teacher and teacher_targets is not None:
        options["teacher_targets"] = str(teacher_targets)
    elif needs_teacher and teacher_dir is not None:
        options["teacher"] = str(teacher_dir)
    if init == "inherit" and teacher_dir is not None:
        options["inherit_from"] = str(teacher_dir)
    return options


def classify_with_bundle(bundle_dir: Path, image, labels: list[str]) -> list[tuple[str, float]]:
    """Zero-shot classify one PIL image with a published bundle through ONNX Runtime, best first."""
    import onnxruntime as ort
    import open_clip

    from clipserve.contract.bundle import load_bundle
    from clipserve.contract.scoring import class_vectors, prompts, top_k
    from clipserve.contract.tokenizer import load_tokenizer

    bundle = load_bundle(bundle_dir)
    manifest = bundle.manifest
    pre = manifest.image
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    image_session = ort.InferenceSession(
        str(bundle.file_path("image")), options, providers=["CPUExecutionProvider"]
    )
    text_session = ort.InferenceSession(
        str(bundle.file_path("text")), options, providers=["CPUExecutionProvider"]
    )
    cfg = open_clip.transform.PreprocessCfg(
        size=pre.size,
        mean=pre.mean,
        std=pre.std,
        interpolation=pre.interpolation,
        resize_mode=pre.resize_mode,
    )
    pixels = open_clip.transform.image_transform_v2(cfg, is_train=False)(image).unsqueeze(0).numpy()
    image_embed = image_session.run(None, {image_session.get_inputs()[0].name: pixels})[0][0]
    tokenizer = load_tokenizer(manifest.tokenizer, bundle.path)
    templates = synthetic.CLASS_TEMPLATES
    ids = tokenizer.encode(prompts(labels, templates)).ids
    embeds = text_session.run(None, {text_session.get_inputs()[0].name: ids})[0]
    scores = manifest.scorer.probabilities(class_vectors(embeds, len(templates)) @ image_embed)
    return [(labels[i], float(scores[i])) for i in top_k(scores, len(labels))[0]]


def build_demo_bundle(
    repo: Path | str,
    name: str = "shapes-demo",
    progress: bool = True,
    work_dir: Path | str | None = None,
    budget: ShapesBudget | None = None,
    verify: bool | None = None,
):
    """Train a teacher on the shapes set, distill the student from it, publish it to `repo` as `name`
    (a new version, verified by the exporter), and classify a red circle with the published bundle.

    `verify`: raise unless the red circle is classified as one. By default this is checked for the
    full recipe (`budget=None`) and only printed for a shortened budget, which is too short to learn.
    Returns the published `clipserve.contract.bundle.Bundle`."""
    from clipserve.training.cli import publish, run_training
    from clipserve.training.models import load_clip

    verify = budget is None if verify is None else verify
    budget = budget or ShapesBudget()
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        teacher_run = run_training(teacher_options(Path(tmp) / "teacher", budget, progress))
        student_run = run_training(
            student_options(Path(tmp) / "student", budget, teacher_dir=teacher_run.out_dir, progress=progress)
        )
        student = load_clip(str(student_run.final_dir))
        bundle = publish(student, student_run, repo, name)
    labels = [f"{c} {s}" for c, s in synthetic.all_compositions()]
    ranked = classify_with_bundle(bundle.path, synthetic.draw_single("red", "circle"), labels)
    print("demo check, a red circle: " + ", ".join(f"{label} {p:.2f}" for label, p in ranked[:3]))
    if verify and ranked[0][0] != "red circle":
        raise RuntimeError(
            f"demo bundle {bundle.ref} calls a red circle {ranked[0][0]!r}: training went wrong"
        )
    return bundle
