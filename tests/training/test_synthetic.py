"""The synthetic shapes set: deterministic, varied, and with compositions held out of training."""

from __future__ import annotations

import numpy as np
import pytest

from clipserve.training import synthetic
from clipserve.training.data import DataError, shapes_config_from_spec


def _pixels(image) -> np.ndarray:
    return np.asarray(image)


def test_same_index_gives_the_same_image_and_caption_every_time() -> None:
    first = synthetic.ShapesPairs(size=10)
    second = synthetic.ShapesPairs(size=10)
    for index in (0, 3, 9):
        image_a, caption_a = first[index]
        image_b, caption_b = second[index]
        assert caption_a == caption_b
        assert np.array_equal(_pixels(image_a), _pixels(image_b))


def test_indices_and_seeds_give_different_samples() -> None:
    pairs = synthetic.ShapesPairs(size=50)
    captions = {pairs[i][1] for i in range(50)}
    assert len(captions) > 40
    other_seed = synthetic.ShapesPairs(synthetic.ShapesConfig(seed=1), size=5)
    assert not np.array_equal(_pixels(pairs[0][0]), _pixels(other_seed[0][0]))


def test_training_images_vary_in_objects_sizes_backgrounds_and_wording() -> None:
    pairs = synthetic.ShapesPairs(size=200)
    samples = [pairs.sample(i) for i in range(200)]
    counts = {len(objects) for _, _, objects in samples}
    assert counts == {1, 2, 3}
    radii = [o.radius for _, _, objects in samples for o in objects]
    assert max(radii) > 1.8 * min(radii)
    corners = {tuple(_pixels(image)[0, 0] // 40) for image, _, _ in samples}
    assert len(corners) >= 4
    openings = {caption.split(" ")[0] for _, caption, _ in samples}
    assert len(openings) >= 3
    assert any("background" in caption for _, caption, _ in samples)


def test_captions_name_every_object_in_the_image() -> None:
    pairs = synthetic.ShapesPairs(size=60)
    shape_only = 0
    for index in range(60):
        _, caption, objects = pairs.sample(index)
        named_colours = [obj.colour in caption for obj in objects]
        assert all(obj.shape in caption for obj in objects)
        assert all(named_colours) or not any(named_colours)
        shape_only += not any(named_colours)
    assert 5 < shape_only < 35


def test_held_out_compositions_never_appear_in_training_but_their_parts_do() -> None:
    config = synthetic.ShapesConfig()
    held = set(config.held_out)
    assert len(held) == len(synthetic.COLOURS)
    pairs = synthetic.ShapesPairs(config, size=400)
    seen = {(o.colour, o.shape) for i in range(400) for o in pairs.sample(i)[2]}
    assert not seen & held
    assert {c for c, _ in seen} == set(synthetic.COLOURS)
    assert {s for _, s in seen} == set(synthetic.SHAPES)


def test_benchmark_covers_held_out_classes_among_all_labels() -> None:
    bench = synthetic.ShapesBenchmark(size=12)
    assert len(bench.classes) == len(synthetic.COLOURS) * len(synthetic.SHAPES)
    labels = {bench[i][1] for i in range(12)}
    held = {bench.classes.index(f"{c} {s}") for c, s in synthetic.default_held_out()}
    assert labels == held
    image, label = bench[5]
    again, label_again = synthetic.ShapesBenchmark(size=12)[5]
    assert label == label_again and np.array_equal(_pixels(image), _pixels(again))


def test_red_circle_is_drawn_red() -> None:
    pixels = _pixels(synthetic.draw_single("red", "circle", size=64))
    r, g, b = pixels[32, 32].astype(int)
    assert r > 180 and g < 80 and b < 80
    with pytest.raises(ValueError, match="unknown colour or shape"):
        synthetic.draw_single("magenta", "circle")


def test_out_of_range_index_and_bad_specs_are_clear_errors() -> None:
    with pytest.raises(IndexError, match="out of range"):
        synthetic.ShapesPairs(size=3)[3]
    with pytest.raises(DataError, match="unknown synthetic dataset"):
        shapes_config_from_spec("synthetic:circles")
    with pytest.raises(DataError, match="unknown synthetic:shapes option"):
        shapes_config_from_spec("synthetic:shapes?colour=red")
    config, size = shapes_config_from_spec("synthetic:shapes?size=10&image_size=32&seed=2")
    assert (config.image_size, config.seed, size) == (32, 2, 10)
