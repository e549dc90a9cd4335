"""The worst requests of issue 22 against a real `clip-serve`: what the attacker gets, and what the
server pays (its /livez latency during the attack, its peak memory).

Each attack gets a fresh server (so its peak RSS is the attack's), started from a checkout with that
checkout's Python; with --before, every attack also runs against an older checkout, in the same run,
and the figures are printed side by side. During an attack /livez is asked every 100 ms, one poll
at a time, each waiting as long as the attack may take: its slowest answer is how long the event
loop stalled. The server's peak RSS is the kernel's high-water mark (VmHWM), reset once the server
is ready. Attacks:

  classify-62k      /v1/classify: one 2,000-character label, templates ["{}" x 30000] (a 62 KB body)
  classify-12k      the same with "{}" x 5000 (12 KB)
  labelset-62k      the 62 KB body stored: PUT /v1/labelsets/x, then GET it until ready (or failed)
  labelset-worst    PUT a label set of the worst templates today's budgets allow (100 templates of
                    1,000 characters with 4 x "{}", 60 labels of 2,000 characters: 6,000 prompts of
                    8,992 characters), then GET it until it is ready (or failed)
  image-50mp        /v1/embed of one 50 MP RGBA PNG (7071 x 7071)
  image-16mp-alpha  /v1/embed of one 16.8 MP RGBA PNG (4096 x 4096, within today's limit): the
                    copies made to flatten its transparency
  url-drip          /v1/embed of a URL whose server promises 1 MB and sends one byte a second
  url-starve        two requests of 64 such URLs each, then a third with one quick URL (the victim):
                    the victim's answer and seconds

The model is a tiny random-init CLIP (the same as `bench/serve.py --quick`), exported once into --repo.
The servers keep their cache in process (--redis-url none, the default), so no run finds another's
vectors or class matrices. Figures are printed, never asserted; a plot goes to --plot.

    python bench/abuse.py
    python bench/abuse.py --before ../old-checkout --before-python ../old-checkout/.venv/bin/python
    python bench/abuse.py --attacks classify-62k url-drip --attack-timeout 60
"""

from __future__ import annotations

import argparse
import base64
import http.server
import io
import json
import os
import random
import socket
import statistics
import string
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
from bench_common import cpu_name  # noqa: E402

TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
MODEL = "bench-tiny"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def words(rng: random.Random, chars: int) -> str:
    text = ""
    while len(text) < chars:
        text += "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 9))) + " "
    return text[:chars]


def ensure_model(repo: Path) -> None:
    if (repo / MODEL).is_dir():
        return
    print(f"exporting {MODEL} (random init) into {repo} ...", flush=True)
    config = Path(tempfile.mkdtemp()) / "tiny.json"
    config.write_text(json.dumps(TINY_CONFIG))
    command = [sys.executable, "-m", "clipserve.export.cli", "--config", str(config), "--pretrained", "none"]
    command += ["--name", MODEL, "--models-dir", str(repo), "--quiet"]
    subprocess.run(command, check=True, cwd=ROOT)


def kib(pid: int, field_name: str) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith(field_name))


class Server:
    """`python -m clipserve.service.server.cli` of one checkout, on a free port, logging to a temporary file."""

    def __init__(self, checkout: Path, python: str, repo: Path, redis_url: str, data_dir: Path):
        self.base = f"http://127.0.0.1:{free_port()}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPSERVE_")}
        env.update(
            CLIPSERVE_MODELS_DIR=str(repo),
            CLIPSERVE_HOST="127.0.0.1",
            CLIPSERVE_PORT=self.base.rsplit(":", 1)[1],
            CLIPSERVE_REDIS_URL=redis_url,
            CLIPSERVE_DATA_DIR=str(data_dir),
            CLIPSERVE_RELOAD_POLL_S="0",
            CLIPSERVE_LOG_LEVEL="WARNING",
            CLIPSERVE_URL_FETCH_ENABLED="true",
            CLIPSERVE_URL_ALLOWED_HOSTS="127.0.0.1",
            CLIPSERVE_URL_ALLOW_PRIVATE="true",
        )
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed in stop())
        self.process = subprocess.Popen(
            [python, "-m", "clipserve.service.server.cli"],
            env=env,
            cwd=checkout,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"clip-serve exited:\n{self.log.read()[-3000:]}")
            try:
                if httpx.get(f"{self.base}/readyz", timeout=2).status_code == 200:
                    Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")  # reset VmHWM
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("clip-serve did not become ready")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self.log.close()


