"""Export benchmark: export time, ONNX Runtime vs torch latency per tower and batch, int8 speed-up.

    python bench/export.py                       # ViT-B-32, MobileCLIP2-S0, ViT-B-16-SigLIP; batches 1, 8, 32
    python bench/export.py --quick               # tiny models (CLIP and SigLIP-family), to check it runs
    python bench/export.py --models ViT-B-16-SigLIP --batches 1 8 --repeats 10 --threads 2

Random-init weights (no downloads). A model with a Hugging Face tokenizer (SigLIP, CLIPA, ...) gets a
tokenizer of its vocabulary size trained here (`tests.fixtures.local_tokenizers`), and its bundle adds the
tokenizer throughput of the served path (`tokenizers`, Rust) against open_clip's HFTokenizer
(transformers). Figures are printed, never asserted. Latency is the median of `--repeats` timed runs
after one warm-up run. "ORT gain" is torch ms / ORT fp32 ms; "int8 gain" is ORT fp32 ms / ORT int8 ms.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import open_clip
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clipserve.contract.bundle import Bundle, ModelSource
from clipserve.contract.tokenizer import load_tokenizer
from clipserve.export.exporter import export_bundle
from clipserve.export.sources import hf_tokenizer_name, load_model, model_from_config
from clipserve.export.verify import fixed_token_ids, make_session, token_counts
from tests.fixtures.local_tokenizers import build_tokenizer, corpus

QUICK_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
QUICK_SIGLIP_CONFIG = {
    "embed_dim": 32,
    "init_logit_bias": -10,
    "custom_text": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {
        "context_length": 64,
        "vocab_size": 1024,
        "tokenizer_kwargs": {"clean": "canonicalize"},
        "width": 64,
        "heads": 2,
        "layers": 2,
        "no_causal_mask": True,
        "proj_bias": True,
        "pool_type": "last",
    },
}
CAPTIONS = (
    "a photo of a dog",
    "a diagram of the water cycle",
    "two people riding bicycles in the rain",
    "a red car",
    "a bowl of ramen with chopsticks",
    "the skyline of a city at night",
)


def median_ms(run: Callable[[], object], repeats: int) -> float:
    run()
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        timings.append((time.perf_counter() - started) * 1000)
    return statistics.median(timings)


def machine() -> str:
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime {ort.__version__}, "
        f"open_clip {open_clip.__version__}, python {platform.python_version()}"
    )


def _export(
    model: torch.nn.Module, name: str, root: Path, source: ModelSource | None, tokenizer: Path | None
) -> tuple[Bundle, float]:
    started = time.perf_counter()
    bundle = export_bundle(
        model,
        root,
        name,
        source=source or ModelSource(architecture=name, pretrained="none"),
        int8=True,
        min_cosine={"int8": 0.5},
        progress=True,
        tokenizer=tokenizer,
    )
    return bundle, time.perf_counter() - started


def _captions(bundle: Bundle, count: int) -> np.ndarray:
    texts = [CAPTIONS[i % len(CAPTIONS)] for i in range(count)]
    if bundle.manifest.tokenizer.kind == "hf":
        return load_tokenizer(bundle.manifest.tokenizer, bundle.path).encode(texts).ids
    return fixed_token_ids(bundle.manifest.tokenizer.context_length, texts)


def local_tokenizer(architecture: str, model_cfg: dict, folder: Path) -> Path | None:
    """A tokenizer of the model's vocabulary size in the style of its family, trained here; None for
    CLIP BPE."""
    if hf_tokenizer_name(model_cfg) is None:
        return None
    text_cfg = model_cfg["text_cfg"]
    if "vocab_size" not in text_cfg:
        raise SystemExit(f"{architecture} has a Hugging Face text model: its config.json comes from the hub")
    name = architecture.lower()
    style = (
        "gemma"
        if "siglip2" in name
        else "t5"
        if "siglip" in name
        else "bert"
        if "clipa" in name
        else "xlm-roberta"
    )
    return build_tokenizer(
        folder / f"{architecture}-tokenizer", style, vocab_size=int(text_cfg["vocab_size"])
    )


def bench_tokenizers(bundle: Bundle, count: int = 4000, batch: int = 64) -> None:
    """Texts per second through the served tokenizer and open_clip's HFTokenizer, same texts."""
    from open_clip.tokenizer import HFTokenizer

    spec = bundle.manifest.tokenizer
    texts = corpus(count, seed=1)
    served = load_tokenizer(spec, bundle.path)
    reference = HFTokenizer(
        bundle.manifest.source.tokenizer, context_length=spec.context_length, clean=spec.clean
    )
    assert np.array_equal(served.encode(texts[:256]).ids, reference(texts[:256]).numpy())

    def run(encode: Callable[[list[str]], object]) -> float:
        started = time.perf_counter()
        for start in range(0, count, batch):
            encode(texts[start : start + batch])
        return count / (time.perf_counter() - started)

    run(served.encode), run(reference)  # warm-up
    ours = statistics.median(run(served.encode) for _ in range(3))
    theirs = statistics.median(run(reference) for _ in range(3))
    print(
        f"tokenizer ({count} texts, batches of {batch}, same ids): tokenizers path {ours:,.0f} texts/s, "
        f"open_clip HFTokenizer {theirs:,.0f} texts/s ({ours / theirs:.2f}x)"
    )


