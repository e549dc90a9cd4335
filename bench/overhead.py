"""Serving overhead: what the HTTP service costs per request on top of a raw ONNX Runtime loop.

For each model (random-init bundles exported with `clip-export`, reused when already there), in one
run, on the same JPEGs and the same kind of texts:

1. raw loops, per item, with the service's own preprocessing (decode with JPEG draft, resize,
   normalize, `session.run`) or tokenizer (tokenize, `session.run`):
   - one core: one process, one ONNX Runtime thread, batch 1;
   - all cores: one such process per core at once (batch 1, and batch 8 when that is faster);
   - batch-1 latency with the server's thread count (what a request at concurrency 1 is compared to);
2. the server (`clip-serve`, Redis for its cache) under closed-loop load from `wrk` (C, one thread,
   each request built from pre-encoded bodies by a few lines of Lua) at concurrency 1, 8 and 32, one
   image (640x480 JPEG, base64 JSON) or one new text per request;
3. the framework floor: the same text load against the least a FastAPI service can do per request
   (`floor_app`: one route that validates the same JSON body and answers a small JSON document),
   run by uvicorn with as many processes as the server has: no route written with FastAPI can
   serve more requests per second on this machine;
4. served/raw per concurrency, served/floor for texts, per-request overhead at concurrency 1 (served
   p50 minus raw batch-1 latency), the server's peak RSS (VmHWM, summed over its processes) and the
   load generator's CPU.

Figures are printed (and written to --out as JSON and a plot), never asserted. The load generator
shares the machine with the server: its CPU time is printed so that it can be accounted for.

    python bench/overhead.py                          # shapes student and ViT-B-32 (minutes on 2 cores)
    python bench/overhead.py --models shapes --seconds 3
    python bench/overhead.py --models shapes --profile image:8   # also py-spy the server at c=8
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import copy
import json
import multiprocessing as mp
import os
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_common import postgres as throwaway_postgres  # noqa: E402

from bench.serve import TEXTS, cpu_name, ensure_bundle, photo, wait_ready  # noqa: E402
from clipserve.contract.bundle import Bundle  # noqa: E402
from clipserve.contract.cli_settings import usable_cores  # noqa: E402

MODELS = {
    "shapes": ("bench-shapes-student", ["--config", str(ROOT / "training/configs/shapes-student.json")]),
    "vitb32": ("vitb32", ["--model", "ViT-B-32"]),
}
SLOW_MODELS = {"vitb32"}
PRECISION = ["fp32"]  # the bundle variant of this run (--precision), for the raw loops too
WORDS = [
    "dog",
    "cat",
    "car",
    "house",
    "tree",
    "river",
    "city",
    "beach",
    "mountain",
    "bowl",
    "chess",
    "snow",
    "red",
    "blue",
    "small",
    "old",
]


# Raw loops -------------------------------------------------------------------------------------------


def _raw_worker(
    bundle_dir: str, kind: str, threads: int, batch: int, draft: float, precision: str, barrier, commands, out
) -> None:
    """One process: the service's decode/tokenize + session.run, `batch` items per call, for each
    number of seconds taken from `commands` (None ends it)."""
    import numpy as np

    from clipserve.contract.bundle import load_bundle
    from clipserve.contract.tokenizer import ClipTokenizer
    from clipserve.service.inference.preprocess import ImagePreprocessor
    from clipserve.service.runtime import RuntimeOptions, open_runtime

    bundle = load_bundle(bundle_dir, verify=False)
    manifest = bundle.manifest
    if bundle.manifest.file(kind, precision) is None:
        precision = "fp32"  # as the server does when a variant is missing
    runtime = open_runtime(bundle.file_path(kind, precision), RuntimeOptions(intra_op_threads=threads))
    if kind == "image":
        images = [photo(seed) for seed in range(8)]
        preprocess = ImagePreprocessor(manifest.image, max_pixels=10**9, draft_margin=draft)

        def one_call(n: int) -> None:
            rows = [preprocess(images[(n + i) % len(images)]) for i in range(batch)]
            runtime.run(np.stack(rows))
    else:
        tokenizer = ClipTokenizer.from_spec(manifest.tokenizer, bundle.path)
        dynamic = manifest.text.dynamic_length

        def one_call(n: int) -> None:
            texts = [f"{TEXTS[(n + i) % len(TEXTS)]} {os.getpid()}-{n}-{i}" for i in range(batch)]
            ids = tokenizer.encode(texts)
            runtime.run(ids.trimmed() if dynamic else ids.ids)

    for n in range(3):
        one_call(n)
    barrier.wait()
    n = 0
    while (seconds := commands.get()) is not None:
        latencies: list[float] = []
        started, done = time.perf_counter(), 0
        while time.perf_counter() - started < seconds:
            t0 = time.perf_counter()
            one_call(n)
            latencies.append(time.perf_counter() - t0)
            n, done = n + 1, done + 1
        out.put((done * batch, time.perf_counter() - started, statistics.median(latencies)))


class RawLoops:
    """`processes` raw loops in their own processes, models loaded once, measured on demand."""

    def __init__(self, bundle: Bundle, kind: str, processes: int, threads: int, batch: int, draft: float):
        ctx = mp.get_context("spawn")
        self.commands, self.out = ctx.Queue(), ctx.Queue()
        self.barrier = ctx.Barrier(processes)  # kept alive: the children open it while they start
        precision = PRECISION[0]
        worker_args = (
            str(bundle.path),
            kind,
            threads,
            batch,
            draft,
            precision,
            self.barrier,
            self.commands,
            self.out,
        )
        self.procs = [ctx.Process(target=_raw_worker, args=worker_args) for _ in range(processes)]
        for p in self.procs:
            p.start()

    def measure(self, seconds: float) -> tuple[float, float]:
        """(items/s summed over the processes, median call latency in ms), all running at once."""
        for _ in self.procs:
            self.commands.put(seconds)
        results = [self.out.get(timeout=900) for _ in self.procs]
        rate = sum(items / secs for items, secs, _ in results)
        return rate, statistics.median(r[2] for r in results) * 1000

    def close(self) -> None:
        for _ in self.procs:
            self.commands.put(None)
        for p in self.procs:
            p.join()


def raw(bundle: Bundle, kind: str, processes: int, threads: int, batch: int, seconds: float, draft: float):
    """(items/s summed over `processes`, median call latency in ms) of `processes` raw loops at once."""
    loops = RawLoops(bundle, kind, processes, threads, batch, draft)
    try:
        return loops.measure(seconds)
    finally:
        loops.close()


@dataclass
class Raw:
    one_core: float  # items/s, one process, one thread, batch 1
    all_cores: float  # items/s, one process per core (best of batch 1 and 8)
    all_cores_batch: int
    latency_ms: float  # batch-1 latency with the server's threads


def measure_raw(bundle: Bundle, kind: str, args: argparse.Namespace) -> Raw:
    s, d, cores = args.seconds, args.jpeg_draft_margin, args.cores
    one, _ = raw(bundle, kind, 1, 1, 1, s, d)
    best, best_batch = raw(bundle, kind, cores, 1, 1, s, d)[0], 1
    batched = raw(bundle, kind, cores, 1, 8, s, d)[0]
    if batched > best:
        best, best_batch = batched, 8
    _, latency = raw(bundle, kind, 1, args.threads, 1, s, d)
    result = Raw(one, best, best_batch, latency)
    print(
        f"  raw {kind:5}: 1 core {one:8.1f}/s | {cores} cores {best:8.1f}/s (batch {best_batch}) | "
        f"batch-1 latency with {args.threads} threads {latency:6.2f} ms",
        flush=True,
    )
    return result


# The server and its load ----------------------------------------------------------------------------


class Server:
    def __init__(
        self, repo: Path, name: str, args: argparse.Namespace, root: Path = ROOT, port: int | None = None
    ):
        self.base = f"http://127.0.0.1:{port or args.port}"
        env = {
            **os.environ,
            "CLIPSERVE_MODELS": name,
            "CLIPSERVE_PRECISION": args.precision,
            "CLIPSERVE_REDIS_URL": args.redis_url,
            "CLIPSERVE_RELOAD_POLL_S": "0",
            "CLIPSERVE_JPEG_DRAFT_MARGIN": str(args.jpeg_draft_margin),
            "CLIPSERVE_LOG_LEVEL": "WARNING",
        }
        if args.workers is not None:
            env["CLIPSERVE_WORKERS"] = str(args.workers)
        if args.postgres_dsn:
            env["CLIPSERVE_COLLECTIONS_BACKEND"] = "pgvector"
            env["CLIPSERVE_POSTGRES_DSN"] = args.postgres_dsn
        if args.server_threads:
            env["CLIPSERVE_INTRA_OP_THREADS"] = env["CLIPSERVE_PREPROCESS_WORKERS"] = str(args.server_threads)
        command = [
            sys.executable,
            "-m",
            "clipserve.service.server.cli",
            "--models-dir",
            str(repo),
            "--port",
            str(port or args.port),
        ]
        command += [*args.server_args]
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed in stop())
        self.process = subprocess.Popen(command, env=env, cwd=root, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 600) -> None:
        wait_ready(self.process, self.log, self.base, timeout_s, poll_s=0.2)

    def pids(self) -> list[int]:
        """The server's process and its children (workers)."""
        found = [self.process.pid]
        for pid in list(found):
            try:
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                continue
            found += [
                int(c)
                for c in children
                if b"resource_tracker" not in Path(f"/proc/{c}/cmdline").read_bytes()  # spawn's helper
            ]
        return found

    def peak_rss_mb(self) -> float:
        total = 0
        for pid in self.pids():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            total += next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
        return total / 1024

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def _lua_string(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid Lua string literal for ASCII text


def raw_kind(kind: str) -> str:
    """The raw loop a served kind is compared with: both image kinds decode the same JPEGs."""
    return "image" if kind.startswith("image") else kind


def lua_script(kind: str, run_tag: str, folder: Path | None = None) -> str:
    headers = '{["Content-Type"] = "application/json"}'
    if kind == "image-bin":  # the JPEG itself as the body: no base64, no JSON
        assert folder is not None
        paths = []
        for seed in range(8):
            path = folder / f"{seed}.jpg"
            path.write_bytes(photo(seed))
            paths.append(_lua_string(str(path)))
        return (
            f"local bodies = {{}}\nfor n, path in ipairs({{{', '.join(paths)}}}) do\n"
            '  local f = io.open(path, "rb"); bodies[n] = f:read("*all"); f:close()\nend\nlocal i = 0\n'
            "request = function()\n  i = i + 1\n"
            '  return wrk.format("POST", "/v1/embed", {["Content-Type"] = "image/jpeg"}, '
            "bodies[(i % #bodies) + 1])\nend\n"
        )
    if kind == "image":
        bodies = [json.dumps({"images": [base64.b64encode(photo(seed)).decode()]}) for seed in range(8)]
        listed = ",\n".join(_lua_string(b) for b in bodies)
        return (
            f"local bodies = {{\n{listed}\n}}\nlocal i = 0\n"
            "request = function()\n  i = i + 1\n"
            f'  return wrk.format("POST", "/v1/embed", {headers}, bodies[(i % #bodies) + 1])\nend\n'
        )
    # every text is new (a counter first, within any context length, and a run tag), so each one
    # reaches the text tower, not the cache
    words = ", ".join(_lua_string(w) for w in WORDS)
    return (
        f"local words = {{{words}}}\nlocal i = 0\n"
        "request = function()\n  i = i + 1\n"
        '  local text = i .. " a photo of a " .. words[(i % #words) + 1] .. " and a " .. '
        f'words[(math.floor(i / 7) % #words) + 1] .. " {run_tag}"\n'
        f'  return wrk.format("POST", "/v1/embed", {headers}, \'{{"texts": ["\' .. text .. \'"]}}\')\nend\n'
    )


@dataclass
class Load:
    kind: str
    concurrency: int
    rate: float
    p50_ms: float
    p99_ms: float
    errors: int
    loadgen_cpu: float  # cores the load generator used on average


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(value) * _UNITS[unit]


def run_wrk(base: str, kind: str, concurrency: int, seconds: float, tag: str) -> Load:
    folder = Path(tempfile.mkdtemp(prefix="clipserve-wrk-"))
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(lua_script(kind, tag, folder))
    try:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        out = subprocess.run(
            [
                "wrk",
                "-t1",
                f"-c{concurrency}",
                f"-d{max(1, round(seconds))}s",
                "--latency",
                "--timeout",
                "30s",
                "-s",
                script.name,
                base,
            ],
            capture_output=True,
            text=True,
        )
        if out.returncode != 0:
            raise RuntimeError(f"wrk failed: {out.stderr or out.stdout}")
        out = out.stdout
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    finally:
        os.unlink(script.name)
        shutil.rmtree(folder, ignore_errors=True)
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    percentiles = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.M))
    errors = int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0
    errors += sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    cpu = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / wall
    return Load(kind, concurrency, rate, _ms(percentiles["50"]), _ms(percentiles["99"]), errors, cpu)


