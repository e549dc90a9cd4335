"""Raw ONNX Runtime speed of the exported towers before and after fusion (fp32, and int8 dynamic).

    python bench/fusion.py                          # random-init ViT-B-32; images at batch 1 and 16, texts at 1 and 64
    python bench/fusion.py --quick                  # the tiny test model, to check it runs
    python bench/fusion.py --static                 # also static (QDQ, calibrated) int8 against dynamic int8
    python bench/fusion.py --models ViT-B-32 ViT-B-16-SigLIP --image-batch 32 --repeats 9 --threads 2

Both graphs of a model come from the same exporter (`export_tower_graphs`, `fuse=False` and
`fuse=True`), in one process, one ONNX Runtime session each with `--threads` intra-op threads.
Figures are images/s and texts/s from the median of `--repeats` timed runs after one warm-up run
(the graphs compared take turns, run by run);
texts are CLIP captions padded to the batch's longest (the served path for a dynamic-length text
graph). Printed, never asserted: on shared cores the figures are noisy, compare them within one run.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import open_clip
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clipserve.export.exporter import export_tower_graphs
from clipserve.export.fusion import graph_fusions
from clipserve.export.quantize import quantize_int8, quantize_int8_static
from clipserve.export.sources import model_from_config
from clipserve.export.verify import agreement, fixed_images, token_counts

QUICK_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
CAPTIONS = (
    "a photo of a dog",
    "a diagram of the water cycle",
    "two people riding bicycles in the rain on a grey autumn afternoon",
    "a red car",
    "a bowl of ramen with chopsticks",
    "the skyline of a city at night",
    "a close-up photograph of a small green frog sitting on a leaf",
    "an old map",
)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def median_s(runs: Sequence[Callable[[], object]], repeats: int, clock: str = "wall") -> list[float]:
    """Median seconds of each run (wall clock, or CPU time of this process); the runs take turns, so
    load from elsewhere on shared cores falls on all of them alike."""
    now = CLOCKS[clock]
    for run in runs:
        run()
    timings: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for run, spent in zip(runs, timings, strict=True):
            started = now()
            run()
            spent.append(now() - started)
    return [statistics.median(spent) for spent in timings]


def session(path: Path, threads: int, spinning: bool = True) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if not spinning:
        # Idle threads that spin would count as CPU time.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def text_batch(model_name: str | None, batch: int) -> np.ndarray:
    tokenizer = open_clip.get_tokenizer(model_name) if model_name else open_clip.tokenize
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(batch)]
    ids = tokenizer(captions).numpy().astype(np.int64)
    return np.ascontiguousarray(ids[:, : int(token_counts(ids).max())])


def build(name: str | None, quick: bool) -> tuple[torch.nn.Module, tuple[int, int]]:
    torch.manual_seed(0)
    model = model_from_config(QUICK_CONFIG) if quick else open_clip.create_model(name, pretrained=None)
    model.eval()
    size = open_clip.get_model_preprocess_cfg(model)["size"]
    size = (size, size) if isinstance(size, int) else tuple(size)
    return model, size


def bench_model(name: str | None, args: argparse.Namespace, folder: Path) -> None:
    label = name or "tiny test model"
    model, size = build(name, args.quick)
    graphs = {}
    for fused in (False, True):
        out = folder / f"{label}-{'fused' if fused else 'plain'}".replace("/", "_")
        out.mkdir(parents=True)
        started = time.perf_counter()
        exported = export_tower_graphs(model, out, fuse=fused)
        model.eval()
        print(
            f"  exported {'fused' if fused else 'plain'} graphs in {time.perf_counter() - started:.1f}s",
            flush=True,
        )
        graphs[("fused" if fused else "plain", "fp32")] = exported
        if args.int8:
            for tower in ("image", "text"):
                quantize_int8(out / f"{tower}.onnx", out / f"{tower}.int8.onnx")
            graphs[("fused" if fused else "plain", "int8")] = type(exported)(
                out / "image.int8.onnx", out / "text.int8.onnx", exported.text_length_free
            )
    if not graphs[("plain", "fp32")].text_length_free:
        print("  (text graph of fixed length: texts padded to the context)")
    images = {
        b: np.ascontiguousarray(np.resize(fixed_images(*size), (b, 3, *size)).astype(np.float32))
        for b in (1, args.image_batch)
    }
    texts = {b: text_batch(name, b) for b in (1, args.text_batch)}
    if not graphs[("plain", "fp32")].text_length_free:
        context = open_clip.get_tokenizer(name).context_length if name else 77
        texts = {b: np.pad(ids, ((0, 0), (0, context - ids.shape[1]))) for b, ids in texts.items()}

    print(f"\n{label}: fusions (fp32) image {graph_fusions(graphs[('fused', 'fp32')].image)}")
    print(f"{' ' * len(label)}                text  {graph_fusions(graphs[('fused', 'fp32')].text)}")
    header = f"{'graph':<12} {'tower':<6} {'batch':>5} {'plain /s':>10} {'fused /s':>10} {'speed-up':>9} {'min cos':>9}"
    print(header)
    print("-" * len(header))
    for precision in ("fp32", "int8") if args.int8 else ("fp32",):
        plain, fused = graphs[("plain", precision)], graphs[("fused", precision)]
        for tower, inputs in (("image", images), ("text", texts)):
            sessions = [
                session(getattr(g, tower), args.threads, args.clock == "wall") for g in (plain, fused)
            ]
            for batch, batch_inputs in inputs.items():
                feeds = [{s.get_inputs()[0].name: batch_inputs} for s in sessions]
                runs = [lambda s=s, f=f: s.run(None, f) for s, f in zip(sessions, feeds, strict=True)]
                rates = [batch / spent for spent in median_s(runs, args.repeats, args.clock)]
                outputs = [s.run(None, f)[0] for s, f in zip(sessions, feeds, strict=True)]
                cosine = agreement(outputs[0], outputs[1]).min_cosine
                print(
                    f"{precision:<12} {tower:<6} {batch:>5} {rates[0]:>10.1f} {rates[1]:>10.1f} "
                    f"{rates[1] / rates[0]:>8.2f}x {cosine:>9.6f}",
                    flush=True,
                )
    if args.static:
        bench_static(graphs[("fused", "fp32")], images, texts, size, name, args)


def calibration_feeds(size: tuple[int, int], name: str | None, length_free: bool) -> dict[str, list]:
    """Generated calibration inputs, one per run: the parity images and noise; each caption alone."""
    rng = np.random.default_rng(0)
    pictures = np.concatenate([fixed_images(*size), rng.standard_normal((12, 3, *size), dtype=np.float32)])
    ids = text_batch(name, len(CAPTIONS))
    if length_free:
        rows = [row[None, :count] for row, count in zip(ids, token_counts(ids), strict=True)]
    else:
        context = open_clip.get_tokenizer(name).context_length if name else 77
        rows = [np.pad(row, (0, context - len(row)))[None, :] for row in ids]
    return {
        "image": [{"pixel_values": pictures[i : i + 1]} for i in range(len(pictures))],
        "text": [{"input_ids": np.ascontiguousarray(row)} for row in rows],
    }


def bench_static(fused, images: dict, texts: dict, size, name: str | None, args: argparse.Namespace) -> None:
    """fp32 against dynamic and static (QDQ, calibrated) int8, all on the fused graphs."""
    feeds = calibration_feeds(size, name, fused.text_length_free)
    print(
        f"\nint8 kinds on the fused graphs (static: QDQ, per-channel, calibrated on {len(feeds['image'])} generated"
    )
    print(f"images / {len(feeds['text'])} captions; min cos against fused fp32)")
    header = (
        f"{'tower':<6} {'batch':>5} {'fp32 /s':>9} {'dynamic /s':>11} {'static /s':>10} "
        f"{'dyn cos':>9} {'static cos':>10}"
    )
    print(header)
    print("-" * len(header))
    for tower, inputs in (("image", images), ("text", texts)):
        fp32 = getattr(fused, tower)
        dynamic, static = fp32.with_suffix(".int8.onnx"), fp32.with_suffix(".static.onnx")
        if not dynamic.is_file():
            quantize_int8(fp32, dynamic)
        started = time.perf_counter()
        quantize_int8_static(fp32, static, feeds[tower])
        print(f"  ({tower}: calibrated and quantized in {time.perf_counter() - started:.1f}s)", flush=True)
        sessions = [session(p, args.threads, args.clock == "wall") for p in (fp32, dynamic, static)]
        for batch, batch_inputs in inputs.items():
            feed = {sessions[0].get_inputs()[0].name: batch_inputs}
            runs = [lambda s=s, f=feed: s.run(None, f) for s in sessions]
            rates = [batch / spent for spent in median_s(runs, args.repeats, args.clock)]
            outputs = [s.run(None, feed)[0] for s in sessions]
            cosines = [agreement(outputs[0], out).min_cosine for out in outputs[1:]]
            print(
                f"{tower:<6} {batch:>5} {rates[0]:>9.1f} {rates[1]:>11.1f} {rates[2]:>10.1f} "
                f"{cosines[0]:>9.5f} {cosines[1]:>10.5f}",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--models", nargs="+", default=["ViT-B-32"], help="open_clip model names (random init)"
    )
    parser.add_argument("--image-batch", type=int, default=16, help="the larger image batch (besides 1)")
    parser.add_argument("--text-batch", type=int, default=64, help="the larger text batch (besides 1)")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per figure (median)")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="ONNX Runtime intra-op threads"
    )
    parser.add_argument("--no-int8", dest="int8", action="store_false", help="fp32 graphs only")
    parser.add_argument(
        "--static",
        action="store_true",
        help="also static (QDQ) int8 against dynamic int8 on the fused graphs",
    )
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall: items per second; cpu: items per CPU-second of this process (threads do not spin), "
        "steadier than wall time on cores other work shares",
    )
    parser.add_argument("--quick", action="store_true", help="the tiny test model, 2 repeats")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.image_batch, args.text_batch = 2, 4, 8
    torch.set_num_threads(args.threads)
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, onnxruntime {ort.__version__}, "
        f"torch {torch.__version__}, {args.threads} ORT threads; images and texts per {'CPU-' if args.clock == 'cpu' else ''}second "
        f"(median of {args.repeats})",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="clipserve-fusion-bench-") as scratch:
        for name in [None] if args.quick else args.models:
            bench_model(name, args, Path(scratch))


if __name__ == "__main__":
    main()