def bench_model(
    label: str,
    model: torch.nn.Module,
    batches: list[int],
    repeats: int,
    threads: int,
    root: Path,
    source: ModelSource | None = None,
    tokenizer: Path | None = None,
) -> None:
    print(f"\n== {label}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    bundle, seconds = _export(model, label.replace("/", "-"), root, source, tokenizer)
    manifest = bundle.manifest
    print(
        f"export (fp32 + int8 + parity checks): {seconds:.1f} s; tokenizer {manifest.tokenizer.kind}, "
        f"scoring {manifest.scoring}, {manifest.image.resize_mode} resize"
    )
    for report in bundle.manifest.parity:
        print(f"  parity {report.file:<18} min cosine {report.min_cosine:.6f}  mean {report.mean_cosine:.6f}")
    sessions = {
        precision: {
            tower: make_session(bundle.file_path(tower, precision), threads=threads)
            for tower in ("image", "text")
        }
        for precision in ("fp32", "int8")
    }
    height, width = bundle.manifest.image.size
    context = bundle.manifest.tokenizer.context_length
    if manifest.tokenizer.kind == "hf":
        bench_tokenizers(bundle)
    print(
        f"{'tower':<6} {'batch':>5} {'torch ms':>10} {'ORT ms':>10} {'ORT int8':>10} "
        f"{'ORT gain':>10} {'int8 gain':>10}  note"
    )
    for batch in batches:
        images = np.random.default_rng(batch).standard_normal((batch, 3, height, width), dtype=np.float32)
        _row(
            "image",
            batch,
            repeats,
            lambda x=images: model.encode_image(torch.from_numpy(x)),
            {p: s["image"] for p, s in sessions.items()},
            "pixel_values",
            images,
            "",
        )
        ids = _captions(bundle, batch)
        trimmed = np.ascontiguousarray(ids[:, : int(token_counts(ids).max())])
        _row(
            "text",
            batch,
            repeats,
            lambda x=ids: model.encode_text(torch.from_numpy(x)),
            {p: s["text"] for p, s in sessions.items()},
            "input_ids",
            ids,
            f"all padded to {context}",
        )
        if bundle.manifest.text.dynamic_length:
            _row(
                "text",
                batch,
                repeats,
                lambda x=ids: model.encode_text(torch.from_numpy(x)),
                {p: s["text"] for p, s in sessions.items()},
                "input_ids",
                trimmed,
                f"ORT padded to {trimmed.shape[1]} (dynamic length), torch to {context}",
            )


def _row(
    tower: str,
    batch: int,
    repeats: int,
    torch_run: Callable[[], torch.Tensor],
    sessions: dict[str, ort.InferenceSession],
    input_name: str,
    inputs: np.ndarray,
    note: str,
) -> None:
    with torch.inference_mode():
        torch_ms = median_ms(lambda: F.normalize(torch_run(), dim=-1), repeats)
    fp32_ms = median_ms(lambda: sessions["fp32"].run(None, {input_name: inputs}), repeats)
    int8_ms = median_ms(lambda: sessions["int8"].run(None, {input_name: inputs}), repeats)
    print(
        f"{tower:<6} {batch:>5} {torch_ms:>10.1f} {fp32_ms:>10.1f} {int8_ms:>10.1f} "
        f"{torch_ms / fp32_ms:>9.2f}x {fp32_ms / int8_ms:>9.2f}x  {note}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["ViT-B-32", "MobileCLIP2-S0", "ViT-B-16-SigLIP"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threads",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="threads for torch and ONNX Runtime alike",
    )
    parser.add_argument("--quick", action="store_true", help="tiny model, batches 1 and 4, 2 repeats")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="clipserve-bench-") as folder:
        if args.quick:
            print("quick mode: a tiny random model; the figures only show that the benchmark runs")
            torch.manual_seed(0)
            bench_model("tiny", model_from_config(QUICK_CONFIG), [1, 4], 2, args.threads, Path(folder))
            config = {**QUICK_SIGLIP_CONFIG}
            tokenizer = build_tokenizer(Path(folder) / "tiny-siglip-tokenizer", "t5", vocab_size=1024)
            config["text_cfg"] = {**config["text_cfg"], "hf_tokenizer_name": str(tokenizer)}
            source = ModelSource(architecture="tiny-siglip", pretrained="none", config=config)
            model = model_from_config(config)
            bench_model("tiny-siglip", model, [1, 4], 2, args.threads, Path(folder), source)
            return
        for name in args.models:
            loaded = load_model(name, "none")
            tokenizer = local_tokenizer(name, loaded.source.config or {}, Path(folder))
            bench_model(
                name,
                loaded.model,
                args.batches,
                args.repeats,
                args.threads,
                Path(folder),
                loaded.source,
                tokenizer,
            )


if __name__ == "__main__":
    main()