def interleaved_c1(
    server: Server, bundle: Bundle, kind: str, args: argparse.Namespace
) -> tuple[float, float]:
    """Raw batch-1 latency and served p50 at concurrency 1 in alternating rounds (medians), so that
    a change in the machine's other load hits both sides alike."""
    loops = RawLoops(bundle, raw_kind(kind), 1, args.threads, 1, args.jpeg_draft_margin)
    raw_ms, served_ms = [], []
    try:
        for _ in range(args.rounds):
            raw_ms.append(loops.measure(args.seconds)[1])
            served_ms.append(
                run_wrk(server.base, kind, 1, args.seconds, f"i{time.time_ns() % 10**8:x}").p50_ms
            )
    finally:
        loops.close()
    result = statistics.median(raw_ms), statistics.median(served_ms)
    print(
        f"  c=1 {kind:5} alternating x{args.rounds}: raw batch-1 {result[0]:7.2f} ms, served p50 {result[1]:7.2f} ms"
        f" -> overhead {result[1] - result[0]:+.2f} ms",
        flush=True,
    )
    return result


def profile(server: Server, model: str, kind: str, concurrency: int, seconds: float, out: Path) -> None:
    """py-spy over every server process during a load run, sampling the thread that holds the GIL
    (what bounds one process's Python work); writes collapsed stacks and a summary."""
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    records = []
    for pid in server.pids():
        path = out / f"profile-{model}-{kind}-c{concurrency}-{pid}.txt"
        command = [pyspy, "record", "--pid", str(pid), "--duration", str(int(seconds) + 1)]
        command += ["--format", "raw", "--output", str(path), "--threads", "--gil", "--rate", "250"]
        records.append(
            (subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), path)
        )
    time.sleep(1)
    load = run_wrk(server.base, kind, concurrency, seconds, f"p{time.time_ns() % 10**8:x}")
    for process, _ in records:
        process.wait(60)
    print(f"  profiled {kind} c={concurrency}: {load.rate:.1f} req/s while sampled", flush=True)
    summarize_profile(
        [p for _, p in records if p.exists()], out / f"profile-{model}-{kind}-c{concurrency}.md"
    )


