"""Evaluation: zero-shot top-k with templates (the service's classifier, clipserve/contract/scoring.py), retrieval
Recall@K both ways, cost figures (parameters, GFLOPs, ONNX Runtime latency of each tower's graph as
export/ writes it) and a JSON + Markdown report with teacher beside student."""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from clipserve.export.towers import ImageTower, WholeTextTower
from clipserve.training.models import ClipModel, class_vectors


def image_transform(clip: ClipModel):
    return open_clip.transform.image_transform_v2(
        open_clip.transform.PreprocessCfg(**clip.preprocess_cfg), is_train=False
    )


@torch.no_grad()
def encode_images(clip: ClipModel, images: Sequence[Image.Image], batch_size: int = 64) -> torch.Tensor:
    transform = image_transform(clip)
    device = next(clip.model.parameters()).device
    chunks = []
    for start in range(0, len(images), batch_size):
        pixels = torch.stack([transform(img) for img in images[start : start + batch_size]]).to(device)
        chunks.append(clip.model.encode_image(pixels, normalize=True).float().cpu())
    return torch.cat(chunks)


@torch.no_grad()
def encode_texts(clip: ClipModel, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    device = next(clip.model.parameters()).device
    chunks = []
    for start in range(0, len(texts), batch_size):
        tokens = clip.tokenizer(list(texts[start : start + batch_size])).to(device)
        chunks.append(clip.model.encode_text(tokens, normalize=True).float().cpu())
    return torch.cat(chunks)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    ranked = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = ranked == labels[:, None]
    return {f"top{k}": float(hits[:, :k].any(dim=1).float().mean()) for k in ks}


def zero_shot_scores(
    clip: ClipModel, images: Sequence[Image.Image], classes: Sequence[str], templates: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """[images, classes] cosine similarities and scores of the zero-shot classifier, built as the
    service builds it (clipserve/contract/scoring.py: prompts, class vectors, the model's scoring rule: a softmax
    over the classes for CLIP, an independent sigmoid per class for SigLIP)."""
    clip.model.eval()
    device = next(clip.model.parameters()).device
    vectors = class_vectors(clip, list(classes), list(templates), device).float().cpu()
    similarity = (encode_images(clip, images) @ vectors.T).numpy()
    return similarity, clip.scoring.probabilities(similarity)


def zero_shot(
    clip: ClipModel,
    images: Sequence[Image.Image],
    labels: Sequence[int],
    classes: Sequence[str],
    templates: Sequence[str],
    ks: Sequence[int] = (1, 5),
) -> dict[str, float]:
    """Top-k accuracy of classifying each image among `classes`, each class a mean of its templates."""
    # ranked by similarity: the scores' order, without float32 ties among vanishing probabilities
    similarity, _ = zero_shot_scores(clip, images, classes, templates)
    return topk_accuracy(torch.from_numpy(similarity), torch.tensor(list(labels)), ks)


def recall_at_k(image: torch.Tensor, text: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Pairs are row-aligned: image i goes with text i."""
    similarity = image @ text.T
    targets = torch.arange(image.shape[0])
    results = {}
    for direction, scores in (("image_to_text", similarity), ("text_to_image", similarity.T)):
        ranked = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
        hits = ranked == targets[:, None]
        for k in ks:
            results[f"{direction}_R@{k}"] = float(hits[:, :k].any(dim=1).float().mean())
    return results


def retrieval(clip: ClipModel, images: Sequence[Image.Image], captions: Sequence[str]) -> dict[str, float]:
    clip.model.eval()
    return recall_at_k(encode_images(clip, images), encode_texts(clip, captions))


def _example_inputs(clip: ClipModel) -> tuple[torch.Tensor, torch.Tensor]:
    height, width = clip.preprocess_cfg["size"]
    pixels = torch.randn(1, 3, int(height), int(width))
    tokens = clip.tokenizer(["a red circle and a blue square"])
    return pixels, tokens


@torch.no_grad()
def gflops(clip: ClipModel) -> dict[str, float]:
    """Forward GFLOPs for one image and one text at full context (FLOPs = 2 x multiply-adds)."""
    model = clip.model.eval().cpu()
    pixels, tokens = _example_inputs(clip)
    result = {}
    # The counter's module tracker cannot follow a parameter that requiring grad enters a module as
    # its input (SigLIP's attention-pool latent): count with gradients off, then restore them.
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.requires_grad_(False)
    try:
        for tower, module, example in (
            ("image", ImageTower(model), pixels),
            ("text", WholeTextTower(model), tokens),
        ):
            counter = FlopCounterMode(display=False)
            with counter:
                module(example)
            result[tower] = counter.get_total_flops() / 1e9
    finally:
        for parameter in trainable:
            parameter.requires_grad_(True)
    return result


def onnx_latency(clip: ClipModel, repeats: int = 30, threads: int = 1, warmup: int = 20) -> dict[str, float]:
    """Median ONNX Runtime milliseconds per tower, batch 1, on CPU with `threads` intra-op threads, of
    the graphs a bundle of this model holds (export/), fed as the service feeds them: a text graph
    of dynamic length gets the text's own tokens, not the padding."""
    import onnxruntime as ort

    from clipserve.export.exporter import IMAGE_INPUT, TEXT_INPUT, export_tower_graphs
    from clipserve.export.verify import token_counts

    pixels, tokens = _example_inputs(clip)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    latency = {}
    with tempfile.TemporaryDirectory() as tmp:
        graphs = export_tower_graphs(clip.model, Path(tmp), tokenizer=clip.tokenizer)
        ids = tokens.numpy().astype(np.int64)
        if graphs.text_length_free:
            ids = ids[:, : int(token_counts(ids).max())]
        for tower, path, feed in (
            ("image", graphs.image, {IMAGE_INPUT: pixels.numpy()}),
            ("text", graphs.text, {TEXT_INPUT: ids}),
        ):
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            for _ in range(warmup):
                session.run(None, feed)
            times = []
            for _ in range(repeats):
                begin = time.perf_counter()
                session.run(None, feed)
                times.append((time.perf_counter() - begin) * 1000)
            latency[tower] = statistics.median(times)
    return latency


@dataclass
class ModelReport:
    role: str
    name: str
    accuracy: dict[str, float] = field(default_factory=dict)
    parameters: dict[str, int] = field(default_factory=dict)
    gflops: dict[str, float] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)


def describe_model(
    role: str, clip: ClipModel, accuracy: dict[str, float], latency: bool = True, repeats: int = 30
) -> ModelReport:
    return ModelReport(
        role=role,
        name=clip.architecture,
        accuracy=accuracy,
        parameters=clip.parameter_counts(),
        gflops=gflops(clip),
        latency_ms=onnx_latency(clip, repeats=repeats) if latency else {},
    )


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if value < 10 else f"{value:.1f}"
    if isinstance(value, int):
        return f"{value / 1e6:.2f}M" if value >= 1e5 else str(value)
    return str(value)


def markdown_report(reports: Sequence[ModelReport], title: str = "Evaluation") -> str:
    metrics = sorted({k for r in reports for k in r.accuracy})
    header = ["role", "model", *metrics, "params image", "params text", "GFLOPs image", "GFLOPs text"]
    header += ["ORT ms image", "ORT ms text"]
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in reports:
        row = [r.role, r.name, *[_fmt(r.accuracy.get(m, "")) for m in metrics]]
        row += [_fmt(r.parameters.get("image", "")), _fmt(r.parameters.get("text", ""))]
        row += [_fmt(r.gflops.get("image", "")), _fmt(r.gflops.get("text", ""))]
        row += [_fmt(r.latency_ms.get("image", "")), _fmt(r.latency_ms.get("text", ""))]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def write_report(
    reports: Sequence[ModelReport], out_dir: Path, title: str = "Evaluation"
) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "report.json", out_dir / "report.md"
    json_path.write_text(json.dumps([asdict(r) for r in reports], indent=2) + "\n")
    md_path.write_text(markdown_report(reports, title))
    return json_path, md_path
