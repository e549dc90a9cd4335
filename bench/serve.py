"""Serving benchmark: a real `clip-serve` under load, against raw ONNX Runtime in the same run.

For each model (random-init bundles exported with `clip-export`, reused when already there):

1. raw ONNX Runtime image tower throughput at batch sizes 1..32 (best one kept), with and without
   preprocessing of the same JPEGs, with the server's thread count;
2. the server (a `clip-serve` subprocess, Redis for its cache) under closed-loop load at concurrency
   1, 8 and 32, one image (640x480 JPEG) or one text per request: req/s and p50/p95/p99;
3. `/v1/classify` against a stored 1000-label set vs `/v1/embed` of one image, sequential medians.

Figures are printed, never asserted. The load generator runs on the same machine as the server
and takes some of its CPU: the served/raw ratio is a lower bound.

    python bench/serve.py                 # ViT-B-32 and MobileCLIP2-S0 (several minutes on 2 cores)
    python bench/serve.py --quick         # tiny model, concurrency 1 and 8: proves the pipeline works
    python bench/serve.py --models vitb32 --providers cuda --precision fp16 --concurrency 64   # a GPU
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench_common import cpu_name, photo  # noqa: E402

from clipserve.contract.bundle import Bundle, ModelRepository  # noqa: E402
from clipserve.contract.cli_settings import usable_cores  # noqa: E402
from clipserve.service.inference.preprocess import ImagePreprocessor  # noqa: E402
from clipserve.service.runtime import RuntimeOptions, open_runtime  # noqa: E402

FULL_MODELS = {"vitb32": ["--model", "ViT-B-32"], "mobileclip2-s0": ["--model", "MobileCLIP2-S0"]}
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
TEXTS = [
    "a photo of a dog on the beach",
    "a red car parked in front of a house",
    "two people playing chess",
    "a bowl of ramen with an egg",
    "a diagram of a transformer network",
    "snow on the mountains at dusk",
]


def ensure_bundle(repo: Path, name: str, export_args: list[str]) -> Bundle:
    repository = ModelRepository(repo)
    if name not in repository.models():
        print(f"exporting {name} (random init) into {repo} ...", flush=True)
        command = [
            sys.executable,
            "-m",
            "clipserve.export.cli",
            *export_args,
            "--pretrained",
            "none",
            "--name",
            name,
            "--models-dir",
            str(repo),
            "--quiet",
        ]
        subprocess.run(command, check=True, cwd=ROOT)
    return repository.load(name)


@dataclass
class RawResult:
    best_batch: int
    images_per_s: float
    with_preprocess_per_s: float


def measure_raw(
    bundle: Bundle, args: argparse.Namespace, images: list[bytes], batches: list[int], seconds: float
) -> RawResult:
    threads, draft_margin = args.threads, args.jpeg_draft_margin
    options = RuntimeOptions(providers=tuple(args.providers.split(",")), intra_op_threads=threads)
    runtime = open_runtime(bundle.file_path("image", args.precision), options)
    preprocessor = ImagePreprocessor(bundle.manifest.image, max_pixels=10**9, draft_margin=draft_margin)
    pixels = np.stack([preprocessor(images[i % len(images)]) for i in range(max(batches))])
    best = (0, 0.0)
    for batch in batches:
        runtime.run(pixels[:batch])
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            runtime.run(pixels[:batch])
            done += batch
        rate = done / (time.perf_counter() - started)
        print(f"  raw ORT image tower, batch {batch:>2}: {rate:8.1f} img/s", flush=True)
        best = max(best, (batch, rate), key=lambda item: item[1])
    batch = best[0]
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        tensors = np.stack([preprocessor(images[(done + i) % len(images)]) for i in range(batch)])
        runtime.run(tensors)
        done += batch
    with_pre = done / (time.perf_counter() - started)
    print(f"  raw ORT with preprocessing, batch {batch}: {with_pre:8.1f} img/s", flush=True)
    return RawResult(batch, best[1], with_pre)


def wait_ready(
    process: subprocess.Popen,
    log: IO[str],
    base: str,
    timeout_s: float,
    poll_s: float = 0.1,
    path: str = "/readyz",
) -> float:
    """Seconds until the server at `base` answers 200 on `path`; its log in the error when it exits first."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout_s:
        if process.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"clip-serve exited:\n{log.read()}")
        try:
            if httpx.get(f"{base}{path}", timeout=2).status_code == 200:
                return time.perf_counter() - started
        except httpx.HTTPError:
            pass
        time.sleep(poll_s)
    raise RuntimeError("clip-serve did not become ready")