def summarize_profile(paths: list[Path], out: Path, top: int = 25) -> None:
    """Self and inclusive sample shares per function, and per thread, from py-spy's collapsed stacks."""
    inclusive: dict[str, int] = {}
    own: dict[str, int] = {}
    threads: dict[str, int] = {}
    total = 0
    for path in paths:
        for line in path.read_text().splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not stack:
                continue
            count = int(count_text)
            frames = stack.split(";")
            total += count
            threads[frames[0]] = threads.get(frames[0], 0) + count
            for frame in set(frames[1:]):
                inclusive[frame] = inclusive.get(frame, 0) + count
            own[frames[-1]] = own.get(frames[-1], 0) + count
    lines = [f"# py-spy profile: {total} samples over {len(paths)} process(es)", "", "## threads", ""]
    lines += [
        f"- {share / total:6.1%}  {name}" for name, share in sorted(threads.items(), key=lambda x: -x[1])
    ]
    for title, table in (("self time", own), ("inclusive time", inclusive)):
        lines += ["", f"## top {top} by {title}", ""]
        ranked = sorted(table.items(), key=lambda x: -x[1])[:top]
        lines += [f"- {count / total:6.1%}  {name}" for name, count in ranked]
    out.write_text("\n".join(lines) + "\n")
    print("\n".join("    " + line for line in lines[: 12 + top + 4]), flush=True)


