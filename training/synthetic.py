"""The synthetic shapes dataset: procedural, deterministic image-caption pairs and a zero-shot benchmark.

Every image is drawn from a random generator seeded by (seed, split, index), so item `i` is the same
on every machine and in every process, with no files on disk. Training images hold one to three
coloured shapes of varied size and position on varied backgrounds, with captions in varied wording.
The benchmark shows one shape per image and asks for its (colour, shape) class among all
compositions; some compositions never appear in training, so the benchmark measures whether a model
composes "red" and "circle" rather than memorising "red circle".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from clipserve.contract.scoring import fill_template

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 230),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 180),
    "orange": (245, 140, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "black": (15, 15, 15),
    "beige": (225, 210, 180),
    "dark blue": (20, 25, 60),
}
SINGLE_TEMPLATES: tuple[str, ...] = (
    "a {}.",
    "a photo of a {}.",
    "a drawing of a {}.",
    "a picture showing a {}.",
)
CLASS_TEMPLATES: tuple[str, ...] = ("a {}.", "a photo of a {}.", "a drawing of a {}.")
_SIZE_WORDS = {0: "small", 1: "", 2: "big"}


def all_compositions() -> list[tuple[str, str]]:
    return [(colour, shape) for colour in COLOURS for shape in SHAPES]


def default_held_out() -> list[tuple[str, str]]:
    """One composition per colour, on a diagonal, so every colour and every shape is still seen in
    training; the red circle of the first-run demo stays a training composition."""
    colours = list(COLOURS)
    return [(colour, SHAPES[(i * 2 + 1) % len(SHAPES)]) for i, colour in enumerate(colours)]


@dataclass(frozen=True)
class ShapeObject:
    colour: str
    shape: str
    centre: tuple[float, float]
    radius: float
    rotation: float
    size_class: int

    @property
    def label(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class ShapesConfig:
    """What the generator draws. `held_out` compositions never appear in the training split."""

    image_size: int = 64
    seed: int = 0
    train_size: int = 20_000
    eval_size: int = 600
    max_objects: int = 3
    held_out: tuple[tuple[str, str], ...] = field(default_factory=lambda: tuple(default_held_out()))

    def training_compositions(self) -> list[tuple[str, str]]:
        held = set(self.held_out)
        return [c for c in all_compositions() if c not in held]


def _polygon(shape: str, cx: float, cy: float, r: float, rotation: float) -> list[tuple[float, float]]:
    if shape == "square":
        corners = [(math.pi / 4) + k * math.pi / 2 for k in range(4)]
        scale = r
    elif shape == "triangle":
        corners = [-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3)]
        scale = r * 1.1
    elif shape == "diamond":
        corners = [k * math.pi / 2 for k in range(4)]
        scale = r * 1.1
    else:
        raise ValueError(f"no polygon for shape {shape!r}")
    return [(cx + scale * math.cos(a + rotation), cy + scale * math.sin(a + rotation)) for a in corners]


def _draw_object(draw: ImageDraw.ImageDraw, obj: ShapeObject, colour: tuple[int, int, int]) -> None:
    cx, cy = obj.centre
    r = obj.radius
    if obj.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif obj.shape == "cross":
        arm = r * 0.38
        draw.rectangle([cx - r, cy - arm, cx + r, cy + arm], fill=colour)
        draw.rectangle([cx - arm, cy - r, cx + arm, cy + r], fill=colour)
    else:
        rotation = obj.rotation if obj.shape == "triangle" else 0.0
        draw.polygon(_polygon(obj.shape, cx, cy, r, rotation), fill=colour)


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator, amount: int) -> tuple[int, int, int]:
    values = np.clip(np.array(rgb) + rng.integers(-amount, amount + 1, size=3), 0, 255)
    return (int(values[0]), int(values[1]), int(values[2]))


def _place_objects(
    rng: np.random.Generator, compositions: list[tuple[str, str]], count: int, size: int
) -> list[ShapeObject]:
    objects: list[ShapeObject] = []
    for _ in range(count):
        colour, shape = compositions[int(rng.integers(len(compositions)))]
        size_class = int(rng.integers(3))
        radius = size * (0.13 + 0.06 * size_class + rng.uniform(0, 0.04)) / max(1.0, count**0.4)
        for _attempt in range(20):
            centre = (float(rng.uniform(radius, size - radius)), float(rng.uniform(radius, size - radius)))
            if all(math.dist(centre, o.centre) > (radius + o.radius) * 1.05 for o in objects):
                break
        objects.append(
            ShapeObject(colour, shape, centre, radius, float(rng.uniform(0, 2 * math.pi)), size_class)
        )
    return objects


def render(objects: list[ShapeObject], background: str, size: int, rng: np.random.Generator) -> Image.Image:
    base = _jitter(BACKGROUNDS[background], rng, 12)
    image = Image.new("RGB", (size, size), base)
    draw = ImageDraw.Draw(image)
    if rng.random() < 0.3:
        # a soft second band of background, so the model cannot treat the background as one flat colour
        band = _jitter(base, rng, 25)
        top = int(rng.integers(size))
        draw.rectangle([0, top, size, top + size // 3], fill=band)
    for obj in objects:
        _draw_object(draw, obj, _jitter(COLOURS[obj.colour], rng, 18))
    return image


def _describe_object(obj: ShapeObject, rng: np.random.Generator, with_colour: bool) -> str:
    # size and background words are rare: were they common, they would be a shortcut around shape
    size_word = _SIZE_WORDS[obj.size_class] if rng.random() < 0.2 else ""
    return " ".join(w for w in (size_word, obj.colour if with_colour else "", obj.shape) if w)


def caption_for(objects: list[ShapeObject], background: str, rng: np.random.Generator) -> str:
    # colour is learned first and alone suffices to tell most images apart; captions that name only
    # the shapes make the image tower learn shape too
    with_colour = rng.random() >= 0.3
    parts = [_describe_object(o, rng, with_colour) for o in objects]
    if len(parts) == 1:
        text = fill_template(SINGLE_TEMPLATES[int(rng.integers(len(SINGLE_TEMPLATES)))], parts[0]).rstrip(".")
    else:
        listed = ", ".join(f"a {p}" for p in parts[:-1]) + f" and a {parts[-1]}"
        style = int(rng.integers(3))
        if style == 0:
            text = listed
        elif style == 1:
            text = f"{len(parts)} shapes: {listed}"
        else:
            text = f"a picture of {listed}"
    if rng.random() < 0.2:
        text += f" on a {background} background"
    return text


class ShapesPairs:
    """Training split: (image, caption) pairs over the training compositions."""

    def __init__(self, config: ShapesConfig | None = None, size: int | None = None):
        self.config = config or ShapesConfig()
        self.size = self.config.train_size if size is None else size
        self._compositions = self.config.training_compositions()
        if not self._compositions:
            raise ValueError("the shapes config holds out every composition: nothing left to train on")

    def __len__(self) -> int:
        return self.size

    def sample(self, index: int) -> tuple[Image.Image, str, list[ShapeObject]]:
        if not 0 <= index < self.size:
            raise IndexError(f"shapes index {index} out of range 0..{self.size - 1}")
        rng = np.random.default_rng([self.config.seed, 0, index])
        # single objects are the clearest lesson in what a shape looks like, so they come most often
        weights = np.array([0.6, 0.25, 0.15][: self.config.max_objects])
        count = int(rng.choice(len(weights), p=weights / weights.sum())) + 1
        # one colour for every object half of the time, so that telling images apart takes their shapes
        compositions = self._compositions
        if count > 1 and rng.random() < 0.5:
            colour = compositions[int(rng.integers(len(compositions)))][0]
            compositions = [c for c in compositions if c[0] == colour]
        objects = _place_objects(rng, compositions, count, self.config.image_size)
        background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
        image = render(objects, background, self.config.image_size, rng)
        return image, caption_for(objects, background, rng), objects

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        image, caption, _ = self.sample(index)
        return image, caption


class ShapesBenchmark:
    """Zero-shot split: one shape per image, labelled by its (colour, shape) class among all compositions."""

    def __init__(
        self, config: ShapesConfig | None = None, held_out_only: bool = True, size: int | None = None
    ):
        self.config = config or ShapesConfig()
        self.classes = [f"{c} {s}" for c, s in all_compositions()]
        self._compositions = list(self.config.held_out) if held_out_only else all_compositions()
        self.size = self.config.eval_size if size is None else size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        if not 0 <= index < self.size:
            raise IndexError(f"benchmark index {index} out of range 0..{self.size - 1}")
        rng = np.random.default_rng([self.config.seed, 1, index])
        colour, shape = self._compositions[index % len(self._compositions)]
        obj = _place_objects(rng, [(colour, shape)], 1, self.config.image_size)[0]
        background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
        return render([obj], background, self.config.image_size, rng), self.classes.index(f"{colour} {shape}")


def draw_single(
    colour: str, shape: str, size: int = 64, background: str = "white", seed: int = 0
) -> Image.Image:
    """One centred shape, e.g. the red circle a first-run demo classifies."""
    if colour not in COLOURS or shape not in SHAPES:
        raise ValueError(
            f"unknown colour or shape {colour!r} {shape!r}: colours {list(COLOURS)}, shapes {SHAPES}"
        )
    obj = ShapeObject(colour, shape, (size / 2, size / 2), size * 0.3, 0.0, 2)
    return render([obj], background, size, np.random.default_rng(seed))


def colour_task_images(
    colours: Sequence[str], seed: int, count: int, image_size: int = 32
) -> tuple[list[Image.Image], list[int]]:
    """A tiny classification task: `count` images of one shape each (circle, square or triangle, any
    background), labelled by the shape's colour (an index into `colours`)."""
    compositions = tuple((c, s) for c in colours for s in ("circle", "square", "triangle"))
    config = ShapesConfig(image_size=image_size, seed=seed, held_out=compositions)
    bench = ShapesBenchmark(config, held_out_only=True, size=count)
    images, labels = [], []
    for index in range(count):
        image, label = bench[index]
        images.append(image)
        labels.append(list(colours).index(bench.classes[label].split()[0]))
    return images, labels
