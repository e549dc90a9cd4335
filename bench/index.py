"""Indexing benchmark: images/s of `clip-index` against the raw decode + preprocess + ONNX Runtime loop
on the same cores, in one run; then the same job on a two-node Ray cluster started on this machine.

For each model (random-init bundles exported with `clip-export`, reused when already there: ViT-B-32,
and the demo student's architecture, training/configs/shapes-student.json):

1. raw: one loop over the corpus, batch by batch: read, decode + preprocess (the service's
   `ImagePreprocessor`), the image tower in ONNX Runtime with one thread per core, L2-normalize;
   measured before and after clip-index, and the mean of the two taken as the reference;
2. clip-index on a local Ray with the machine's cores, into clip-retrieval files: its rate over the
   job (Ray's start and the listing left out, shown apart), and the ratio to raw;
3. (--cluster) `ray start --head` and `ray start --address` on this machine, one core each, the same
   job through `--ray-address`: its rate, the items and rate of each node, and whether the files hold
   the same vectors as the local run's.

The corpus is photo-like 640x480 JPEGs. Figures are printed, never asserted; on a shared machine,
compare the ratios of one run, not figures across runs. Of clip-index's two rates, the whole job's
counts the workers' start and the model's load (low on a short job) and the one after the first
shard counts shards decoded during that load as if they were free (high on a short job): give a
corpus long enough for the two to meet (`--images`).

    python bench/index.py --quick                  # the student, 512 images, no cluster (~2 min)
    python bench/index.py                          # ViT-B-32 (384 images) and the student (4,096), cluster
    python bench/index.py --models student --images 8192 --batch-size 64
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench_common import cpu_name, photo  # noqa: E402

from clipserve.contract.bundle import Bundle, ModelRepository  # noqa: E402
from clipserve.contract.cli_settings import usable_cores, validated  # noqa: E402

BIN = Path(sys.executable).parent
# export arguments, corpus size, shard size: several shards per job, so decoding overlaps inference
MODELS = {
    "vitb32": (["--model", "ViT-B-32"], 384, 64),
    "student": (["--config", str(ROOT / "training" / "configs" / "shapes-student.json")], 4096, 256),
}


def write_corpus(folder: Path, count: int) -> None:
    """`count` JPEGs, made from 64 distinct pictures (making each costs more than indexing it)."""
    folder.mkdir(parents=True, exist_ok=True)
    pictures = [photo(seed) for seed in range(min(64, count))]
    for i in range(count):
        (folder / f"{i:06d}.jpg").write_bytes(pictures[i % len(pictures)])


def ensure_bundle(repo: Path, name: str, export_args: list[str]) -> Bundle:
    repository = ModelRepository(repo)
    if name not in repository.models():
        print(f"exporting {name} (random init) into {repo} ...", flush=True)
        command = [
            sys.executable, "-m", "clipserve.export.cli", *export_args, "--pretrained", "none",
            "--name", name, "--models-dir", str(repo), "--quiet",
        ]  # fmt: skip
        subprocess.run(command, check=True, cwd=ROOT)
    return repository.load(name)


def raw_rate(repo: Path, name: str, corpus: Path, batch: int, threads: int) -> float:
    """Images/s of the plain loop: read, decode + preprocess, infer, normalize, one batch at a time."""
    from clipserve.service.inference.bulk import BulkEncoder, bulk_settings

    encoder = BulkEncoder.load(repo, name, threads=threads, batch_size=batch, settings=bulk_settings())
    paths = sorted(corpus.glob("*.jpg"))
    encoder.encode_images([p.read_bytes() for p in paths[:batch]])  # warm-up
    started = time.perf_counter()
    for start in range(0, len(paths), batch):
        data = [p.read_bytes() for p in paths[start : start + batch]]
        encoder.encode_prepared_images(encoder.inputs.prepare_images(data))
    seconds = time.perf_counter() - started
    encoder.close()
    return len(paths) / seconds


def index_settings(**values: object):
    from clipserve.index.settings import IndexSettings

    return validated(IndexSettings, {k: str(v) if isinstance(v, Path) else v for k, v in values.items()})


@dataclass
class IndexRun:
    rate: float
    steady_rate: float | None
    seconds: float
    wall_seconds: float
    placement: str
    nodes: dict[str, tuple[int, float]]


def local_rate(repo: Path, name: str, corpus: Path, output: Path, args: argparse.Namespace) -> IndexRun:
    from clipserve.index.cli import run_index

    summary = run_index(
        index_settings(
            source=corpus, model=name, models_dir=repo, output=output, shard_size=args.shard_size,
            batch_size=args.batch_size, num_cpus=args.cores, threads_per_actor=args.threads_per_actor,
            progress="off",
        )
    )  # fmt: skip
    return IndexRun(
        summary.rate,
        summary.steady_rate,
        summary.seconds,
        summary.wall_seconds,
        summary.placement,
        summary.nodes,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ray_node(args: list[str], cpus: int) -> subprocess.Popen:
    ports = [
        "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
        "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port()),
    ]  # fmt: skip
    return subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--block",
            "--num-cpus",
            str(cpus),
            "--disable-usage-stats",
            *ports,
            *args,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def wait_for_nodes(address: str, count: int) -> None:
    probe = "import ray,sys; ray.init(address=sys.argv[1], logging_level='ERROR'); print(sum(n['Alive'] for n in ray.nodes()))"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        result = subprocess.run(
            [sys.executable, "-c", probe, address], capture_output=True, text=True, timeout=120
        )
        if result.stdout.strip().splitlines()[-1:] == [str(count)]:
            return
        time.sleep(1)
    raise RuntimeError(f"the Ray cluster did not reach {count} nodes")


def cluster_run(repo: Path, name: str, corpus: Path, output: Path, args: argparse.Namespace) -> str:
    """The same job on two nodes started here (each with half the cores); clip-index's own summary."""
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    port = free_port()
    per_node = max(1, args.cores // 2)
    # every node and driver on loopback addresses: Ray rewrites 127.0.0.1 into the machine's address
    address = f"127.0.0.2:{port}"
    head = ray_node(
        ["--head", "--port", str(port), "--node-ip-address", "127.0.0.1", "--include-dashboard", "false",
         "--temp-dir", temp_dir,],
        per_node,
    )  # fmt: skip
    nodes = [head]
    try:
        wait_for_nodes(address, 1)
        nodes.append(ray_node(["--address", address, "--node-ip-address", "127.0.0.2"], per_node))
        wait_for_nodes(address, 2)
        command = [
            str(BIN / "clip-index"), str(corpus), "--model", name, "--models-dir", str(repo), "--output", str(output),
            "--ray-address", address, "--shard-size", str(args.shard_size), "--batch-size", str(args.batch_size),
            "--threads-per-actor", str(per_node), "--progress", "off",
        ]  # fmt: skip
        print("  $ " + " ".join(command[1:]), flush=True)
        result = subprocess.run(command, capture_output=True, text=True, timeout=3600)
        if result.returncode != 0:
            raise RuntimeError(result.stderr[-2000:])
        return result.stdout
    finally:
        for node in nodes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGTERM)
        for node in nodes:
            try:
                node.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