# The framework floor ----------------------------------------------------------------------------------


def floor_app():
    """The least a FastAPI service does per request: parse and validate `{"texts": [...]}` with
    pydantic, answer a small JSON document. No tokenizer, no model, no middleware."""
    from fastapi import FastAPI
    from pydantic import BaseModel

    class Texts(BaseModel):
        texts: list[str]

    app = FastAPI(telemetry={"tracing": False, "metrics": False, "logs": False})

    @app.post("/v1/embed")
    async def embed(body: Texts) -> dict:
        return {"texts": len(body.texts)}

    return app


def measure_floor(processes: int, levels: list[int], args: argparse.Namespace) -> dict[int, float]:
    """req/s of `floor_app` under uvicorn (`processes` workers) at each concurrency, text bodies."""
    port = args.port + 2
    command = [sys.executable, "-m", "uvicorn", "bench.overhead:floor_app", "--factory", "--port", str(port)]
    command += ["--workers", str(processes), "--log-level", "warning", "--no-access-log"]
    log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed below)
    process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(process, log, base, 60, poll_s=0.2, path="/docs")
        rates = {}
        for level in levels:
            rates[level] = run_wrk(base, "text", level, args.seconds, f"f{time.time_ns() % 10**8:x}").rate
            print(f"  floor text  c={level:>2}: {rates[level]:8.1f} req/s (FastAPI, {processes} processes)")
        return rates
    finally:
        process.terminate()
        process.wait(30)
        log.close()


