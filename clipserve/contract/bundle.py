"""The model-bundle contract: manifest schema, repository layout, atomic publish, verified load.

This module is shared by `export/`, `training/` and `service/`. It must stay light: it imports
neither torch nor onnx (a test proves it), only the standard library and pydantic.

Layout of a model repository::

    <repo>/<name>/<version>/manifest.json
    <repo>/<name>/<version>/image.onnx, text.onnx, tokenizer files, optional variants
    <repo>/<name>/.staging-<id>/   (work in progress of a publisher; never read by a loader)

A version is an integer >= 1, immutable once published. Publishing writes into a staging
directory, fsyncs every file and the directory, then renames it to the next free version under
an exclusive lock, so concurrent publishers never clash and a reader never sees half a bundle.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from clipserve.contract.scoring import Scoring, ScoringKind

# 2: Hugging Face tokenizers (TokenizerSpec kind "hf"), more text poolings. 3: the fused ops each
# graph carries (BundleFile.fusions), and task models (`Manifest.task`): an image graph that ends in
# class probabilities over a fixed label set, no text tower. Older manifests still load, with the
# same content hash.
FORMAT_VERSION = 3
TASK_FORMAT_VERSION = 3
# The outputs of a task model's image graph, in order: the heads mixed (what the service answers
# with), the labeled (cross-entropy) head and the teacher-distilled (KD) head; each [batch, labels].
TASK_OUTPUTS = ("probabilities", "ce_probabilities", "kd_probabilities")
MANIFEST_FILE = "manifest.json"
STAGING_PREFIX = ".staging-"
LOCK_FILE = ".publish.lock"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_HASH_CHUNK = 1 << 20

Precision = Literal["fp32", "fp16", "int8"]
Tower = Literal["image", "text"]


class BundleError(Exception):
    """Any problem with a bundle or a model repository; the message is meant for a person."""


class BundleNotFoundError(BundleError):
    pass


class BundleIntegrityError(BundleError):
    """A bundle file is missing or does not match the sha256 in its manifest."""


class VersionExistsError(BundleError):
    pass


class RepositoryNotWritableError(BundleError):
    pass


def inside_bundle(value: str) -> str:
    """A file name a manifest may give: relative, inside the bundle, not the manifest itself."""
    parts = Path(value).parts
    if not parts or value.startswith("/") or ".." in parts or value == MANIFEST_FILE or parts == (".",):
        raise ValueError(f"bundle file path must be relative and inside the bundle: {value!r}")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ImagePreprocess(_Strict):
    """How pixels are prepared for `image.onnx`; read from the model's own preprocess config."""

    size: tuple[int, int] = Field(description="(height, width) fed to the image tower")
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: Literal["bicubic", "bilinear", "nearest"] = "bicubic"
    resize_mode: Literal["shortest", "longest", "squash"] = Field(
        "shortest",
        description="shortest: resize shortest side then center crop; longest: resize longest side "
        "then pad to size with fill_color; squash: resize to size ignoring aspect ratio",
    )
    fill_color: int = 0


TokenizerKind = Literal["clip-bpe", "hf"]
Padding = Literal["longest", "max_length"]
Side = Literal["right", "left"]


class TokenizerSpec(_Strict):
    """What the torch-free tokenizer needs to reproduce the model's token ids exactly.

    `clip-bpe`: CLIP's byte-level BPE (`vocab_file` holds the merges), start/end tokens, rows cut to
    their own length when the text graph is dynamic. `hf` (format 2): a Hugging Face `tokenizer.json`
    run by the `tokenizers` library as open_clip's HFTokenizer runs it: the same cleaning, the file's
    own normalizer, template and special tokens, then truncation and padding to the full context.
    Fields a kind does not use stay None and are left out of the content hash."""

    kind: TokenizerKind = "clip-bpe"
    context_length: int = Field(77, ge=2)
    vocab_file: str = Field(
        description="file in the bundle: the BPE merges (clip-bpe) or tokenizer.json (hf)"
    )
    lowercase: bool = True
    clean: Literal["lower", "whitespace", "canonicalize"] = "lower"
    sot_token_id: int | None = Field(None, description="clip-bpe: the start token")
    eot_token_id: int | None = Field(None, description="clip-bpe: the end token")
    pad_token_id: int = 0
    padding: Padding | None = Field(
        None,
        description="hf: max_length (every row padded to context_length, as the text graph expects); "
        "clip-bpe leaves it None: rows are padded to the batch's longest text when the graph allows",
    )
    padding_side: Side | None = None
    truncation_side: Side | None = None
    vocab_size: int | None = Field(None, ge=1, description="hf: ids in tokenizer.json, added tokens included")
    strip_sep_token_id: int | None = Field(
        None, description="hf: an id replaced by 0 after tokenizing (open_clip's strip_sep_token, CLIPA)"
    )

    @field_validator("vocab_file")
    @classmethod
    def _vocab_inside_bundle(cls, value: str) -> str:
        return inside_bundle(value)

    @model_validator(mode="after")
    def _complete_for_kind(self) -> TokenizerSpec:
        if self.kind == "clip-bpe":
            if self.sot_token_id is None or self.eot_token_id is None:
                raise ValueError("a clip-bpe tokenizer needs sot_token_id and eot_token_id")
        else:
            missing = [
                key
                for key in ("padding", "padding_side", "truncation_side", "vocab_size")
                if getattr(self, key) is None
            ]
            if missing:
                raise ValueError(f"an hf tokenizer needs {', '.join(missing)}")
        return self