def same_vectors(first: Path, second: Path) -> str:
    a = sorted((first / "img_emb").glob("*.npy"))
    b = sorted((second / "img_emb").glob("*.npy"))
    if [p.name for p in a] != [p.name for p in b]:
        return "different shard files"
    worst = min(float(np.min(np.sum(np.load(x) * np.load(y), axis=1))) for x, y in zip(a, b, strict=True))
    return f"same files, min cosine {worst:.6f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="vitb32,student", help="of: " + ", ".join(MODELS))
    parser.add_argument("--repo", type=Path, default=ROOT / "runs" / "bench-models")
    parser.add_argument("--images", type=int, default=None, help="corpus size (default: per model)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--shard-size", type=int, default=None, help="default: per model (64 ViT-B-32, 256 student)"
    )
    parser.add_argument("--cores", type=int, default=usable_cores())
    parser.add_argument("--threads-per-actor", type=int, default=None, help="default: --cores")
    parser.add_argument("--no-cluster", action="store_true", help="skip the two-node run")
    parser.add_argument("--quick", action="store_true", help="the student, 512 images, no cluster")
    args = parser.parse_args()
    if args.quick:
        args.models, args.images, args.no_cluster = "student", args.images or 512, True
    args.threads_per_actor = args.threads_per_actor or args.cores
    shard_size = args.shard_size
    import onnxruntime
    import ray

    print(
        f"machine: {cpu_name()}, {args.cores} cores used of {os.cpu_count()}; onnxruntime {onnxruntime.__version__}, "
        f"ray {ray.__version__}, python {platform.python_version()}\n"
        f"command: {' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}\n"
        f"inputs: 640x480 JPEGs, batch {args.batch_size}, shards of {shard_size or 'a size per model'}, "
        f"clip-index actors with {args.threads_per_actor} threads",
        flush=True,
    )
    rows = []
    for key in args.models.split(","):
        export_args, default_count, default_shard = MODELS[key]
        args.shard_size = shard_size or default_shard
        bundle = ensure_bundle(args.repo, f"bench-{key}", export_args)
        count = args.images or default_count
        with tempfile.TemporaryDirectory(prefix="clip-index-bench-") as tmp:
            corpus = Path(tmp) / "corpus"
            write_corpus(corpus, count)
            print(f"\n{bundle.ref}: {count} images", flush=True)
            raw = raw_rate(args.repo, bundle.manifest.name, corpus, args.batch_size, args.cores)
            print(f"  raw loop          {raw:8.1f} images/s", flush=True)
            run = local_rate(args.repo, bundle.manifest.name, corpus, Path(tmp) / "local", args)
            # the raw loop again after, so that a change of the machine's load shows (and averages out)
            raw_after = raw_rate(args.repo, bundle.manifest.name, corpus, args.batch_size, args.cores)
            print(f"  raw loop, after   {raw_after:8.1f} images/s", flush=True)
            raw = (raw + raw_after) / 2
            steady = run.steady_rate or run.rate
            print(
                f"  clip-index local  {steady:8.1f} images/s after the first shard ({steady / raw:.2f}x raw); "
                f"{run.rate:.1f} over the whole job ({run.rate / raw:.2f}x: {run.seconds:.1f} s, with the workers' "
                f"start and the model's load; {run.wall_seconds:.1f} s with Ray's own start); {run.placement}",
                flush=True,
            )
            rows.append((key, count, raw, steady, run.rate))
            if not args.no_cluster:
                ray.shutdown()  # the cluster's driver is another process
                output = cluster_run(args.repo, bundle.manifest.name, corpus, Path(tmp) / "cluster", args)
                for line in output.splitlines():
                    if line.strip().startswith(("rate", "node", "ran on")):
                        print(f"  two nodes: {line.strip()}", flush=True)
                print(
                    f"  two nodes vs local: {same_vectors(Path(tmp) / 'local', Path(tmp) / 'cluster')}",
                    flush=True,
                )
        ray.shutdown()
    print(
        "\nmodel     images   raw img/s   clip-index img/s (steady / whole job)   ratio (steady / whole job)"
    )
    for key, count, raw, steady, rate in rows:
        print(
            f"{key:<9} {count:>6}   {raw:9.1f}   {steady:14.1f} / {rate:9.1f}   {steady / raw:14.2f} / {rate / raw:4.2f}"
        )


if __name__ == "__main__":
    main()
