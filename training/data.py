"""Datasets for distillation: image-text pairs from CSV/TSV, JSONL, webdataset-layout tar shards,
class folders and the synthetic shapes set; deterministic batch order with a resumable position;
collation that prepares each distinct preprocessing and tokenizer once per batch."""

from __future__ import annotations

import csv
import glob
import io
import json
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import parse_qsl

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from clipserve.contract.scoring import fill_template
from clipserve.training import synthetic

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
IMAGE_COLUMNS = ("filepath", "path", "image", "file", "filename", "image_path")
CAPTION_COLUMNS = ("caption", "title", "text")
BadImagePolicy = Literal["skip", "fail"]


class DataError(ValueError):
    """A dataset that cannot be used as given; the message names the file or entry at fault."""


class Source(Protocol):
    """Random access to raw samples: a PIL image, its caption, and a class label (-1 when none)."""

    def __len__(self) -> int: ...

    def load(self, index: int) -> tuple[Image.Image, str, int]: ...

    def describe(self, index: int) -> str: ...


@dataclass
class BadImages:
    problems: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.problems)

    def summary(self, limit: int = 20) -> str:
        lines = [f"  {where}: {why}" for where, why in self.problems[:limit]]
        more = len(self.problems) - limit
        if more > 0:
            lines.append(f"  ... and {more} more")
        return "\n".join(lines)


def _open_image(data: bytes | Path) -> Image.Image:
    image = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
    image.load()
    return image.convert("RGB")


class FileListSource:
    """(image path, caption) records read from a CSV/TSV or JSONL file; paths relative to that file."""

    def __init__(self, records: list[tuple[Path, str]], origin: str):
        self.records = records
        self.origin = origin

    def __len__(self) -> int:
        return len(self.records)

    def load(self, index: int) -> tuple[Image.Image, str, int]:
        path, caption = self.records[index]
        return _open_image(path), caption, -1

    def describe(self, index: int) -> str:
        return str(self.records[index][0])


def _pick_column(
    names: Sequence[str], wanted: str | None, candidates: Sequence[str], what: str, origin: str
) -> str:
    if wanted:
        if wanted not in names:
            raise DataError(f"{origin}: no {what} column {wanted!r}; columns are {list(names)}")
        return wanted
    for name in candidates:
        if name in names:
            return name
    raise DataError(f"{origin}: no {what} column; name one of {list(candidates)} (columns are {list(names)})")


def read_caption_table(
    path: Path, image_column: str | None = None, caption_column: str | None = None
) -> FileListSource:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter)
        names = reader.fieldnames or []
        image_key = _pick_column(names, image_column, IMAGE_COLUMNS, "image path", str(path))
        caption_key = _pick_column(names, caption_column, CAPTION_COLUMNS, "caption", str(path))
        records = [(path.parent / row[image_key], row[caption_key] or "") for row in reader]
    return FileListSource(records, str(path))


def read_jsonl(
    path: Path, image_column: str | None = None, caption_column: str | None = None
) -> FileListSource:
    records = []
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from exc
            image_key = _pick_column(
                list(row), image_column, IMAGE_COLUMNS, "image path", f"{path}:{line_no}"
            )
            caption_key = _pick_column(
                list(row), caption_column, CAPTION_COLUMNS, "caption", f"{path}:{line_no}"
            )
            records.append((path.parent / row[image_key], str(row[caption_key])))
    return FileListSource(records, str(path))


class TarShardSource:
    """Webdataset layout: in each tar, files sharing a key (`dir/000123.jpg`, `dir/000123.txt`) form one sample."""

    def __init__(self, shards: list[Path]):
        self.shards = shards
        self.samples: list[tuple[int, str | None, str, str]] = []  # shard, image member, caption, key
        for shard_no, shard in enumerate(shards):
            self._index(shard_no, shard)
        self._handles: dict[int, tarfile.TarFile] = {}

    def _index(self, shard_no: int, shard: Path) -> None:
        groups: dict[str, dict[str, tarfile.TarInfo]] = {}
        try:
            with tarfile.open(shard) as tar:
                for member in tar.getmembers():
                    if not member.isfile():
                        continue
                    name = member.name
                    stem, _, ext = name.rpartition("/")[2].partition(".")
                    key = f"{name.rpartition('/')[0]}/{stem}"
                    groups.setdefault(key, {})[ext.lower()] = member
                for key, files in groups.items():
                    caption = self._caption(tar, files)
                    if caption is None:
                        continue
                    image = next((files[e].name for e in ("jpg", "jpeg", "png", "webp") if e in files), None)
                    self.samples.append((shard_no, image, caption, key))
        except (tarfile.TarError, OSError) as exc:
            raise DataError(f"cannot read tar shard {shard}: {exc}") from exc

    @staticmethod
    def _caption(tar: tarfile.TarFile, files: dict[str, tarfile.TarInfo]) -> str | None:
        if "txt" in files:
            return tar.extractfile(files["txt"]).read().decode("utf-8").strip()
        if "json" in files:
            meta = json.loads(tar.extractfile(files["json"]).read())
            return next((str(meta[k]) for k in CAPTION_COLUMNS if k in meta), None)
        return None

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[Image.Image, str, int]:
        shard_no, member, caption, key = self.samples[index]
        if member is None:
            raise FileNotFoundError(f"no image for key {key}")
        tar = self._handles.get(shard_no)
        if tar is None:
            # kept open for the dataset's life: reopening a shard per sample would re-read its index
            tar = self._handles[shard_no] = tarfile.open(self.shards[shard_no])  # noqa: SIM115
        return _open_image(tar.extractfile(member).read()), caption, -1

    def describe(self, index: int) -> str:
        shard_no, member, _, key = self.samples[index]
        return f"{self.shards[shard_no]}:{member or key}"

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state