class LivezProbe:
    """/livez every 100 ms on its own thread: each answer's seconds, and polls never answered (within
    `timeout_s`, or by the end of the attack)."""

    def __init__(self, base: str, timeout_s: float):
        self.base, self.timeout_s, self.latencies, self.unanswered = base, timeout_s, [], 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=self.timeout_s) as client:
            while True:  # one poll at least, the last one after the attack has been answered
                started = time.perf_counter()
                try:
                    client.get(f"{self.base}/livez").raise_for_status()
                    self.latencies.append(time.perf_counter() - started)
                except httpx.HTTPError:
                    self.unanswered += 1
                if self._stop.wait(0.1):
                    return

    def __enter__(self) -> LivezProbe:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(self.timeout_s + 5)


@dataclass
class Outcome:
    attack: str
    side: str
    answer: str
    seconds: float
    livez_max_ms: float
    livez_p50_ms: float
    livez_unanswered: int
    rss_ready_mb: float
    rss_peak_mb: float
    notes: list[str] = field(default_factory=list)


def answer_of(response: httpx.Response) -> str:
    try:
        error = response.json().get("error")
    except ValueError:
        error = None
    if error:
        return f"{response.status_code} {error['type']}: {error['message'][:110]}"
    if response.status_code >= 400:
        return f"{response.status_code} {response.text[:80]}"
    return f"{response.status_code}"


class DripHandler(http.server.BaseHTTPRequestHandler):
    quick = b""  # set at start: a small PNG, served at once on /quick.png

    def do_GET(self) -> None:
        if self.path.startswith("/quick"):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(self.quick)))
            self.end_headers()
            self.wfile.write(self.quick)
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", "1000000")
        self.end_headers()
        try:
            for _ in range(100_000):
                self.wfile.write(b"\x89")
                self.wfile.flush()
                time.sleep(1)
        except OSError:
            pass

    def log_message(self, *args: object) -> None:
        pass


def rgba_png(side: int) -> str:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGBA", (side, side), (30, 160, 90, 120)).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def worst_labelset() -> dict:
    rng = random.Random(22)
    templates = []
    for i in range(100):
        head = f"{i}: " + "{} and " * 4
        templates.append(head + words(rng, 1000 - len(head)))
    return {"labels": [words(rng, 2000) for _ in range(60)], "templates": templates}


def post(base: str, path: str, body: dict, timeout_s: float) -> str:
    try:
        return answer_of(httpx.post(f"{base}{path}", json=body, timeout=timeout_s))
    except httpx.TimeoutException:
        return f"no answer within {timeout_s:g} s"
    except httpx.HTTPError as exc:
        return f"connection failed ({type(exc).__name__})"


def store_labelset(base: str, body: dict, timeout_s: float) -> str:
    """PUT the set, then GET it until it is ready or failed."""
    name = "attack"
    try:
        put = httpx.put(f"{base}/v1/labelsets/{name}", json=body, timeout=timeout_s)
    except httpx.TimeoutException:
        return f"no answer within {timeout_s:g} s"
    answer = answer_of(put)
    if put.status_code >= 300:
        return answer
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            info = httpx.get(f"{base}/v1/labelsets/{name}", timeout=5).json()
        except httpx.HTTPError:
            time.sleep(0.5)
            continue
        if info.get("status") in ("ready", "failed"):
            return f"{answer}, then {info['status']}"
        time.sleep(0.5)
    return f"{answer}, still building after {timeout_s:g} s"


