"""Image decoding and preprocessing: parity with open_clip's transforms, and every guard."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from clipserve.contract.bundle import ImagePreprocess
from clipserve.service.errors import InvalidImage, TooLarge
from clipserve.service.inference.preprocess import ImagePreprocessor
from tests.fixtures.service import image_bytes, png_claiming

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def spec(size=(32, 32), resize_mode="shortest", interpolation="bicubic", fill_color=0) -> ImagePreprocess:
    return ImagePreprocess(
        size=size,
        mean=MEAN,
        std=STD,
        resize_mode=resize_mode,
        interpolation=interpolation,
        fill_color=fill_color,
    )


def open_clip_pixels(data: bytes, s: ImagePreprocess) -> np.ndarray:
    from open_clip.transform import image_transform

    transform = image_transform(
        s.size if s.size[0] != s.size[1] else s.size[0],
        is_train=False,
        mean=s.mean,
        std=s.std,
        resize_mode=s.resize_mode,
        interpolation=s.interpolation,
        fill_color=s.fill_color,
    )
    return transform(Image.open(io.BytesIO(data)).convert("RGB")).numpy()


@pytest.mark.parametrize(
    ("size", "mode", "interp", "source"),
    [
        ((32, 32), "shortest", "bicubic", (48, 40)),
        ((32, 32), "shortest", "bicubic", (37, 91)),
        ((32, 32), "shortest", "bilinear", (200, 120)),
        ((24, 40), "shortest", "bicubic", (64, 50)),
        ((32, 32), "longest", "bicubic", (80, 33)),
        ((32, 48), "longest", "bilinear", (30, 70)),
        ((32, 32), "squash", "bicubic", (90, 41)),
        ((32, 32), "shortest", "bicubic", (32, 32)),
        ((32, 32), "longest", "bicubic", (20, 12)),
    ],
)
def test_matches_open_clip_transform(size, mode, interp, source) -> None:
    s = spec(size, mode, interp, fill_color=0)
    data = image_bytes(seed=sum(source), size=source)
    ours = ImagePreprocessor(s, max_pixels=10**8)(data, 0)
    theirs = open_clip_pixels(data, s)
    assert ours.shape == theirs.shape == (3, *size)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_jpeg_draft_decodes_small_and_stays_close_to_full_decode() -> None:
    data = image_bytes(seed=3, size=(1600, 1200), fmt="JPEG")
    pre = ImagePreprocessor(spec(), max_pixels=10**8)
    image = pre.open(data, 0)
    assert image.size[0] < 1600 and min(image.size) >= 32  # decoded at a reduced scale, still big enough
    fast = pre.transform(image).ravel()
    full = pre.transform(Image.open(io.BytesIO(data)).convert("RGB")).ravel()
    cosine = float(fast @ full / np.linalg.norm(fast) / np.linalg.norm(full))
    assert cosine > 0.99


def test_exif_orientation_is_applied() -> None:
    pixels = np.zeros((20, 60, 3), dtype=np.uint8)
    pixels[:, :30] = 255  # left half white
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    out = io.BytesIO()
    image.save(out, format="JPEG", exif=exif.tobytes(), quality=95)
    opened = ImagePreprocessor(spec(), max_pixels=10**8).open(out.getvalue(), 0)
    assert opened.size == (20, 60)
    top, bottom = np.asarray(opened)[:10].mean(), np.asarray(opened)[-10:].mean()
    assert top > 200 > 50 > bottom


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "CMYK", "LA", "I;16"])
def test_modes_become_rgb(mode: str) -> None:
    fmt = "JPEG" if mode == "CMYK" else ("TIFF" if mode == "I;16" else "PNG")
    data = image_bytes(seed=1, mode=mode, fmt=fmt)
    pre = ImagePreprocessor(spec(), max_pixels=10**8)
    assert pre.open(data, 0).mode == "RGB"
    assert pre(data, 0).shape == (3, 32, 32)


def test_transparent_pixels_are_composited_on_white() -> None:
    image = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    out = io.BytesIO()
    image.save(out, format="PNG")
    rgb = ImagePreprocessor(spec(), max_pixels=10**8).open(out.getvalue(), 0)
    assert np.asarray(rgb).min() == 255


def test_animation_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (40, 40), color) for color in ((255, 0, 0), (0, 0, 255))]
    out = io.BytesIO()
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    first = np.asarray(ImagePreprocessor(spec(), max_pixels=10**8).open(out.getvalue(), 0))
    assert first[..., 0].mean() > 200 and first[..., 2].mean() < 50


def test_pixel_limit_refuses_before_decoding() -> None:
    with pytest.raises(TooLarge) as err:
        ImagePreprocessor(spec(), max_pixels=50_000_000)(png_claiming(20000, 20000), 3)
    assert err.value.code == "image_too_large" and err.value.index == 3 and "too large" in err.value.message


def test_pixel_limit_of_the_server_is_named() -> None:
    with pytest.raises(TooLarge) as err:
        ImagePreprocessor(spec(), max_pixels=1000)(image_bytes(size=(50, 40)), 0)
    assert "50x40" in err.value.message and "1000" in err.value.message


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"definitely not an image", "not an image"),
        (image_bytes(seed=2, size=(64, 64), fmt="JPEG")[:300], "cannot be decoded"),
        (b"", "empty"),
    ],
    ids=["not-an-image", "truncated-jpeg", "empty"],
)
def test_bad_bytes_are_invalid_images_naming_the_index(data: bytes, words: str) -> None:
    with pytest.raises(InvalidImage) as err:
        ImagePreprocessor(spec(), max_pixels=10**8)(data, 5)
    assert err.value.index == 5 and words in err.value.message


@pytest.mark.parametrize(("margin", "expected_width"), [(0, 1600), (1, 200), (2, 200), (8, 800)])
def test_draft_margin_sets_the_decode_scale(margin: float, expected_width: int) -> None:
    data = image_bytes(seed=3, size=(1600, 1200), fmt="JPEG")
    opened = ImagePreprocessor(spec(), max_pixels=10**8, draft_margin=margin).open(data, 0)
    assert opened.size[0] == expected_width