# Driver -----------------------------------------------------------------------------------------------


@dataclass
class ModelRow:
    model: str
    raw: dict[str, Raw] = field(default_factory=dict)
    loads: list[Load] = field(default_factory=list)
    peak_rss_mb: float = 0.0
    # kind -> (raw batch-1 ms, served p50 ms) medians of alternating rounds at concurrency 1
    c1: dict[str, tuple[float, float]] = field(default_factory=dict)
    # concurrency -> req/s of the framework floor (text bodies), with the server's process count
    floor: dict[int, float] = field(default_factory=dict)


def bench_model(args: argparse.Namespace, key: str) -> ModelRow:
    name, export_args = MODELS[key]
    if key in SLOW_MODELS:  # a few requests a second: longer figures for as many samples
        args = copy.copy(args)
        args.seconds *= args.slow_scale
    if args.precision != "fp32":
        name, export_args = f"{name}-{args.precision}", [*export_args, f"--{args.precision}"]
    bundle = ensure_bundle(args.repo, name, export_args)
    print(f"\n== {name}: image {bundle.manifest.image.size}, dim {bundle.manifest.embed_dim}", flush=True)
    row = ModelRow(name)
    if not args.served_only:
        for kind in dict.fromkeys(raw_kind(k) for k in args.kinds):
            row.raw[kind] = measure_raw(bundle, kind, args)
    server = Server(args.repo, name, args)
    try:
        server.wait_ready()
        for kind in args.kinds:
            for concurrency in args.levels:
                load = run_wrk(server.base, kind, concurrency, args.seconds, f"r{time.time_ns() % 10**8:x}")
                row.loads.append(load)
                print(
                    f"  served {kind:5} c={concurrency:>2}: {load.rate:8.1f} req/s  p50 {load.p50_ms:6.2f} ms"
                    f"  p99 {load.p99_ms:6.2f} ms  errors {load.errors}  wrk {load.loadgen_cpu:.2f} cores",
                    flush=True,
                )
        for kind in args.kinds if not args.served_only else []:
            row.c1[kind] = interleaved_c1(server, bundle, kind, args)
        for spec in args.profile:
            kind, _, level = spec.partition(":")
            profile(server, name, kind, int(level or 1), args.seconds, args.out)
        row.peak_rss_mb = server.peak_rss_mb()
        processes = max(1, len(server.pids()) - 1)  # the workers, or the one server process
    finally:
        server.stop()
    if "text" in args.kinds and not args.no_floor:
        row.floor = measure_floor(processes, args.levels, args)
    return row