def starve(base: str, drip_url: str, quick_url: str, timeout_s: float) -> str:
    """Two requests hold 128 slow fetches; the answer is the third request's, a quick URL."""
    slow = {"images": [f"{drip_url}?{i}" for i in range(64)]}
    with ThreadPoolExecutor(2) as pool:
        holders = [pool.submit(post, base, "/v1/embed", slow, timeout_s) for _ in range(2)]
        time.sleep(2)
        started = time.perf_counter()
        victim = post(base, "/v1/embed", {"images": [quick_url]}, timeout_s)
        waited = time.perf_counter() - started
        for holder in holders:
            holder.result()
    return f"victim {victim} after {waited:.1f} s"


def make_attacks(drip_url: str, quick_url: str) -> dict[str, Callable[[str, float, dict], str]]:
    label = words(random.Random(62), 2000)

    def body(repeats: int) -> dict:
        return {"labels": [label], "templates": ["{}" * repeats]}

    def classify(repeats: int) -> Callable[[str, float, dict], str]:
        request = {"images": [TINY_PNG], **body(repeats)}
        return lambda base, timeout_s, _: post(base, "/v1/classify", request, timeout_s)

    def image(side: int) -> Callable[[str, float, dict], str]:
        def send(base: str, timeout_s: float, cache: dict) -> str:
            if side not in cache:
                cache[side] = rgba_png(side)
            return post(base, "/v1/embed", {"images": [cache[side]]}, timeout_s)

        return send

    return {
        "classify-62k": classify(30_000),
        "classify-12k": classify(5000),
        "labelset-62k": lambda base, timeout_s, _: store_labelset(base, body(30_000), timeout_s),
        "labelset-worst": lambda base, timeout_s, _: store_labelset(base, worst_labelset(), timeout_s),
        "image-50mp": image(7071),
        "image-16mp-alpha": image(4096),
        "url-drip": lambda base, timeout_s, _: post(base, "/v1/embed", {"images": [drip_url]}, timeout_s),
        "url-starve": lambda base, timeout_s, _: starve(base, drip_url, quick_url, timeout_s),
    }


def tiny_png() -> str:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (48, 40), (200, 40, 40)).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


TINY_PNG = tiny_png()


def run_attack(
    side: str, checkout: Path, python: str, name: str, attack: Callable, args: argparse.Namespace, cache: dict
) -> Outcome:
    with tempfile.TemporaryDirectory() as data_dir:
        server = Server(checkout, python, args.repo, args.redis_url, Path(data_dir))
        try:
            server.wait_ready()
            ready_mb = kib(server.process.pid, "VmRSS") / 1024
            with LivezProbe(server.base, args.attack_timeout) as probe:
                started = time.perf_counter()
                answer = attack(server.base, args.attack_timeout, cache)
                seconds = time.perf_counter() - started
            alive = server.process.poll() is None
            peak_mb = kib(server.process.pid, "VmHWM") / 1024 if alive else float("nan")
        finally:
            server.stop()
    latencies = probe.latencies or [float("nan")]
    outcome = Outcome(
        attack=name,
        side=side,
        answer=answer if alive else f"{answer} (server died)",
        seconds=seconds,
        livez_max_ms=max(latencies) * 1000,
        livez_p50_ms=statistics.median(latencies) * 1000,
        livez_unanswered=probe.unanswered,
        rss_ready_mb=ready_mb,
        rss_peak_mb=peak_mb,
    )
    print(
        f"  {side:6} {name:15} {seconds:7.1f} s  livez max {outcome.livez_max_ms:8.0f} ms "
        f"(unanswered {probe.unanswered}), RSS {ready_mb:.0f} -> peak {peak_mb:.0f} MB: {outcome.answer}",
        flush=True,
    )
    return outcome