class Server:
    def __init__(self, repo: Path, name: str, args: argparse.Namespace, port: int):
        self.base = f"http://127.0.0.1:{port}"
        threads, redis_url, draft_margin = args.threads, args.redis_url, args.jpeg_draft_margin
        env = {
            **os.environ,
            "CLIPSERVE_PROVIDERS": args.providers,
            "CLIPSERVE_PRECISION": args.precision,
            "CLIPSERVE_MODELS": name,
            "CLIPSERVE_INTRA_OP_THREADS": str(threads),
            "CLIPSERVE_PREPROCESS_WORKERS": str(threads),
            "CLIPSERVE_REDIS_URL": redis_url,
            "CLIPSERVE_RELOAD_POLL_S": "0",
            "CLIPSERVE_JPEG_DRAFT_MARGIN": str(draft_margin),
            "CLIPSERVE_LOG_LEVEL": "WARNING",
        }
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed in stop())
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "clipserve.service.server.cli",
                "--models-dir",
                str(repo),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            env=env,
            cwd=ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout_s: float = 300) -> float:
        return wait_ready(self.process, self.log, self.base, timeout_s)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)
        self.log.close()

    def rss_mb(self) -> float:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS")) / 1024


@dataclass
class LoadResult:
    kind: str
    concurrency: int
    requests: int
    seconds: float
    latencies: list[float]
    failures: int

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) * 1000


def text_bodies(run: int, count: int) -> list[dict]:
    return [{"texts": [f"{TEXTS[i % len(TEXTS)]} #{run}-{i}"]} for i in range(count)]


async def run_load(base: str, kind: str, bodies: list[dict], concurrency: int, total: int) -> LoadResult:
    latencies: list[float] = []
    failures = 0
    counter = iter(range(total))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
        await client.post("/v1/embed", json=bodies[0])

        async def worker() -> None:
            nonlocal failures
            for n in counter:
                started = time.perf_counter()
                response = await client.post("/v1/embed", json=bodies[n % len(bodies)])
                latencies.append(time.perf_counter() - started)
                failures += response.status_code != 200

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    return LoadResult(kind, concurrency, total, seconds, latencies, failures)


def classify_vs_embed(base: str, image: str, labels: int, rounds: int) -> tuple[float, float, float]:
    with httpx.Client(base_url=base, timeout=600) as client:
        started = time.perf_counter()
        put = client.put(
            "/v1/labelsets/bench-1000",
            json={"labels": [f"object class {i}" for i in range(labels)], "templates": ["a photo of a {}."]},
        )
        while put.status_code == 202 or put.json().get("status") == "building":
            time.sleep(1)
            put = client.get("/v1/labelsets/bench-1000")
        build_s = time.perf_counter() - started
        classify_body = {"images": [image], "labelset": "bench-1000", "top_k": 5}
        embed_body = {"images": [image]}
        client.post("/v1/classify", json=classify_body)
        embed_ms, classify_ms = [], []
        for _ in range(rounds):
            for body, path, out in (
                (embed_body, "/v1/embed", embed_ms),
                (classify_body, "/v1/classify", classify_ms),
            ):
                started = time.perf_counter()
                assert client.post(path, json=body).status_code == 200
                out.append((time.perf_counter() - started) * 1000)
        client.delete("/v1/labelsets/bench-1000")
    return statistics.median(embed_ms), statistics.median(classify_ms), build_s


def bench_model(args: argparse.Namespace, repo: Path, name: str, export_args: list[str], port: int) -> dict:
    if args.precision != "fp32":
        name, export_args = f"{name}-{args.precision}", [*export_args, f"--{args.precision}"]
    bundle = ensure_bundle(repo, name, export_args)
    images = [photo(seed) for seed in range(8)]
    print(f"\n== {name}: image {bundle.manifest.image.size}, dim {bundle.manifest.embed_dim}", flush=True)
    raw = measure_raw(bundle, args, images, args.batches, args.raw_seconds)
    server = Server(repo, name, args, port)
    try:
        start_s = server.wait_ready()
        image_bodies = [{"images": [base64.b64encode(data).decode()]} for data in images]
        results = []
        for kind in ("image", "text"):
            for concurrency in args.concurrency:
                total = max(args.requests, concurrency * 4)
                # Texts never repeat across runs, so every text request reaches the encoder, not the cache.
                bodies = image_bodies if kind == "image" else text_bodies(concurrency, total)
                result = asyncio.run(run_load(server.base, kind, bodies, concurrency, total))
                results.append(result)
                print(
                    f"  served {kind:5} c={concurrency:>2}: {result.rate:7.1f} req/s  p50 {result.percentile(50):7.1f}"
                    f"  p95 {result.percentile(95):7.1f}  p99 {result.percentile(99):7.1f} ms"
                    f"  failures {result.failures}",
                    flush=True,
                )
        embed_ms, classify_ms, build_s = classify_vs_embed(
            server.base, image_bodies[0]["images"][0], 1000, args.rounds
        )
        rss = server.rss_mb()
    finally:
        server.stop()
    served = max(r.rate for r in results if r.kind == "image")
    return {
        "model": name,
        "start_s": start_s,
        "rss_mb": rss,
        "raw": raw,
        "served_img_s": served,
        "ratio": served / raw.images_per_s,
        "ratio_with_pre": served / raw.with_preprocess_per_s,
        "embed_ms": embed_ms,
        "classify_ms": classify_ms,
        "labelset_build_s": build_s,
        "results": results,
    }