class TextGraph(_Strict):
    """Properties of `text.onnx` the service relies on."""

    dynamic_length: bool = Field(
        description="True when the sequence axis is dynamic: a batch may be padded only to its "
        "longest text instead of context_length, giving identical vectors faster",
    )
    pooling: Literal["argmax", "last", "first", "eos", "mean", "max", "cls"] = Field(
        "argmax",
        description="where the text vector is read: argmax (end token, CLIP), last/first/eos position, "
        "or a Hugging Face text model's pooler (mean, max, cls)",
    )


class BundleFile(_Strict):
    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)
    role: Literal["image", "text", "tokenizer", "engine", "other"]
    precision: Precision | None = None
    tower: Tower | None = Field(None, description="for engine files, which tower the engine runs")
    # TensorRT engines only work on the GPU model and TensorRT version that built them.
    gpu: str | None = None
    tensorrt_version: str | None = None
    fusions: dict[str, int] | None = Field(
        None,
        description="graphs (format 3): how many nodes of each fused op type ONNX Runtime runs in it "
        "(MultiHeadAttention, SkipLayerNormalization, LayerNormalization, BiasGelu, ...); none in "
        "bundles exported before fusions were recorded",
    )

    @field_validator("path")
    @classmethod
    def _relative(cls, value: str) -> str:
        return inside_bundle(value)


class ModelSource(_Strict):
    """Where the weights came from."""

    architecture: str
    pretrained: str | None = None
    checkpoint_sha256: str | None = None
    config: dict | None = None
    training_run: str | None = None
    open_clip_version: str | None = None
    tokenizer: str | None = Field(
        None, description="where a Hugging Face tokenizer came from: a hub name or the folder given"
    )


class ParityReport(_Strict):
    """Agreement of one exported graph with the torch model on fixed inputs."""

    tower: Tower
    precision: Precision
    file: str
    inputs: int
    max_abs_diff: float
    min_cosine: float
    mean_cosine: float
    threshold: float
    passed: bool
    runtime: str | None = Field(
        None, description="what ran the graph: onnxruntime-cpu, onnxruntime-cuda, tensorrt"
    )


class TaskSpec(_Strict):
    """What a task model classifies and how it was made: its image graph takes pixels and ends in
    class probabilities over `labels` (TASK_OUTPUTS), DHO-style: a head trained with cross-entropy on
    labeled images and a head distilled from the teacher's class probabilities on unlabeled ones,
    mixed as `mix_weight` * ce + (1 - mix_weight) * kd inside the graph."""

    labels: list[str] = Field(min_length=1)
    templates: list[str] = Field(description="the prompt templates of the teacher's class vectors")
    teacher: str = Field(
        description="the teacher as it was given (a bundle, a run folder, an open_clip name)"
    )
    teacher_source: ModelSource | None = Field(None, description="the teacher's architecture and weights")
    kd_temperature: float = Field(gt=0)
    mix_weight: float = Field(ge=0, le=1, description="weight of the cross-entropy head in the mix")
    mix_weight_from: Literal["held-out", "fixed"] = Field(
        description="held-out: chosen on held-out labeled images; fixed: given (KD alone without labels)"
    )
    labeled_images: int = Field(0, ge=0)
    unlabeled_images: int = Field(0, ge=0)
    held_out_accuracy: dict[str, float] = Field(
        default_factory=dict, description="top-1 on the held-out labeled images: ce, kd, mix, teacher"
    )
    outputs: list[str] = Field(default_factory=lambda: list(TASK_OUTPUTS))

    @field_validator("labels")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        repeated = sorted({label for label in value if value.count(label) > 1})
        if repeated:
            raise ValueError(f"labels must be distinct; repeated: {', '.join(repeated)}")
        return value


