"""Parity of exported graphs with the torch model, on fixed images and texts of varied lengths."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from open_clip.tokenizer import SimpleTokenizer
from torch import nn

from clipserve.contract.bundle import ParityReport, Precision, Tower

DEFAULT_MIN_COSINE: dict[str, float] = {"fp32": 0.9999, "fp16": 0.999, "int8": 0.99}

PARITY_TEXTS: tuple[str, ...] = (
    "a photo of a cat",
    "",
    "A diagram of the water cycle, with arrows from the ocean to the clouds and back.",
    "dog",
    "an emoji 🐶 and an accent: café, naïve &amp; résumé",
    "a very long caption " + " ".join(f"word{i}" for i in range(120)),
)
# Tokenizer parity at export (the bundle's tokenizer.json against open_clip's tokenizer), beyond the
# parity texts: case, punctuation, underscores, whitespace, entities, scripts, special-token strings.
TOKENIZER_CHECK_TEXTS: tuple[str, ...] = (
    *PARITY_TEXTS,
    " ",
    "A  Photo_of THE dog!!  (really?)",
    "tab\tnew\nline\u00a0nbsp",
    "Ein Foto von einem Hund; une photo d'un chien; una foto de un perro",
    "фотография собаки, 一张狗的照片, 犬の写真, صورة كلب, एक कुत्ते की तस्वीर",
    "ﬁ ligature ① ＦＵＬＬＷＩＤＴＨ e\u0301",
    "<s> </s> <pad> <unk> [CLS] [SEP] <start_of_text>",
    "x" * 400,
)
PARITY_IMAGES = 4


def cosine_threshold(precision: str, min_cosine: float | Mapping[str, float] | None) -> float:
    """A float sets the fp32 threshold; a mapping overrides any precision; others keep their defaults."""
    if isinstance(min_cosine, Mapping):
        return float(min_cosine.get(precision, DEFAULT_MIN_COSINE[precision]))
    if min_cosine is not None and precision == "fp32":
        return float(min_cosine)
    return DEFAULT_MIN_COSINE[precision]


def fixed_images(height: int, width: int) -> np.ndarray:
    """Normalized-pixel-like inputs: two noise images, a gradient and a checkerboard."""
    rng = np.random.default_rng(1234)
    noise = rng.standard_normal((2, 3, height, width), dtype=np.float32)
    ramp = np.linspace(-2.0, 2.0, width, dtype=np.float32)
    gradient = np.broadcast_to(ramp, (1, 3, height, width))
    rows, cols = np.indices((height, width))
    checker = np.where((rows // 4 + cols // 4) % 2 == 0, 1.5, -1.5).astype(np.float32)
    checker = np.broadcast_to(checker, (1, 3, height, width))
    return np.ascontiguousarray(np.concatenate([noise, gradient, checker]).astype(np.float32))


def fixed_token_ids(
    context_length: int,
    texts: Sequence[str] = PARITY_TEXTS,
    tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
) -> np.ndarray:
    """Token ids as open_clip's own tokenizer makes them (CLIP BPE unless `tokenizer` is given, e.g.
    the model's HFTokenizer), padded to the context length."""
    tokenizer = tokenizer or SimpleTokenizer(context_length=context_length)
    return tokenizer(list(texts)).numpy().astype(np.int64)


def token_counts(input_ids: np.ndarray) -> np.ndarray:
    """Tokens up to and including the end token (the highest id in each row)."""
    return input_ids.argmax(axis=1) + 1


def torch_embeddings(module: nn.Module, inputs: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return module(torch.from_numpy(inputs)).float().numpy()


def make_session(
    path: Path, providers: Sequence[str] = ("CPUExecutionProvider",), threads: int | None = None
) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or min(4, os.cpu_count() or 1)
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=list(providers))


def providers_for(precision: str) -> tuple[str, ...]:
    """fp16 graphs are meant for the GPU: checked there when ONNX Runtime has CUDA, else on the CPU
    (ONNX Runtime runs fp16 graphs on the CPU too, so the figures are real either way)."""
    if precision == "fp16" and "CUDAExecutionProvider" in ort.get_available_providers():
        return ("CUDAExecutionProvider", "CPUExecutionProvider")
    return ("CPUExecutionProvider",)


@dataclass(frozen=True)
class Agreement:
    max_abs_diff: float
    min_cosine: float
    mean_cosine: float


def agreement(reference: np.ndarray, actual: np.ndarray) -> Agreement:
    reference = reference.astype(np.float64)
    actual = actual.astype(np.float64)
    dots = (reference * actual).sum(axis=1)
    norms = np.linalg.norm(reference, axis=1) * np.linalg.norm(actual, axis=1)
    cosines = dots / np.maximum(norms, 1e-12)
    return Agreement(float(np.abs(reference - actual).max()), float(cosines.min()), float(cosines.mean()))


def _run(session: ort.InferenceSession, inputs: np.ndarray) -> np.ndarray:
    name = session.get_inputs()[0].name
    return np.asarray(session.run(None, {name: inputs})[0], dtype=np.float32)


def image_outputs(session: ort.InferenceSession, images: np.ndarray) -> np.ndarray:
    return _run(session, images)


def text_outputs(session: ort.InferenceSession, input_ids: np.ndarray, length_free: bool) -> np.ndarray:
    """The batch at full length; with a dynamic length also each text alone, cut after its end token."""
    outputs = [_run(session, input_ids)]
    if length_free:
        counts = token_counts(input_ids)
        rows = [_run(session, row[None, :count]) for row, count in zip(input_ids, counts, strict=True)]
        outputs.append(np.concatenate(rows))
    return np.concatenate(outputs)


def runtime_name(session: ort.InferenceSession) -> str:
    active = session.get_providers()[0]
    return "onnxruntime-cuda" if active == "CUDAExecutionProvider" else "onnxruntime-cpu"


def report(
    tower: Tower,
    precision: Precision,
    file: str,
    reference: np.ndarray,
    actual: np.ndarray,
    inputs: int,
    threshold: float,
    runtime: str,
) -> ParityReport:
    repeats = actual.shape[0] // reference.shape[0]
    figures = agreement(np.concatenate([reference] * repeats), actual)
    return ParityReport(
        tower=tower,
        precision=precision,
        file=file,
        inputs=inputs,
        max_abs_diff=figures.max_abs_diff,
        min_cosine=figures.min_cosine,
        mean_cosine=figures.mean_cosine,
        threshold=threshold,
        passed=figures.min_cosine >= threshold,
        runtime=runtime,
    )
