"""Bulk encoding: many images or texts to vectors in one synchronous call, for work that is not a
request (the corpus indexer's Ray actors, a collection's re-embed job in a background thread).

It is the service's own path without the request machinery: the bundle is loaded by
`loading.load_version` (hashes verified, the same runtimes, providers and precision choice), images go
through the service's `ImagePreprocessor`, texts through the bundle's tokenizer and `towers.token_rows`,
and vectors come out L2-normalized, exactly as `/v1/embed` gives them. No batcher, no cache, no event
loop: the caller decides where it runs and how many threads each runtime takes.

One bad item never fails the call: a text that is empty or too long, bytes that do not decode, an
image over the pixel limit, or an input that could not even be fetched is an `ItemError` naming its
position, and its row of the result is zero.

    inputs = BulkInputs(bundle, settings)           # preparation only: cheap, no sessions
    prepared = inputs.prepare_images([png, jpeg])   # decode + preprocess, errors kept per item
    encoder = BulkEncoder.load(models_dir, "tiny@1", threads=2)
    encoded = encoder.encode_prepared_images(prepared)   # BulkVectors(vectors [N, D], errors)
    encoder.encode_texts(["a dog", "a cat"])        # both steps at once
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clipserve.contract.bundle import Bundle, ModelRepository, parse_model_ref
from clipserve.contract.scoring import normalize
from clipserve.contract.tokenizer import TextTokenizer, load_tokenizer
from clipserve.service.errors import ServiceError
from clipserve.service.inference.loading import LoadedBundle, load_version
from clipserve.service.inference.preprocess import ImagePreprocessor
from clipserve.service.inference.towers import pad_rows, token_rows
from clipserve.service.settings import Settings


@dataclass(frozen=True)
class ItemError:
    """Why item `index` of a call has no vector: `code` as the API names it (`invalid_image`,
    `image_too_large`, `text_too_long`, `invalid_request`), `message` a sentence for a person."""

    index: int
    code: str
    message: str

    @classmethod
    def of(cls, index: int, error: ServiceError) -> ItemError:
        return cls(index, error.code, error.message)


@dataclass
class PreparedImages:
    """Model inputs of `count` images: `pixels[k]` is the image at position `positions[k]`."""

    count: int
    pixels: np.ndarray
    positions: np.ndarray
    errors: list[ItemError] = field(default_factory=list)


@dataclass
class PreparedTexts:
    """Model inputs of `count` texts: `rows[k]` holds the token ids of the text at `positions[k]`."""

    count: int
    rows: list[np.ndarray]
    positions: np.ndarray
    errors: list[ItemError] = field(default_factory=list)


@dataclass
class BulkVectors:
    """One unit vector per item, in the order given; a failed item's row is zero and it is in `errors`."""

    vectors: np.ndarray
    errors: list[ItemError]

    @property
    def ok(self) -> np.ndarray:
        """bool [N]: which rows are real vectors."""
        mask = np.ones(len(self.vectors), dtype=bool)
        mask[[error.index for error in self.errors]] = False
        return mask


class _GivenSettings(Settings):
    """The service's settings from the values given alone: no CLIPSERVE_* variable applies."""

    @classmethod
    def settings_customise_sources(cls, settings_cls: Any, init_settings: Any, **_others: Any) -> tuple:
        return (init_settings,)


def bulk_settings(**values: Any) -> Settings:
    """Service settings for bulk work: only what is given differs from the service's defaults (the
    pixel and text limits, precision, providers, threads); the environment's CLIPSERVE_* variables,
    meant for a server, do not apply."""
    return _GivenSettings(**values)