def compare(args: argparse.Namespace, key: str) -> list[tuple[str, int, float, float, float, float]]:
    """This tree's server against another checkout's (`--compare-to`), both up at once, measured in
    alternating rounds of the same wrk load: (kind, concurrency, base req/s, this req/s, base p50,
    this p50), medians over the rounds."""
    name, export_args = MODELS[key]
    if key in SLOW_MODELS:
        args = copy.copy(args)
        args.seconds *= args.slow_scale
    ensure_bundle(args.repo, name, export_args)
    base_args = copy.copy(args)
    base_args.workers = args.compare_workers
    base_args.server_args = shlex.split(args.compare_server_args)
    base = Server(args.repo, name, base_args, root=args.compare_to, port=args.port + 1)
    head = Server(args.repo, name, args)
    rows = []
    try:
        base.wait_ready()
        head.wait_ready()
        before = " ".join([str(args.compare_to), *base_args.server_args])
        after = " ".join(["this tree", *args.server_args])
        print(
            f"\n== {name}: before = {before} (port {args.port + 1}), after = {after}, alternating", flush=True
        )
        for kind in args.kinds:
            for concurrency in args.levels:
                base_loads, head_loads = [], []
                for _ in range(args.rounds):
                    tag = f"a{time.time_ns() % 10**8:x}"
                    base_loads.append(run_wrk(base.base, kind, concurrency, args.seconds, tag + "b"))
                    head_loads.append(run_wrk(head.base, kind, concurrency, args.seconds, tag + "h"))

                def med(loads: list[Load], attr: str) -> float:
                    return statistics.median(getattr(x, attr) for x in loads)

                row = (kind, concurrency, med(base_loads, "rate"), med(head_loads, "rate"))
                row += (med(base_loads, "p50_ms"), med(head_loads, "p50_ms"))
                rows.append(row)
                print(
                    f"  {kind:9} c={concurrency:>2}: before {row[2]:8.1f}/s p50 {row[4]:8.2f} ms | after "
                    f"{row[3]:8.1f}/s p50 {row[5]:8.2f} ms | after/before {row[3] / row[2]:5.2f}x",
                    flush=True,
                )
        print(
            f"  peak RSS: before {base.peak_rss_mb():.0f} MB, after {head.peak_rss_mb():.0f} MB", flush=True
        )
    finally:
        base.stop()
        head.stop()
    return rows


def report(rows: list[ModelRow], args: argparse.Namespace) -> None:
    import onnxruntime

    print("\n" + "=" * 104)
    print(
        f"machine: {cpu_name()}, {usable_cores()} cores; onnxruntime {onnxruntime.__version__}; "
        f"load generator: wrk (1 thread); raw loops on 1 and {args.cores} cores; server: clip-serve "
        f"{' '.join(args.server_args) or '(defaults)'}, workers {args.workers if args.workers is not None else 'default'}; "
        f"{args.seconds:g} s per figure"
    )
    for row in rows:
        print(f"\n{row.model}: peak RSS {row.peak_rss_mb:.0f} MB (VmHWM, all server processes)")
        print("  kind   conc   served/s   p50 ms   p99 ms  served/raw(all cores)  overhead@c1* wrk cores")
        for load in row.loads:
            base = row.raw.get(raw_kind(load.kind))
            ratio = f"{load.rate / base.all_cores:6.2f}" if base else "     -"
            extra = ""
            if load.kind in row.c1 and load.concurrency == 1:
                raw_ms, served_ms = row.c1[load.kind]
                extra = f"{served_ms - raw_ms:+8.2f} ms"
            print(
                f"  {load.kind:5} {load.concurrency:>5} {load.rate:10.1f} {load.p50_ms:8.2f} {load.p99_ms:8.2f}"
                f" {ratio:>22} {extra:>12} {load.loadgen_cpu:10.2f}"
            )
        for kind in dict.fromkeys(x.kind for x in row.loads):
            base = row.raw.get(raw_kind(kind))
            if base is None:
                continue
            best = max((x.rate for x in row.loads if x.kind == kind), default=0.0)
            print(
                f"  {kind}: raw 1 core {base.one_core:.1f}/s, {args.cores} cores {base.all_cores:.1f}/s; "
                f"best served {best:.1f}/s = {best / base.all_cores:.2f}x all-cores raw; raw batch-1 latency "
                f"{base.latency_ms:.2f} ms"
            )
        if row.floor:
            served = {x.concurrency: x.rate for x in row.loads if x.kind == "text"}
            listed = ", ".join(
                f"c={c} {rate:.0f}/s (served {served[c] / rate:.2f}x)"
                for c, rate in row.floor.items()
                if c in served
            )
            print(f"  framework floor (FastAPI alone, text body): {listed}")
        for kind, (raw_ms, served_ms) in row.c1.items():
            print(
                f"  * {kind} at c=1, {args.rounds} alternating rounds (medians): raw batch-1 {raw_ms:.2f} ms, "
                f"served p50 {served_ms:.2f} ms, overhead {served_ms - raw_ms:+.2f} ms"
            )
    args.out.mkdir(parents=True, exist_ok=True)
    data = [
        {"model": r.model, "peak_rss_mb": r.peak_rss_mb, "raw": {k: asdict(v) for k, v in r.raw.items()}}
        | {"loads": [asdict(x) for x in r.loads], "c1_raw_served_ms": r.c1, "floor_text": r.floor}
        for r in rows
    ]
    (args.out / "overhead.json").write_text(json.dumps(data, indent=2))
    plot(rows, args.out / "overhead.png")
    print(f"\nwrote {args.out / 'overhead.json'} and {args.out / 'overhead.png'}")