class Manifest(_Strict):
    format_version: int = FORMAT_VERSION
    name: str
    version: int = Field(0, ge=0, description="0 until published; then >= 1")
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    embed_dim: int = Field(ge=1)
    logit_scale: float = Field(gt=0, description="exp() already applied")
    logit_bias: float | None = Field(None, description="added to logit_scale * cos by sigmoid scoring")
    scoring: ScoringKind = Field(
        "softmax",
        description="softmax: softmax over the labels of logit_scale * cos (CLIP); sigmoid: "
        "sigmoid(logit_scale * cos + logit_bias) per label (SigLIP)",
    )
    image: ImagePreprocess
    tokenizer: TokenizerSpec | None = Field(None, description="an embedding model's; a task model has none")
    text: TextGraph | None = Field(None, description="an embedding model's; a task model has none")
    files: list[BundleFile] = Field(default_factory=list)
    source: ModelSource
    parity: list[ParityReport] = Field(default_factory=list)
    task: TaskSpec | None = Field(
        None, description="set for a task model (format 3); None: an embedding model"
    )

    @model_validator(mode="after")
    def _kind_complete(self) -> Manifest:
        if self.task is None and (self.tokenizer is None or self.text is None):
            raise ValueError("an embedding model's manifest needs tokenizer and text")
        if self.task is not None and self.format_version < TASK_FORMAT_VERSION:
            raise ValueError(f"a task model's manifest is format {TASK_FORMAT_VERSION} or newer")
        return self

    @property
    def is_task(self) -> bool:
        return self.task is not None

    @field_validator("format_version")
    @classmethod
    def _known_format(cls, value: int) -> int:
        if value > FORMAT_VERSION:
            raise ValueError(
                f"manifest format {value} is newer than this clipserve understands ({FORMAT_VERSION}); upgrade"
            )
        return value

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        validate_name(value)
        return value

    @property
    def scorer(self) -> Scoring:
        """The model's zero-shot scoring rule, as the service and training's evaluation apply it."""
        return Scoring(self.scoring, self.logit_scale, self.logit_bias or 0.0)

    def file(self, role: str, precision: str = "fp32") -> BundleFile | None:
        for entry in self.files:
            if entry.role == role and entry.precision == precision:
                return entry
        return None

    @property
    def content_hash(self) -> str:
        """Identity of the embedding space: changes whenever any weight, preprocessing or tokenizer
        detail changes, and never with the name, version or publish time. Cache keys use it."""
        payload = {
            "embed_dim": self.embed_dim,
            "image": self.image.model_dump(mode="json"),
            # exclude_none: the fields format 2 added are None for clip-bpe, so old hashes hold
            "tokenizer": self.tokenizer.model_dump(mode="json", exclude_none=True)
            if self.tokenizer
            else None,
            "files": sorted((f.path, f.sha256) for f in self.files),
        }
        if self.task is not None:  # the graph's outputs mean these labels, in this order
            payload["labels"] = self.task.labels
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def to_json(self) -> str:
        return self.model_dump_json(indent=2) + "\n"


NAME_RULE = "use letters, digits, '.', '_' or '-' (at most 128), starting with a letter or digit"


def is_valid_name(name: object) -> bool:
    """The one naming rule for models, label sets and collections (safe as a folder or key name)."""
    return isinstance(name, str) and _NAME_RE.match(name) is not None


def validate_name(name: str) -> None:
    if not is_valid_name(name):
        raise BundleError(f"invalid model name {name!r}: {NAME_RULE}")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def describe_file(
    bundle_dir: Path, relpath: str, role: str, precision: str | None = None, **extra
) -> BundleFile:
    """A manifest entry for a file already written in `bundle_dir` (hash and size computed)."""
    path = Path(bundle_dir) / relpath
    return BundleFile(
        path=relpath,
        sha256=sha256_file(path),
        size=path.stat().st_size,
        role=role,
        precision=precision,
        **extra,
    )