class BulkInputs:
    """Decoding, preprocessing and tokenizing for one bundle, without its sessions: cheap to build,
    so decode tasks can each hold one."""

    def __init__(self, bundle: Bundle, settings: Settings, tokenizer: TextTokenizer | None = None):
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.preprocessor = ImagePreprocessor(
            self.manifest.image, settings.max_image_pixels, settings.jpeg_draft_margin
        )
        self.tokenizer = tokenizer or load_tokenizer(self.manifest.tokenizer, bundle.path)
        self.max_text_chars = settings.max_text_chars

    def prepare_images(self, images: Sequence[bytes | ServiceError]) -> PreparedImages:
        """Each image decoded and preprocessed as the service does; an item given as an error (a
        fetch that failed) or failing here is kept as an `ItemError`."""
        rows: list[np.ndarray] = []
        positions: list[int] = []
        errors: list[ItemError] = []
        for index, data in enumerate(images):
            if isinstance(data, ServiceError):
                errors.append(ItemError.of(index, data))
                continue
            try:
                rows.append(self.preprocessor(data, index))
            except ServiceError as exc:
                errors.append(ItemError.of(index, exc))
                continue
            positions.append(index)
        height, width = self.manifest.image.size
        pixels = np.stack(rows) if rows else np.zeros((0, 3, height, width), dtype=np.float32)
        return PreparedImages(len(images), pixels, np.asarray(positions, dtype=np.int64), errors)

    def prepare_texts(self, texts: Sequence[str]) -> PreparedTexts:
        """Token rows of the texts the service would accept; an empty text or one over
        `max_text_chars` is an `ItemError` (the service answers those with a 4xx)."""
        kept: list[str] = []
        positions: list[int] = []
        errors: list[ItemError] = []
        for index, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                errors.append(ItemError(index, "invalid_request", f"text {index} is empty"))
            elif len(text) > self.max_text_chars:
                errors.append(
                    ItemError(
                        index,
                        "text_too_long",
                        f"text {index} has {len(text)} characters, at most {self.max_text_chars} allowed",
                    )
                )
            else:
                kept.append(text)
                positions.append(index)
        rows = token_rows(self.tokenizer.encode(kept), self.manifest.text.dynamic_length) if kept else []
        return PreparedTexts(len(texts), rows, np.asarray(positions, dtype=np.int64), errors)


class BulkEncoder:
    """A loaded bundle that encodes prepared inputs in batches of `batch_size`, synchronously, on the
    calling thread (each runtime's own threads: `intra_op_threads` of its settings)."""

    def __init__(self, loaded: LoadedBundle, settings: Settings, batch_size: int = 32):
        self.loaded = loaded
        self.manifest = loaded.bundle.manifest
        self.inputs = BulkInputs(loaded.bundle, settings, loaded.tokenizer)
        self.batch_size = batch_size
        self.dim = self.manifest.embed_dim
        self.content_hash = self.manifest.content_hash
        self.ref = loaded.bundle.ref

    @classmethod
    def load(
        cls,
        models_dir: Path | str,
        model: str,
        *,
        threads: int = 1,
        batch_size: int = 32,
        settings: Settings | None = None,
    ) -> BulkEncoder:
        """Load `name` or `name@version` from a model repository, verified, with `threads` threads per
        runtime. `settings` supplies precision, providers and limits (defaults: the service's)."""
        base = settings or bulk_settings()
        settings = base.model_copy(
            update={
                "intra_op_threads": threads,
                # the batch sizes this encoder feeds (TensorRT optimization profiles)
                "max_batch_size_image": batch_size,
                "max_batch_size_text": batch_size,
            }
        )
        name, version = parse_model_ref(model)
        loaded = load_version(ModelRepository(models_dir), name, version, settings)
        return cls(loaded, settings, batch_size)

    def _empty(self, count: int) -> np.ndarray:
        return np.zeros((count, self.dim), dtype=np.float32)

    def encode_prepared_images(self, prepared: PreparedImages) -> BulkVectors:
        out = self._empty(prepared.count)
        runtime = self.loaded.image_runtime
        for start in range(0, len(prepared.pixels), self.batch_size):
            stop = start + self.batch_size
            batch = np.ascontiguousarray(prepared.pixels[start:stop], dtype=np.float32)
            out[prepared.positions[start:stop]] = normalize(runtime.run(batch))
        return BulkVectors(out, list(prepared.errors))

    def encode_prepared_texts(self, prepared: PreparedTexts) -> BulkVectors:
        out = self._empty(prepared.count)
        runtime = self.loaded.text_runtime
        pad = self.manifest.tokenizer.pad_token_id
        for start in range(0, len(prepared.rows), self.batch_size):
            stop = start + self.batch_size
            out[prepared.positions[start:stop]] = normalize(
                runtime.run(pad_rows(prepared.rows[start:stop], pad))
            )
        return BulkVectors(out, list(prepared.errors))

    def encode_images(self, images: Sequence[bytes | ServiceError]) -> BulkVectors:
        """Encoded images (or errors, see `BulkInputs.prepare_images`) to unit vectors."""
        return self.encode_prepared_images(self.inputs.prepare_images(images))

    def encode_texts(self, texts: Sequence[str]) -> BulkVectors:
        return self.encode_prepared_texts(self.inputs.prepare_texts(texts))

    def close(self) -> None:
        self.loaded.image_runtime.close()
        self.loaded.text_runtime.close()