def plot(rows: list[ModelRow], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, len(rows), figsize=(6 * len(rows), 4), squeeze=False)
    for ax, row in zip(axes[0], rows, strict=True):
        for kind in dict.fromkeys(x.kind for x in row.loads):
            base = row.raw.get(raw_kind(kind))
            if base is None:
                continue
            loads = [x for x in row.loads if x.kind == kind]
            ax.plot(
                [x.concurrency for x in loads], [x.rate / base.all_cores for x in loads], "o-", label=kind
            )
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_ylabel("served / raw loop on all cores")
        ax.set_title(row.model)
        if row.raw:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["shapes", "vitb32"])
    parser.add_argument(
        "--kinds",
        nargs="+",
        choices=["image", "image-bin", "text"],
        default=["image", "image-bin", "text"],
        help="image: base64 JSON; image-bin: the JPEG as the body (Content-Type: image/jpeg)",
    )
    parser.add_argument("--levels", nargs="+", type=int, default=[1, 8, 32], help="concurrency levels")
    parser.add_argument("--seconds", type=float, default=4.0, help="per raw figure and per load level")
    parser.add_argument("--slow-scale", type=float, default=3.0, help="--seconds times this for ViT-B-32")
    parser.add_argument("--rounds", type=int, default=3, help="alternating raw/served rounds at c=1")
    parser.add_argument("--repo", type=Path, default=ROOT / "runs" / "bench-models")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-overhead")
    parser.add_argument("--cores", type=int, default=usable_cores(), help="raw processes for 'all cores'")
    parser.add_argument("--threads", type=int, default=usable_cores(), help="threads of the raw latency loop")
    parser.add_argument(
        "--workers",
        type=int,
        help="clip-serve --workers (0: automatic; not 1: a private PostgreSQL holds the stores)",
    )
    parser.add_argument(
        "--compare-to",
        type=Path,
        help="another checkout (e.g. of main): its server against this one's, alternating rounds",
    )
    parser.add_argument("--compare-workers", type=int, help="--workers for the other checkout's server")
    parser.add_argument(
        "--compare-server-args",
        default="",
        help="clip-serve flags of the other server (one string), e.g. --compare-to . --compare-server-args "
        "'--cpu-arena' weighs a setting against the defaults on one tree",
    )
    parser.add_argument("--postgres-dsn", help="PostgreSQL for the stores instead of a private one")
    parser.add_argument("--server-threads", type=int, help="CLIPSERVE_INTRA_OP_THREADS for the server")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/12")
    parser.add_argument("--port", type=int, default=8711)
    parser.add_argument("--precision", choices=["fp32", "int8"], default="fp32")
    parser.add_argument("--jpeg-draft-margin", type=float, default=2.0)
    parser.add_argument("--served-only", action="store_true", help="skip the raw loops")
    parser.add_argument("--no-floor", action="store_true", help="skip the framework floor (FastAPI alone)")
    parser.add_argument("--profile", nargs="*", default=[], help="KIND:CONCURRENCY runs sampled by py-spy")
    parser.add_argument("server_args", nargs="*", help="extra clip-serve flags, after --")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print("overhead: wrk is needed as the load generator (Debian: apt install wrk)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    PRECISION[0] = args.precision
    with contextlib.ExitStack() as stack:
        if args.workers != 1 and not args.postgres_dsn:
            args.postgres_dsn = stack.enter_context(throwaway_postgres(None))
        if args.compare_to:
            for key in args.models:
                compare(args, key)
            return 0
        rows = [bench_model(args, key) for key in args.models]
    report(rows, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