class ImageFilesSource:
    """A folder of image files, no captions and no classes: unlabeled images (`--unlabeled-data`)."""

    captioned = False

    def __init__(self, root: Path):
        self.root = root
        self.paths = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> tuple[Image.Image, str, int]:
        return _open_image(self.paths[index]), "", -1

    def describe(self, index: int) -> str:
        return str(self.paths[index])


class ImageFolderSource:
    """One subfolder per class; the caption is `template` filled with the class name."""

    def __init__(self, root: Path, template: str = "a photo of a {}."):
        self.root = root
        folders = sorted(p for p in root.iterdir() if p.is_dir())
        self.classes = [p.name.replace("_", " ") for p in folders]
        self.template = template
        self.items = [
            (path, label)
            for label, folder in enumerate(folders)
            for path in sorted(folder.iterdir())
            if path.suffix.lower() in IMAGE_EXTENSIONS
        ]

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int) -> tuple[Image.Image, str, int]:
        path, label = self.items[index]
        return _open_image(path), fill_template(self.template, self.classes[label]), label

    def describe(self, index: int) -> str:
        return str(self.items[index][0])


class ShapesSource:
    def __init__(self, config: synthetic.ShapesConfig, size: int | None = None):
        self.pairs = synthetic.ShapesPairs(config, size)
        self.classes = [f"{c} {s}" for c, s in synthetic.all_compositions()]

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> tuple[Image.Image, str, int]:
        image, caption = self.pairs[index]
        return image, caption, -1

    def describe(self, index: int) -> str:
        return f"shapes[{index}]"


def shapes_config_from_spec(spec: str) -> tuple[synthetic.ShapesConfig, int | None]:
    """'synthetic:shapes' or 'synthetic:shapes?size=2000&image_size=64&seed=1'; `held_out=none` draws
    every composition, the held-out ones too (unlabeled transfer images for distillation)."""
    name, _, query = spec.removeprefix("synthetic:").partition("?")
    if name != "shapes":
        raise DataError(f"unknown synthetic dataset {name!r}; available: synthetic:shapes")
    options = dict(parse_qsl(query))
    unknown = set(options) - {"size", "image_size", "seed", "max_objects", "held_out"}
    if unknown:
        raise DataError(
            f"unknown synthetic:shapes option(s) {sorted(unknown)}; use size, image_size, seed, max_objects, "
            "held_out"
        )
    held_out = options.get("held_out", "default")
    if held_out not in ("default", "none"):
        raise DataError(f"synthetic:shapes held_out={held_out!r}: use default or none")
    config = synthetic.ShapesConfig(
        image_size=int(options.get("image_size", 64)),
        seed=int(options.get("seed", 0)),
        max_objects=int(options.get("max_objects", 3)),
        **({"held_out": ()} if held_out == "none" else {}),
    )
    return config, int(options["size"]) if "size" in options else None


def _tar_shards(spec: str) -> list[Path]:
    path = Path(spec)
    if path.is_dir():
        return sorted(path.glob("*.tar"))
    return sorted(Path(p) for p in glob.glob(spec))


def open_source(spec: str, image_column: str | None = None, caption_column: str | None = None) -> Source:
    """Pick the reader from the spec: synthetic:shapes, *.csv/*.tsv, *.jsonl, tar shards, class folders."""
    if spec.startswith("synthetic:"):
        config, size = shapes_config_from_spec(spec)
        return ShapesSource(config, size)
    path = Path(spec)
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv", ".jsonl") and not path.is_file():
        raise DataError(f"caption file {spec} does not exist")
    if suffix in (".csv", ".tsv"):
        return read_caption_table(path, image_column, caption_column)
    if suffix == ".jsonl":
        return read_jsonl(path, image_column, caption_column)
    shards = _tar_shards(spec)
    if shards:
        return TarShardSource(shards)
    if path.is_dir() and any(p.is_dir() for p in path.iterdir()):
        return ImageFolderSource(path)
    if path.is_dir() and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.iterdir()):
        return ImageFilesSource(path)
    raise DataError(
        f"cannot read dataset {spec!r}: expected synthetic:shapes, a .csv/.tsv/.jsonl caption file, "
        "tar shards (a folder or glob of .tar), a folder with one subfolder per class, or a folder of "
        "images (unlabeled)"
    )


