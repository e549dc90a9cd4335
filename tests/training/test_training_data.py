"""Training data readers: captions files, tar shards, class folders, bad images, batch order."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from clipserve.training import synthetic
from clipserve.training.data import (
    AugmentParams,
    BatchPlan,
    DataError,
    ImageFolderSource,
    TarShardSource,
    build_dataset,
    local_slice,
    sample_augment,
)


def _write_image(path: Path, colour: str = "red", shape: str = "circle") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    synthetic.draw_single(colour, shape, size=32).save(path)
    return path


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    for i, (colour, shape) in enumerate([("red", "circle"), ("blue", "square"), ("green", "cross")]):
        _write_image(tmp_path / "img" / f"{i}.png", colour, shape)
    (tmp_path / "img" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return tmp_path


def test_csv_with_header_and_relative_paths(image_dir: Path) -> None:
    csv_path = image_dir / "pairs.csv"
    csv_path.write_text('filepath,caption\nimg/0.png,a red circle\nimg/1.png,"a blue square, big"\n')
    dataset = build_dataset(str(csv_path), log=lambda _: None)
    assert len(dataset) == 2
    sample = dataset[1]
    assert sample.caption == "a blue square, big" and sample.image.size == (32, 32) and sample.label == -1


def test_tsv_and_named_columns(image_dir: Path) -> None:
    tsv_path = image_dir / "pairs.tsv"
    tsv_path.write_text("url\ttitle\nimg/2.png\ta green cross\n")
    dataset = build_dataset(str(tsv_path), image_column="url", log=lambda _: None)
    assert dataset[0].caption == "a green cross"
    with pytest.raises(DataError, match="no image path column 'path'"):
        build_dataset(str(tsv_path), image_column="path", log=lambda _: None)


def test_jsonl(image_dir: Path) -> None:
    path = image_dir / "pairs.jsonl"
    path.write_text(
        json.dumps({"image": "img/0.png", "text": "a red circle"})
        + "\n\n"
        + json.dumps({"image": "img/1.png", "text": "a blue square"})
        + "\n"
    )
    dataset = build_dataset(str(path), log=lambda _: None)
    assert [dataset[i].caption for i in range(2)] == ["a red circle", "a blue square"]
    path.write_text('{"image": "img/0.png", "text": "ok"}\n{broken\n')
    with pytest.raises(DataError, match=r"pairs\.jsonl:2: not valid JSON"):
        build_dataset(str(path), log=lambda _: None)


def test_missing_and_corrupt_images_are_skipped_and_counted(image_dir: Path) -> None:
    csv_path = image_dir / "pairs.csv"
    csv_path.write_text(
        "filepath,caption\nimg/0.png,a red circle\nimg/missing.png,gone\nimg/broken.jpg,broken\nimg/1.png,a blue square\n"
    )
    messages: list[str] = []
    dataset = build_dataset(str(csv_path), on_bad_image="skip", log=messages.append)
    assert len(dataset) == 2
    assert "4 samples, 2 bad images (skip)" in messages[0]
    assert [dataset[i].caption for i in range(2)] == ["a red circle", "a blue square"]


def test_bad_images_fail_with_the_list_when_asked(image_dir: Path) -> None:
    csv_path = image_dir / "pairs.csv"
    csv_path.write_text("filepath,caption\nimg/0.png,ok\nimg/missing.png,gone\nimg/broken.jpg,broken\n")
    messages: list[str] = []
    with pytest.raises(DataError) as info:
        build_dataset(str(csv_path), on_bad_image="fail", log=messages.append)
    text = str(info.value)
    assert "2 of 3 images" in text and "missing.png: missing" in text and "broken.jpg: corrupt" in text
    assert "2 bad images (fail)" in messages[0]


def test_empty_and_unusable_datasets_are_clear_errors(image_dir: Path) -> None:
    empty = image_dir / "empty.csv"
    empty.write_text("filepath,caption\n")
    with pytest.raises(DataError, match="empty"):
        build_dataset(str(empty), log=lambda _: None)
    all_bad = image_dir / "bad.csv"
    all_bad.write_text("filepath,caption\nimg/missing.png,gone\n")
    with pytest.raises(DataError, match=r"every image .* is missing or corrupt"):
        build_dataset(str(all_bad), log=lambda _: None)
    with pytest.raises(DataError, match="does not exist"):
        build_dataset(str(image_dir / "nope.csv"), log=lambda _: None)
    notes = image_dir / "notes"
    notes.mkdir()
    (notes / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="cannot read dataset"):
        build_dataset(str(notes), log=lambda _: None)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _png(colour: str, shape: str) -> bytes:
    buffer = io.BytesIO()
    synthetic.draw_single(colour, shape, size=32).save(buffer, format="PNG")
    return buffer.getvalue()


def test_webdataset_tar_shards(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "shard-000.tar", "w") as tar:
        _add(tar, "a/000.png", _png("red", "circle"))
        _add(tar, "a/000.txt", b"a red circle")
        _add(tar, "a/001.png", _png("blue", "square"))
        _add(tar, "a/001.json", json.dumps({"caption": "a blue square"}).encode())
        _add(tar, "a/002.txt", b"caption with no image")
    with tarfile.open(shards / "shard-001.tar", "w") as tar:
        _add(tar, "003.png", b"garbage")
        _add(tar, "003.txt", b"corrupt one")
    source = TarShardSource(sorted(shards.glob("*.tar")))
    assert len(source) == 4
    messages: list[str] = []
    dataset = build_dataset(str(shards), log=messages.append)
    assert sorted(dataset[i].caption for i in range(len(dataset))) == ["a blue square", "a red circle"]
    assert "4 samples, 2 bad images" in messages[0]
    same = build_dataset(str(shards / "shard-*.tar"), log=lambda _: None)
    assert len(same) == 2


def test_class_folders(tmp_path: Path) -> None:
    _write_image(tmp_path / "classes" / "red_circle" / "a.png", "red", "circle")
    _write_image(tmp_path / "classes" / "blue_square" / "b.png", "blue", "square")
    source = ImageFolderSource(tmp_path / "classes")
    assert source.classes == ["blue square", "red circle"]
    dataset = build_dataset(str(tmp_path / "classes"), log=lambda _: None)
    assert dataset.classes == ["blue square", "red circle"]
    assert {(dataset[i].label, dataset[i].caption) for i in range(2)} == {
        (0, "a photo of a blue square."),
        (1, "a photo of a red circle."),
    }


def test_batch_plan_is_seeded_covers_each_epoch_and_splits_for_ranks() -> None:
    plan = BatchPlan(dataset_size=10, batch_size=4, seed=3)
    assert plan.steps_per_epoch == 2
    epoch0 = plan.indices(0) + plan.indices(1)
    assert len(set(epoch0)) == 8
    assert plan.indices(2) != plan.indices(0)
    assert BatchPlan(10, 4, 3).indices(5) == plan.indices(5)
    assert BatchPlan(10, 4, 4).indices(0) != plan.indices(0)
    batch = plan.indices(0)
    parts = [local_slice(batch, m, 2, r, 2) for m in range(2) for r in range(2)]
    assert [i for part in parts for i in part] == batch
    with pytest.raises(DataError, match="fewer than one batch"):
        BatchPlan(3, 4, 0)


def test_augmentation_parameters_are_seeded_and_replayable() -> None:
    params = sample_augment(0, 1, 5)
    assert params == sample_augment(0, 1, 5) and params != sample_augment(0, 2, 5)
    assert AugmentParams.from_list(params.as_list()) == params
    image = Image.new("RGB", (40, 40), "white")
    cropped = params.apply(image)
    assert cropped.size[0] <= 40 and cropped.size[0] >= 40 * 0.6**0.5 - 1
    assert AugmentParams().apply(image).size == (40, 40)