def report(outcomes: list[Outcome], args: argparse.Namespace) -> None:
    sides = list(dict.fromkeys(o.side for o in outcomes))
    print("\n## Abusive requests (issue 22)\n")
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; load average at start {args.load_at_start}")
    print(
        f"model: {MODEL} (random init, embed 32, 2+2 layers), one server per attack, cache {args.redis_url}"
    )
    print(f"command: python bench/abuse.py {' '.join(sys.argv[1:])}\n")
    print(
        "| attack | side | /livez slowest (ms) | /livez unanswered | RSS ready -> peak (MB) | seconds | answer |"
    )
    print("|---|---|---:|---:|---:|---:|---|")
    for outcome in outcomes:
        print(
            f"| {outcome.attack} | {outcome.side} | {outcome.livez_max_ms:,.0f} | {outcome.livez_unanswered} | "
            f"{outcome.rss_ready_mb:,.0f} -> {outcome.rss_peak_mb:,.0f} | {outcome.seconds:.1f} | "
            f"{outcome.answer.replace('|', '/')} |"
        )
    if len(sides) == 2:
        print("\nratios (before / after, this run):")
        for name in dict.fromkeys(o.attack for o in outcomes):
            pair = {o.side: o for o in outcomes if o.attack == name}
            if len(pair) == 2:
                b, a = pair[sides[0]], pair[sides[1]]
                print(
                    f"  {name:15} /livez max {b.livez_max_ms / a.livez_max_ms:6.1f}x, "
                    f"RSS growth {b.rss_peak_mb - b.rss_ready_mb:7.0f} vs {a.rss_peak_mb - a.rss_ready_mb:5.0f} MB"
                )


def plot(outcomes: list[Outcome], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = list(dict.fromkeys(o.attack for o in outcomes))
    sides = list(dict.fromkeys(o.side for o in outcomes))
    figure, (latency, memory) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(sides)
    for i, side in enumerate(sides):
        by_attack = {o.attack: o for o in outcomes if o.side == side}
        xs = [a + i * width for a in range(len(attacks))]
        worst = [by_attack[a].livez_max_ms if a in by_attack else 0 for a in attacks]
        latency.bar(xs, worst, width, label=side)
        memory.bar(
            xs, [by_attack[a].rss_peak_mb - by_attack[a].rss_ready_mb if a in by_attack else 0 for a in attacks],
            width, label=side,
        )  # fmt: skip
    for axis, title in ((latency, "/livez slowest answer during the attack (ms)"),
                        (memory, "peak RSS over RSS when ready (MB)")):  # fmt: skip
        axis.set_xticks([a + width * (len(sides) - 1) / 2 for a in range(len(attacks))], attacks, rotation=20)
        axis.set_title(title, fontsize=10)
        axis.legend()
    latency.set_yscale("log")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    print(f"plot: {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, default=ROOT / "runs" / "bench-models")
    parser.add_argument("--redis-url", default="none", help="the servers' cache (none: in process)")
    parser.add_argument("--before", type=Path, help="an older checkout to attack too, first")
    parser.add_argument(
        "--before-python", default=sys.executable, help="the Python of --before's environment"
    )
    parser.add_argument("--attacks", nargs="+", help="a subset, by name")
    parser.add_argument("--attack-timeout", type=float, default=120.0, help="seconds an attack may take")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--plot", type=Path, default=ROOT / "runs" / "abuse.png")
    args = parser.parse_args(argv)
    args.load_at_start = " ".join(f"{x:.1f}" for x in os.getloadavg())
    ensure_model(args.repo)
    drip = http.server.ThreadingHTTPServer(("127.0.0.1", 0), DripHandler)
    drip.daemon_threads = True
    threading.Thread(target=drip.serve_forever, daemon=True).start()
    DripHandler.quick = base64.b64decode(TINY_PNG)
    origin = f"http://127.0.0.1:{drip.server_address[1]}"
    attacks = make_attacks(f"{origin}/drip.png", f"{origin}/quick.png")
    chosen = args.attacks or list(attacks)
    unknown = sorted(set(chosen) - set(attacks))
    if unknown:
        parser.error(f"unknown attacks {', '.join(unknown)}; known: {', '.join(attacks)}")
    sides = [("before", args.before.resolve(), args.before_python)] if args.before else []
    sides.append(("after" if args.before else "now", ROOT, sys.executable))
    outcomes, cache = [], {}
    for name in chosen:
        print(f"{name}:", flush=True)
        for side, checkout, python in sides:
            outcomes.append(run_attack(side, checkout, python, name, attacks[name], args, cache))
    drip.shutdown()
    report(outcomes, args)
    if args.json:
        args.json.write_text(json.dumps([asdict(o) for o in outcomes], indent=2))
    plot(outcomes, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