def find_bad_images(source: Source) -> BadImages:
    bad = BadImages()
    for index in range(len(source)):
        try:
            source.load(index)
        except FileNotFoundError:
            bad.problems.append((source.describe(index), "missing"))
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            bad.problems.append((source.describe(index), f"corrupt ({type(exc).__name__})"))
    return bad


@dataclass
class Sample:
    image: Image.Image
    caption: str
    label: int
    index: int  # in the source, so that stored teacher targets and augmentations stay attached to it
    epoch: int


class PairDataset(torch.utils.data.Dataset):
    """The usable samples of a source, after the bad-image check."""

    def __init__(self, source: Source, indices: list[int] | None = None):
        self.source = source
        self.indices = list(range(len(source))) if indices is None else indices
        if not self.indices:
            raise DataError(
                f"dataset {getattr(source, 'origin', type(source).__name__)} has no usable samples"
            )

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def captioned(self) -> bool:
        """Whether its samples come with captions (a folder of images has none)."""
        return getattr(self.source, "captioned", True)

    def __getitem__(self, item: int | tuple[int, int]) -> Sample:
        """`item` is a position, or (position, epoch) as the StepSampler yields them."""
        position, epoch = item if isinstance(item, tuple) else (item, 0)
        source_index = self.indices[position]
        image, caption, label = self.source.load(source_index)
        return Sample(image, caption, label, source_index, epoch)

    @property
    def classes(self) -> list[str] | None:
        return getattr(self.source, "classes", None)


def build_dataset(
    spec: str,
    on_bad_image: BadImagePolicy = "skip",
    log: Callable[[str], None] = print,
    image_column: str | None = None,
    caption_column: str | None = None,
) -> PairDataset:
    source = open_source(spec, image_column, caption_column)
    if len(source) == 0:
        raise DataError(f"dataset {spec} is empty")
    if isinstance(source, ShapesSource):
        log(f"data {spec}: {len(source)} samples (generated), 0 bad images")
        return PairDataset(source)
    bad = find_bad_images(source)
    log(f"data {spec}: {len(source)} samples, {len(bad)} bad images ({on_bad_image})")
    if bad and on_bad_image == "fail":
        raise DataError(
            f"{len(bad)} of {len(source)} images in {spec} are missing or corrupt:\n{bad.summary()}"
        )
    bad_where = {where for where, _ in bad.problems}
    usable = [i for i in range(len(source)) if source.describe(i) not in bad_where]
    if not usable:
        raise DataError(f"every image in {spec} is missing or corrupt:\n{bad.summary()}")
    return PairDataset(source, usable)


# ---- augmentation with recorded parameters ------------------------------------------------------


