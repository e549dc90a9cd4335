"""Image decoding and preprocessing without torch, as the bundle's manifest says.

`ImagePreprocessor(spec, max_pixels, formats=...).__call__(data, index) -> float32 [3, H, W]` reproduces
open_clip's inference transforms (torchvision Resize / CenterCrop / ResizeKeepRatio /
CenterCropOrPad on PIL images, ToTensor, Normalize): the same PIL resampling, the same output
size rounding, the same crop offsets. On top of that, for robustness and speed:
EXIF orientation is applied, every mode is converted to RGB (transparency over white, in one
new image: no full-size copies on the way), an animation gives its first frame, only the `formats`
given are parsed at all (`Image.open(formats=...)`), images above `max_pixels` are refused before
decoding (`size` reads just the header, for a request's pixel budget), and JPEGs decode in draft mode
(DCT scaling) while the decoded size stays at least `draft_margin` (default 2) times the size the
resize needs.

Any failure raises `InvalidImage` (or `TooLarge` for pixels over the limit) naming the image index.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from clipserve.contract.bundle import ImagePreprocess
from clipserve.service.errors import InvalidImage, TooLarge
from clipserve.service.settings import IMAGE_FORMATS

_WHITE = (255, 255, 255)
_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


def _shortest_edge_size(width: int, height: int, target: int) -> tuple[int, int]:
    """torchvision Resize(int): the short side becomes `target`, the long side is truncated."""
    if width <= height:
        return target, int(target * height / width)
    return int(target * width / height), target


def _keep_ratio_size(width: int, height: int, target_hw: tuple[int, int], longest: bool) -> tuple[int, int]:
    """open_clip ResizeKeepRatio: scale by the ratio of the longest (or shortest) side, rounded."""
    ratio_h, ratio_w = height / target_hw[0], width / target_hw[1]
    ratio = max(ratio_h, ratio_w) if longest else min(ratio_h, ratio_w)
    return round(width / ratio), round(height / ratio)


class ImagePreprocessor:
    def __init__(
        self,
        spec: ImagePreprocess,
        max_pixels: int,
        draft_margin: float = 2.0,
        formats: Sequence[str] = IMAGE_FORMATS,
    ):
        self.spec = spec
        self.max_pixels = max_pixels
        self.draft_margin = draft_margin
        self.formats = tuple(formats)
        self.height, self.width = spec.size
        self._mean = np.asarray(spec.mean, dtype=np.float32).reshape(3, 1, 1)
        self._inv_std = (1.0 / np.asarray(spec.std, dtype=np.float32)).reshape(3, 1, 1)
        fill = spec.fill_color
        self._fill = (fill, fill, fill)

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the resize step, before crop or pad."""
        spec = self.spec
        if spec.resize_mode == "squash":
            return self.width, self.height
        if spec.resize_mode == "longest":
            return _keep_ratio_size(width, height, spec.size, longest=True)
        if self.height == self.width:
            return _shortest_edge_size(width, height, self.height)
        return _keep_ratio_size(width, height, spec.size, longest=False)

    def resample(self) -> Image.Resampling:
        # open_clip uses ResizeKeepRatio with its default (bicubic) for non-square shortest-edge targets.
        if self.spec.resize_mode == "shortest" and self.height != self.width:
            return Image.Resampling.BICUBIC
        return _RESAMPLE[self.spec.interpolation]

    def size(self, data: bytes, index: int) -> tuple[int, int]:
        """(width, height) from the header alone, within `max_pixels`; nothing is decoded."""
        with self._guarded(index):
            return self._header(data, index).size

    def _header(self, data: bytes, index: int) -> Image.Image:
        if not data:
            raise InvalidImage(f"image {index} is empty", index=index)
        image = Image.open(io.BytesIO(data), formats=self.formats)
        width, height = image.size
        if width * height > self.max_pixels:
            raise TooLarge(
                f"image {index} is too large: {width}x{height} pixels, more than this server's limit of "
                f"{self.max_pixels} pixels (max_image_pixels)",
                code="image_too_large",
                index=index,
            )
        return image

    @contextlib.contextmanager
    def _guarded(self, index: int) -> Iterator[None]:
        """Pillow's failures as the service's: what was wrong with image `index`."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                yield
        except (InvalidImage, TooLarge):
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise TooLarge(
                f"image {index} is too large to decode: {exc}", code="image_too_large", index=index
            ) from exc
        except UnidentifiedImageError as exc:
            raise InvalidImage(
                f"image {index} is not an image in a format this server decodes ({', '.join(self.formats)})",
                index=index,
            ) from exc
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise InvalidImage(f"image {index} cannot be decoded: {exc}", index=index) from exc

    def open(self, data: bytes, index: int) -> Image.Image:
        """Decode to an RGB PIL image, applying every guard."""
        with self._guarded(index):
            image = self._header(data, index)
            if getattr(image, "n_frames", 1) > 1:
                image.seek(0)
            self._draft(image)
            image.load()
            image = ImageOps.exif_transpose(image)
            return self._to_rgb(image)

    def _draft(self, image: Image.Image) -> None:
        if image.format != "JPEG" or self.draft_margin <= 0:
            return
        # EXIF rotation may swap the axes after decoding: ask for enough pixels in both orientations.
        # A margin over the resize target keeps the antialiased downscale close to a full decode's.
        need = math.ceil(self.draft_margin * max(self.resized_size(*image.size)))
        image.draft("RGB", (need, need))

    def _to_rgb(self, image: Image.Image) -> Image.Image:
        if image.mode == "RGB":
            return image
        if image.mode == "PA" or (image.mode == "P" and "transparency" in image.info):
            image = image.convert("RGBA")  # a palette holds no colors to blend with
        if image.mode in ("RGBA", "LA"):
            # blended straight onto a white canvas through the image's own alpha: the one new image
            flat = Image.new("RGB", image.size, _WHITE)
            flat.paste(image, mask=image)
            return flat
        return image.convert("RGB")

    def transform(self, image: Image.Image) -> np.ndarray:
        """RGB PIL image -> normalized float32 [3, H, W], exactly like open_clip's eval transform."""
        spec = self.spec
        new_w, new_h = self.resized_size(*image.size)
        if image.size != (new_w, new_h):
            image = image.resize((new_w, new_h), self.resample())
        if spec.resize_mode != "squash":
            image = self._crop_or_pad(image)
        pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / np.float32(255.0)
        return ((pixels - self._mean) * self._inv_std).astype(np.float32, copy=False)

    def _crop_or_pad(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        if width < self.width or height < self.height:
            pad_w, pad_h = max(self.width - width, 0), max(self.height - height, 0)
            canvas = Image.new("RGB", (width + pad_w, height + pad_h), self._fill)
            canvas.paste(image, (pad_w // 2, pad_h // 2))
            image = canvas
            width, height = image.size
        top = round((height - self.height) / 2.0)
        left = round((width - self.width) / 2.0)
        if (left, top, width, height) == (0, 0, self.width, self.height):
            return image
        return image.crop((left, top, left + self.width, top + self.height))

    def __call__(self, data: bytes, index: int = 0) -> np.ndarray:
        image = self.open(data, index)
        try:
            return self.transform(image)
        except (OSError, ValueError) as exc:
            raise InvalidImage(f"image {index} cannot be decoded: {exc}", index=index) from exc