def report(rows: list[dict], args: argparse.Namespace) -> None:
    import onnxruntime

    print("\n" + "=" * 100)
    print(
        f"machine: {cpu_name()}, {usable_cores()} cores; onnxruntime {onnxruntime.__version__}; providers "
        f"{args.providers}, {args.precision}; server threads {args.threads}; JPEG draft margin {args.jpeg_draft_margin}; inputs: 640x480 JPEG per image request, "
        "one short text per text request"
    )
    for row in rows:
        raw: RawResult = row["raw"]
        print(f"\n{row['model']}: ready in {row['start_s']:.1f} s, RSS {row['rss_mb']:.0f} MB")
        print(
            f"  raw ORT best batch {raw.best_batch}: {raw.images_per_s:.1f} img/s "
            f"({raw.with_preprocess_per_s:.1f} img/s with preprocessing)"
        )
        print(
            f"  served images: {row['served_img_s']:.1f} img/s -> served/raw {row['ratio']:.2f} "
            f"(vs raw with preprocessing {row['ratio_with_pre']:.2f}; goal >= 0.85)"
        )
        print(
            f"  classify (1000-label set) {row['classify_ms']:.1f} ms vs embed one image {row['embed_ms']:.1f} ms "
            f"-> {row['classify_ms'] / row['embed_ms']:.2f}x (goal <= 1.1x); set built in "
            f"{row['labelset_build_s']:.1f} s"
        )
        print("  kind   conc    req/s    p50 ms    p95 ms    p99 ms  failures")
        for r in row["results"]:
            print(
                f"  {r.kind:5} {r.concurrency:>5} {r.rate:8.1f} {r.percentile(50):9.1f} {r.percentile(95):9.1f}"
                f" {r.percentile(99):9.1f} {r.failures:>9}"
            )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                [
                    {k: v for k, v in row.items() if k not in ("raw", "results")}
                    | {
                        "raw": row["raw"].__dict__,
                        "load": [
                            {
                                "kind": r.kind,
                                "concurrency": r.concurrency,
                                "req_s": r.rate,
                                "p50_ms": r.percentile(50),
                                "p95_ms": r.percentile(95),
                                "p99_ms": r.percentile(99),
                                "failures": r.failures,
                            }
                            for r in row["results"]
                        ],
                    }
                    for row in rows
                ],
                indent=2,
            )
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, concurrency 1 and 8, few requests")
    parser.add_argument("--repo", type=Path, default=ROOT / "runs" / "bench-models")
    parser.add_argument("--threads", type=int, default=usable_cores())
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/12")
    parser.add_argument("--port", type=int, default=8701)
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--jpeg-draft-margin", type=float, default=2.0, help="as CLIPSERVE_JPEG_DRAFT_MARGIN")
    parser.add_argument("--models", nargs="+", choices=sorted(FULL_MODELS), help="a subset of the full run")
    parser.add_argument("--concurrency", nargs="+", type=int, help="load levels instead of 1 8 32")
    parser.add_argument("--providers", default="cpu", help="as CLIPSERVE_PROVIDERS, for raw and served runs")
    parser.add_argument(
        "--precision", choices=["fp32", "fp16", "int8"], default="fp32", help="bundle variant"
    )
    args = parser.parse_args(argv)
    levels = args.concurrency
    if args.quick:
        config = Path(tempfile.mkdtemp()) / "tiny.json"
        config.write_text(json.dumps(TINY_CONFIG))
        models = {"bench-tiny": ["--config", str(config)]}
        args.concurrency, args.requests, args.rounds = [1, 8], 24, 10
        args.batches, args.raw_seconds = [1, 8], 0.5
    else:
        models = {name: FULL_MODELS[name] for name in args.models or FULL_MODELS}
        args.concurrency, args.requests, args.rounds = [1, 8, 32], 200, 30
        args.batches, args.raw_seconds = [1, 2, 4, 8, 16, 32], 5.0
    args.concurrency = levels or args.concurrency
    rows = [
        bench_model(args, args.repo, name, export_args, args.port + i)
        for i, (name, export_args) in enumerate(models.items())
    ]
    report(rows, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