@dataclass(frozen=True)
class AugmentParams:
    """A crop as fractions of the image (top, left, height, width) and a horizontal flip."""

    top: float = 0.0
    left: float = 0.0
    height: float = 1.0
    width: float = 1.0
    flip: bool = False

    def as_list(self) -> list[float]:
        return [self.top, self.left, self.height, self.width, float(self.flip)]

    @classmethod
    def from_list(cls, values: Sequence[float]) -> AugmentParams:
        return cls(
            float(values[0]), float(values[1]), float(values[2]), float(values[3]), bool(values[4] > 0.5)
        )

    def apply(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        box = (
            round(self.left * w),
            round(self.top * h),
            round((self.left + self.width) * w),
            round((self.top + self.height) * h),
        )
        if box != (0, 0, w, h):
            image = image.crop(box)
        return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if self.flip else image


def sample_augment(
    seed: int, epoch: int, index: int, min_scale: float = 0.6, flip: bool = True
) -> AugmentParams:
    """Seeded by (seed, epoch, index): the same sample gets the same crop in every process and on resume."""
    rng = np.random.default_rng([seed, epoch, index, 7])
    scale = float(rng.uniform(min_scale, 1.0))
    side = scale**0.5
    return AugmentParams(
        top=float(rng.uniform(0, 1 - side)),
        left=float(rng.uniform(0, 1 - side)),
        height=side,
        width=side,
        flip=bool(flip and rng.random() < 0.5),
    )


# ---- batches ------------------------------------------------------------------------------------


@dataclass
class Batch:
    images: dict[str, torch.Tensor]
    tokens: dict[str, torch.Tensor]
    labels: torch.Tensor
    indices: torch.Tensor
    targets: dict[str, torch.Tensor] | None = None

    def to(self, device: torch.device) -> Batch:
        move = lambda d: {k: v.to(device, non_blocking=True) for k, v in d.items()}  # noqa: E731
        return Batch(
            move(self.images),
            move(self.tokens),
            self.labels.to(device),
            self.indices.to(device),
            None if self.targets is None else move(self.targets),
        )

    def __len__(self) -> int:
        return int(self.labels.shape[0])


class TargetLookup(Protocol):
    """Stored teacher outputs (see clipserve.training.targets): which stored view a sample uses in an epoch."""

    def choose(self, index: int, epoch: int) -> int: ...

    def params(self, index: int, view: int) -> AugmentParams: ...

    def gather(self, indices: list[int], views: list[int]) -> dict[str, torch.Tensor]: ...


class Collator:
    """Turns samples into model inputs: each distinct image preprocessing and tokenizer runs once.
    Augmentation parameters come from `augment(index, epoch)`, or from stored teacher targets."""

    def __init__(
        self,
        image_transforms: dict[str, Callable[[Image.Image], torch.Tensor]],
        tokenizers: dict[str, Callable[[list[str]], torch.Tensor]],
        augment: Callable[[int, int], AugmentParams] | None = None,
        targets: TargetLookup | None = None,
    ):
        self.image_transforms = image_transforms
        self.tokenizers = tokenizers
        self.augment = augment
        self.targets = targets

    def _augmented(self, samples: list[Sample]) -> tuple[list[Image.Image], dict[str, torch.Tensor] | None]:
        if self.targets is not None:
            views = [self.targets.choose(s.index, s.epoch) for s in samples]
            images = [
                self.targets.params(s.index, v).apply(s.image) for s, v in zip(samples, views, strict=True)
            ]
            return images, self.targets.gather([s.index for s in samples], views)
        if self.augment is not None:
            return [self.augment(s.index, s.epoch).apply(s.image) for s in samples], None
        return [s.image for s in samples], None

    def __call__(self, samples: list[Sample]) -> Batch:
        images, targets = self._augmented(samples)
        captions = [s.caption for s in samples]
        return Batch(
            images={key: torch.stack([t(img) for img in images]) for key, t in self.image_transforms.items()},
            tokens={key: tok(captions) for key, tok in self.tokenizers.items()},
            labels=torch.tensor([s.label for s in samples], dtype=torch.long),
            indices=torch.tensor([s.index for s in samples], dtype=torch.long),
            targets=targets,
        )


@dataclass(frozen=True)
class BatchPlan:
    """Which dataset indices make the global batch of each step: a fresh seeded permutation per
    epoch, incomplete tail batches dropped. The data position of a run is just its step number."""

    dataset_size: int
    batch_size: int
    seed: int

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise DataError(f"batch size must be >= 1, got {self.batch_size}")
        if self.dataset_size < self.batch_size:
            raise DataError(
                f"the dataset has {self.dataset_size} usable samples, fewer than one batch of {self.batch_size}"
            )

    @property
    def steps_per_epoch(self) -> int:
        return self.dataset_size // self.batch_size

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def indices(self, step: int) -> list[int]:
        epoch, within = divmod(step, self.steps_per_epoch)
        order = torch.randperm(
            self.dataset_size, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        )
        start = within * self.batch_size
        return order[start : start + self.batch_size].tolist()


def local_slice(indices: list[int], micro: int, micro_steps: int, rank: int, world: int) -> list[int]:
    """Micro-batch `micro` of a global batch, then this rank's share of it."""
    size = len(indices) // micro_steps
    chunk = indices[micro * size : (micro + 1) * size]
    per_rank = len(chunk) // world
    return chunk[rank * per_rank : (rank + 1) * per_rank]


class StepSampler(torch.utils.data.Sampler[list[tuple[int, int]]]):
    """Yields this process's micro-batches from `start_step` on, for a DataLoader's batch_sampler."""

    def __init__(self, plan: BatchPlan, start_step: int, steps: int, micro_steps: int, rank: int, world: int):
        self.plan, self.start_step, self.steps = plan, start_step, steps
        self.micro_steps, self.rank, self.world = micro_steps, rank, world

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start_step, self.steps):
            indices = self.plan.indices(step)
            epoch = self.plan.epoch_of(step)
            for micro in range(self.micro_steps):
                yield [
                    (i, epoch) for i in local_slice(indices, micro, self.micro_steps, self.rank, self.world)
                ]

    def __len__(self) -> int:
        return (self.steps - self.start_step) * self.micro_steps