class Bundle(BaseModel):
    """A published, loaded bundle: its manifest and where its files are."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    manifest: Manifest
    path: Path

    @property
    def ref(self) -> str:
        return f"{self.manifest.name}@{self.manifest.version}"

    def file_path(self, role: str, precision: str = "fp32") -> Path:
        entry = self.manifest.file(role, precision)
        if entry is None:
            raise BundleNotFoundError(f"{self.ref} has no {precision} {role} file")
        return self.contained(entry.path)

    def contained(self, relpath: str) -> Path:
        """`relpath` in the bundle, refused when it leads outside (a symbolic link out of it)."""
        path = self.path / relpath
        if not path.resolve().is_relative_to(self.path.resolve()):
            raise BundleIntegrityError(f"{self.ref}: file {relpath} leads outside the bundle")
        return path

    def verify(self) -> None:
        """Check that every file the manifest names stays inside the bundle, that the tokenizer's
        file is among the hashed ones, and every listed file against its size and sha256; raise
        naming the first bad file."""
        listed = {entry.path for entry in self.manifest.files}
        vocab = self.manifest.tokenizer.vocab_file if self.manifest.tokenizer else None
        if vocab is not None and vocab not in listed:
            raise BundleIntegrityError(
                f"{self.ref}: the tokenizer's file {vocab} is not among the manifest's files, so "
                "its hash cannot be checked"
            )
        for entry in self.manifest.files:
            path = self.contained(entry.path)
            if not path.is_file():
                raise BundleIntegrityError(f"{self.ref}: file {entry.path} listed in the manifest is missing")
            size = path.stat().st_size
            if size != entry.size:
                raise BundleIntegrityError(
                    f"{self.ref}: file {entry.path} has {size} bytes, the manifest says {entry.size}"
                )
            actual = sha256_file(path)
            if actual != entry.sha256:
                raise BundleIntegrityError(
                    f"{self.ref}: file {entry.path} is corrupted: sha256 {actual[:16]}… does not match "
                    f"the manifest's {entry.sha256[:16]}…"
                )


def read_manifest(bundle_dir: Path) -> Manifest:
    path = Path(bundle_dir) / MANIFEST_FILE
    try:
        raw = path.read_text()
    except FileNotFoundError as exc:
        raise BundleNotFoundError(f"no {MANIFEST_FILE} in {bundle_dir}") from exc
    try:
        return Manifest.model_validate_json(raw)
    except ValidationError as exc:
        raise BundleError(f"invalid manifest {path}: {exc}") from exc


def load_bundle(bundle_dir: Path | str, verify: bool = True) -> Bundle:
    bundle = Bundle(manifest=read_manifest(Path(bundle_dir)), path=Path(bundle_dir))
    if verify:
        bundle.verify()
    return bundle


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for filename in filenames:
            fd = os.open(Path(dirpath) / filename, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


class Staging:
    """A private directory where a bundle is written before it is published."""

    def __init__(self, repository: ModelRepository, name: str, path: Path):
        self.repository = repository
        self.name = name
        self.path = path
        self.published: Bundle | None = None

    def describe(self, relpath: str, role: str, precision: str | None = None, **extra) -> BundleFile:
        return describe_file(self.path, relpath, role, precision, **extra)

    def publish(self, manifest: Manifest, version: int | None = None) -> Bundle:
        self.published = self.repository.publish(self, manifest, version=version)
        return self.published

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


class ModelRepository:
    """A folder of models, each a folder of integer versions."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"ModelRepository({str(self.root)!r})"

    def models(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name
            for p in self.root.iterdir()
            if p.is_dir() and _NAME_RE.match(p.name) and self.versions(p.name)
        )

    def unpublished(self) -> list[tuple[Path, list[str]]]:
        """Folders that look like models (numbered versions) but have no published version: a copy
        gone wrong or a manifest deleted. Staging and hidden folders are left out."""
        if not self.root.is_dir():
            return []
        published = set(self.models())
        found = []
        for path in sorted(self.root.iterdir()):
            if not path.is_dir() or path.name.startswith(".") or path.name in published:
                continue
            versions = sorted((p.name for p in path.iterdir() if p.name.isdigit()), key=int)
            if versions:
                found.append((path, versions))
        return found

    def versions(self, name: str) -> list[int]:
        model_dir = self.root / name
        if not model_dir.is_dir():
            return []
        return sorted(
            int(p.name) for p in model_dir.iterdir() if p.name.isdigit() and (p / MANIFEST_FILE).is_file()
        )

    def latest(self, name: str) -> int:
        versions = self.versions(name)
        if not versions:
            known = ", ".join(self.models()) or "none"
            raise BundleNotFoundError(
                f"no published version of model {name!r} in {self.root} (models: {known})"
            )
        return versions[-1]

    def bundle_dir(self, name: str, version: int | None = None) -> Path:
        return self.root / name / str(self.latest(name) if version is None else version)

    def load(self, name: str, version: int | None = None, verify: bool = True) -> Bundle:
        validate_name(name)
        path = self.bundle_dir(name, version)
        if not (path / MANIFEST_FILE).is_file():
            raise BundleNotFoundError(f"model {name!r} has no version {version} in {self.root}")
        return load_bundle(path, verify=verify)

    def check_writable(self) -> None:
        """Fail early, before any expensive work, when nothing could be published here."""
        probe_dir = self.root
        while not probe_dir.exists():
            probe_dir = probe_dir.parent
        if not probe_dir.is_dir() or not os.access(probe_dir, os.W_OK | os.X_OK):
            raise RepositoryNotWritableError(
                f"model repository {self.root} is not writable (checked {probe_dir})"
            )
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RepositoryNotWritableError(
                f"cannot create model repository {self.root}: {exc.strerror}"
            ) from exc

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[Staging]:
        """Yield a staging directory; it is removed unless `publish` succeeded inside the block."""
        validate_name(name)
        self.check_writable()
        model_dir = self.root / name
        try:
            model_dir.mkdir(parents=True, exist_ok=True)
            path = model_dir / f"{STAGING_PREFIX}{uuid.uuid4().hex}"
            path.mkdir()
        except OSError as exc:
            raise RepositoryNotWritableError(f"cannot write in {model_dir}: {exc.strerror}") from exc
        staging = Staging(self, name, path)
        try:
            yield staging
        finally:
            if staging.published is None:
                staging.discard()

    @contextlib.contextmanager
    def _lock(self, name: str) -> Iterator[None]:
        with open(self.root / name / LOCK_FILE, "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def publish(self, staging: Staging, manifest: Manifest, version: int | None = None) -> Bundle:
        """Write the manifest (with the given file entries), fsync, and rename to a new version.

        `version=None` takes the next free version. An explicit version that exists is refused.
        """
        if manifest.name != staging.name:
            raise BundleError(f"manifest names {manifest.name!r} but the staging is for {staging.name!r}")
        listed = {f.path for f in manifest.files}
        for entry in manifest.files:
            if not (staging.path / entry.path).is_file():
                raise BundleError(f"manifest lists {entry.path} but the staging directory has no such file")
        roles = {f.role for f in manifest.files}
        if manifest.task is not None and "image" not in roles:
            raise BundleError("a task bundle needs an image file in its manifest")
        if manifest.task is None and not {"image", "text"} <= roles:
            raise BundleError("a bundle needs at least an image and a text file in its manifest")
        unlisted = [
            str(p.relative_to(staging.path))
            for p in staging.path.rglob("*")
            if p.is_file() and str(p.relative_to(staging.path)) not in listed and p.name != MANIFEST_FILE
        ]
        if unlisted:
            raise BundleError(f"files in the staging directory are missing from the manifest: {unlisted}")
        model_dir = self.root / staging.name
        with self._lock(staging.name):
            existing = self.versions(staging.name)
            if version is None:
                version = (existing[-1] if existing else 0) + 1
            elif version < 1:
                raise BundleError(f"version must be >= 1, got {version}")
            target = model_dir / str(version)
            if target.exists():
                raise VersionExistsError(
                    f"{staging.name} version {version} already exists in {self.root}; versions are immutable"
                )
            final = manifest.model_copy(update={"version": version})
            (staging.path / MANIFEST_FILE).write_text(final.to_json())
            _fsync_tree(staging.path)
            try:
                os.rename(staging.path, target)
            except OSError as exc:
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    raise VersionExistsError(
                        f"{staging.name} version {version} appeared while publishing"
                    ) from exc
                raise
            _fsync_dir(model_dir)
        return Bundle(manifest=final, path=target)


def parse_model_ref(ref: str) -> tuple[str, int | None]:
    """'name' -> (name, None); 'name@3' -> (name, 3)."""
    name, sep, version = ref.partition("@")
    validate_name(name)
    if not sep:
        return name, None
    if not version.isdigit() or int(version) < 1:
        raise BundleError(f"invalid model reference {ref!r}: expected name or name@version with version >= 1")
    return name, int(version)
