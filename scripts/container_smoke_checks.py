"""The checks of scripts/container-smoke.sh, run against the compose stack it started.

Through the proxy: readiness, embeddings, classification with labels and with a label set, pgvector
collections. Per replica, through `<engine> exec` into each api container (its own /metrics and
routes, whatever the engine's networking): every replica answered; a label set made through one
replica costs the others no text-encoder call; a second version published under load reaches every
replica with no failed request. Then `compose restart redis` under load, reported as its own step;
then who each container runs as and whether every healthcheck passed.

Prints each step's time and request counts; exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import re
import shlex
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from PIL import Image, ImageDraw

MODEL = "smoke"
LABELSET = "smoke-shapes"
COLLECTION = "smoke-items"
API_UID = 10001
# CAP_CHOWN (0), CAP_SETGID (6), CAP_SETUID (7): what docker-compose.yml leaves nginx
PROXY_CAPABILITIES = (1 << 0) | (1 << 6) | (1 << 7)
# A request run inside a replica with its own Python: method, path and JSON body on stdin, status and
# body on stdout. The images carry no curl.
_IN_REPLICA = """
import json, sys, urllib.error, urllib.request
req = json.load(sys.stdin)
data = None if req["body"] is None else json.dumps(req["body"]).encode()
r = urllib.request.Request("http://127.0.0.1:8000" + req["path"], data=data, method=req["method"],
                           headers={"Content-Type": "application/json"})
try:
    with urllib.request.urlopen(r, timeout=30) as resp:
        status, body = resp.status, resp.read()
except urllib.error.HTTPError as exc:
    status, body = exc.code, exc.read()
sys.stdout.write(json.dumps({"status": status, "body": body.decode()}))
"""
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


class CheckFailed(Exception):
    pass


def check(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def metric_total(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (Prometheus text format)."""
    total = 0.0
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if not match or match.group(1) != name:
            continue
        found = dict(_LABEL.findall(match.group(2) or ""))
        if all(found.get(key) == value for key, value in labels.items()):
            total += float(match.group(3))
    return total


def picture(colour: str, shape: str) -> str:
    """A base64 PNG of one coloured shape, as a client would send it."""
    image = Image.new("RGB", (64, 64), "white")
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse((12, 12, 52, 52), fill=colour)
    else:
        draw.rectangle((12, 12, 52, 52), fill=colour)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@dataclass
class Engine:
    """The container engine and compose commands, and the compose project the smoke started."""

    engine: str
    compose: list[str]
    project: str

    def run(self, argv: list[str], stdin: str | None = None, timeout: float = 120) -> str:
        done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise CheckFailed(f"`{shlex.join(argv)}` failed: {(done.stderr or done.stdout).strip()[-500:]}")
        return done.stdout

    def containers(self, service: str | None = None) -> list[str]:
        argv = [self.engine, "ps", "--filter", f"label=com.docker.compose.project={self.project}"]
        if service:
            argv += ["--filter", f"label=com.docker.compose.service={service}"]
        return sorted(self.run([*argv, "--format", "{{.Names}}"]).split())

    def inspect(self, container: str, template: str) -> str:
        return self.run([self.engine, "inspect", "--format", template, container]).strip()

    def compose_run(self, *args: str) -> None:
        self.run([*self.compose, *args], timeout=180)


@dataclass
class Replica:
    engine: Engine
    container: str

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        out = self.engine.run(
            [self.engine.engine, "exec", "-i", self.container, "python", "-c", _IN_REPLICA],
            stdin=json.dumps({"method": method, "path": path, "body": body}),
        )
        answer = json.loads(out)
        try:
            return answer["status"], json.loads(answer["body"])
        except json.JSONDecodeError:
            return answer["status"], answer["body"]

    def metrics(self) -> str:
        status, body = self.request("GET", "/metrics")
        check(status == 200, f"{self.container}: /metrics answered {status}")
        return body

    def served_version(self) -> int:
        status, body = self.request("GET", "/v1/models")
        check(status == 200, f"{self.container}: /v1/models answered {status}")
        return next(m["version"] for m in body["data"] if m["name"] == MODEL)


@dataclass
class Load:
    """Clients sending requests through the proxy until stopped; every outcome counted."""

    send: Callable[[httpx.Client, int], httpx.Response]
    base_url: str
    clients: int = 2
    # A steady client, not a flood: the two cores also run clip-export and three replicas.
    pause_s: float = 0.02
    outcomes: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    first_failure: float = 0.0
    last_failure: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _client(self, worker: int) -> None:
        with httpx.Client(base_url=self.base_url, timeout=30) as client:
            sequence = 0
            while not self._stop.is_set():
                sequence += 1
                try:
                    response = self.send(client, worker * 1_000_000 + sequence)
                    outcome = str(response.status_code)
                    detail = response.text[:200] if response.status_code != 200 else ""
                except httpx.HTTPError as exc:
                    outcome, detail = type(exc).__name__, str(exc)[:200]
                with self._lock:
                    self.outcomes[outcome] += 1
                    if outcome != "200":
                        now = time.monotonic()
                        self.first_failure = self.first_failure or now
                        self.last_failure = now
                    if detail and len(self.failures) < 5:
                        self.failures.append(f"{outcome}: {detail}")
                self._stop.wait(self.pause_s)

    @contextmanager
    def running(self) -> Iterator[Load]:
        threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(self.clients)]
        for thread in threads:
            thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            for thread in threads:
                thread.join(timeout=60)

    @property
    def total(self) -> int:
        return sum(self.outcomes.values())

    @property
    def failed(self) -> int:
        return self.total - self.outcomes["200"]

    def summary(self) -> str:
        counts = ", ".join(f"{outcome}: {n}" for outcome, n in sorted(self.outcomes.items()))
        return f"{self.total} requests ({counts})"


class Smoke:
    def __init__(self, args: argparse.Namespace):
        self.engine = Engine(args.engine, shlex.split(args.compose), args.project)
        self.base_url = args.url
        self.export_command = shlex.split(args.export_command)
        self.proxy = httpx.Client(base_url=args.url, timeout=30)
        self.red_circle = picture("red", "circle")
        self.replicas: list[Replica] = []

    # Steps ------------------------------------------------------------------------------------

    def ready(self) -> str:
        deadline = time.monotonic() + 120
        while True:
            try:
                response = self.proxy.get("/readyz")
                if response.status_code == 200:
                    break
                last = f"{response.status_code} {response.text[:200]}"
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
            check(time.monotonic() < deadline, f"/readyz through the proxy not 200 after 120 s: {last}")
            time.sleep(1)
        self.replicas = [Replica(self.engine, name) for name in self.engine.containers("api")]
        check(len(self.replicas) == 3, f"expected 3 api replicas, found {self.replicas}")
        return f"ready: {response.text.strip()}, replicas {', '.join(r.container for r in self.replicas)}"

    def embed_and_classify(self) -> str:
        embed = self.proxy.post("/v1/embed", json={"texts": ["a red circle"], "images": [self.red_circle]})
        check(embed.status_code == 200, f"/v1/embed: {embed.status_code} {embed.text[:300]}")
        body = embed.json()
        check(body["model"] == MODEL and body["dim"] == 32, f"/v1/embed answered for {body['model']}")
        labels = ["red circle", "blue square", "green triangle"]
        classify = self.proxy.post(
            "/v1/classify", json={"images": [self.red_circle], "labels": labels, "top_k": 2}
        )
        check(classify.status_code == 200, f"/v1/classify: {classify.status_code} {classify.text[:300]}")
        top = classify.json()["results"][0]
        check(len(top["labels"]) == 2, f"/v1/classify top_k=2 gave {top}")
        vectors = len(body["text_embeddings"]) + len(body["image_embeddings"])
        check(vectors == 2, f"/v1/embed of one text and one image gave {vectors} vectors")
        return f"embed: {vectors} vectors of dim {body['dim']}; classify: top 2 of {len(labels)} labels"

    def labelset_shared(self) -> str:
        """Created through the first replica, used through the others: no text encoding there."""
        first, *others = self.replicas
        status, body = first.request(
            "PUT", f"/v1/labelsets/{LABELSET}", {"labels": ["circle", "square", "triangle", "cross"]}
        )
        check(
            status == 200 and body["status"] == "ready",
            f"PUT label set via {first.container}: {status} {body}",
        )
        for replica in others:
            before = replica.metrics()
            status, body = replica.request(
                "POST", "/v1/classify", {"images": [self.red_circle], "labelset": LABELSET, "top_k": 1}
            )
            check(status == 200, f"classify with the label set via {replica.container}: {status} {body}")
            after = replica.metrics()
            text_calls = metric_total(after, "clipserve_encoder_calls_total", tower="text") - metric_total(
                before, "clipserve_encoder_calls_total", tower="text"
            )
            image_calls = metric_total(after, "clipserve_encoder_calls_total", tower="image") - metric_total(
                before, "clipserve_encoder_calls_total", tower="image"
            )
            check(
                text_calls == 0,
                f"{replica.container} ran the text encoder {text_calls:.0f} times for a shared label set",
            )
            check(image_calls >= 1, f"{replica.container} classified without encoding the image")
        through_proxy = self.proxy.post(
            "/v1/classify", json={"images": [self.red_circle], "labelset": LABELSET, "top_k": 1}
        )
        check(through_proxy.status_code == 200, f"classify with the label set: {through_proxy.text[:300]}")
        return (
            f"label set made via {first.container}; {len(others)} other replicas classified with it, "
            "0 text-encoder calls there (clipserve_encoder_calls_total{tower=text} unchanged)"
        )

    def collections(self) -> str:
        created = self.proxy.post("/v1/collections", json={"name": COLLECTION})
        check(created.status_code == 201, f"create collection: {created.status_code} {created.text[:300]}")
        items = [
            {"id": "red-circle", "image": self.red_circle, "metadata": {"kind": "image"}},
            {"id": "blue-square", "image": picture("blue", "square"), "metadata": {"kind": "image"}},
            {"id": "note", "text": "a green triangle", "metadata": {"kind": "text"}},
        ]
        upserted = self.proxy.post(f"/v1/collections/{COLLECTION}/items", json={"items": items})
        check(upserted.status_code == 200, f"upsert: {upserted.status_code} {upserted.text[:300]}")
        # pgvector is shared: every replica finds what one of them stored.
        for replica in self.replicas:
            status, body = replica.request(
                "POST", f"/v1/collections/{COLLECTION}/search", {"text": "a green triangle", "top_k": 3}
            )
            check(status == 200, f"search via {replica.container}: {status} {body}")
            check(
                [hit["id"] for hit in body["results"]][:1] == ["note"] and len(body["results"]) == 3,
                f"search via {replica.container} found {body['results']}",
            )
        deleted = self.proxy.delete(f"/v1/collections/{COLLECTION}")
        check(deleted.status_code == 200, f"delete collection: {deleted.status_code} {deleted.text[:300]}")
        return f"collection created, {len(items)} items upserted, searched via each of {len(self.replicas)} replicas, deleted"

    def every_replica_answers(self, requests: int = 30) -> str:
        def answered(replica: Replica) -> float:
            return metric_total(replica.metrics(), "clipserve_request_seconds_count", route="/v1/embed")

        before = [answered(r) for r in self.replicas]
        for i in range(requests):
            response = self.proxy.post("/v1/embed", json={"texts": [f"spread {i}"]})
            check(
                response.status_code == 200, f"/v1/embed #{i}: {response.status_code} {response.text[:200]}"
            )
        spread = [answered(r) - b for r, b in zip(self.replicas, before, strict=True)]
        check(
            all(n > 0 for n in spread),
            f"{requests} requests through the proxy reached the replicas as {spread}",
        )
        check(sum(spread) == requests, f"replicas counted {sum(spread):.0f} of {requests} requests")
        return f"{requests} requests through the proxy, per replica: {', '.join(f'{n:.0f}' for n in spread)}"

    def _mixed_load(self) -> Load:
        def send(client: httpx.Client, n: int) -> httpx.Response:
            if n % 2:
                return client.post("/v1/embed", json={"texts": [f"load text {n}"]})
            return client.post(
                "/v1/classify", json={"images": [self.red_circle], "labelset": LABELSET, "top_k": 1}
            )

        return Load(send, self.base_url)

    def hot_swap(self) -> str:
        """A second version published while clients send requests: every replica moves to it."""
        load = self._mixed_load()
        with load.running():
            time.sleep(2)
            started = time.monotonic()
            self.engine.run([*self.export_command, "--seed", "1"], timeout=300)
            published_s = time.monotonic() - started
            deadline = time.monotonic() + 90
            while (versions := [r.served_version() for r in self.replicas]) != [2] * len(self.replicas):
                check(
                    time.monotonic() < deadline, f"replicas serve versions {versions} 90 s after publishing 2"
                )
                time.sleep(1)
            swapped_s = time.monotonic() - started - published_s
            time.sleep(3)
        check(load.failed == 0, f"hot swap: {load.failed} failed of {load.summary()}; e.g. {load.failures}")
        return (
            f"clip-export published {MODEL}@2 in {published_s:.0f} s, every replica served it "
            f"{swapped_s:.0f} s later (poll every 10 s); under load: {load.summary()}"
        )

    def redis_restart(self) -> str:
        """`compose restart redis` under load: (no request failed and the label set is still there, report).

        Label-set definitions live in PostgreSQL, class matrices in Redis or each replica's own copy,
        so no request may fail while Redis restarts; afterwards every replica must still find the set."""
        load = self._mixed_load()
        with load.running():
            time.sleep(2)
            started = time.monotonic()
            self.engine.compose_run("restart", "redis")
            restart_s = time.monotonic() - started
            redis = self.engine.containers("redis")[0]
            while self.engine.inspect(redis, "{{.State.Health.Status}}") != "healthy":
                check(time.monotonic() - started < 60, "redis not healthy 60 s after `compose restart redis`")
                time.sleep(0.5)
            healthy_s = time.monotonic() - started
            everywhere = [200] * len(self.replicas)
            while (found := self._labelset_statuses()) != everywhere and time.monotonic() - started < 90:
                time.sleep(0.5)
            found_s = time.monotonic() - started
            time.sleep(2)
        survived = (
            f"found again by every replica after {found_s:.1f} s"
            if found == everywhere
            else f"not found 90 s after the restart began (per replica: {found})"
        )
        report = (
            f"`restart redis` took {restart_s:.1f} s, Redis healthy after {healthy_s:.1f} s; "
            f"under load: {load.summary()}; the label set {survived}"
        )
        if load.failed:
            report += (
                f"; failures from {load.first_failure - started:.1f} s to {load.last_failure - started:.1f} s "
                f"after the restart began, e.g. {load.failures[0]}"
            )
        check(load.failed == 0 and found == everywhere, report)
        return report

    def _labelset_statuses(self) -> list[int]:
        return [replica.request("GET", f"/v1/labelsets/{LABELSET}")[0] for replica in self.replicas]

    def users_and_health(self) -> str:
        users = []
        for container in self.engine.containers():
            status = self.engine.run([self.engine.engine, "exec", container, "cat", "/proc/1/status"])
            uid = int(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1))
            service = self.engine.inspect(container, '{{index .Config.Labels "com.docker.compose.service"}}')
            if service == "api":
                check(uid == API_UID, f"{container} runs as uid {uid}, not the image's user {API_UID}")
            health = self.engine.inspect(container, "{{.State.Health.Status}}")
            check(health == "healthy", f"{container}: health {health}")
            users.append(f"{service} uid {uid}")
        return f"all {len(users)} containers healthy; PID 1 runs as: {', '.join(sorted(set(users)))}"

    def hardening(self) -> str:
        """docker-compose.yml's hardening, as each container's PID 1 sees it: a read-only root file
        system, no capability left in its bounding set (the proxy: CHOWN, SETGID and SETUID only),
        no_new_privs; Redis refusing a client without the password; the api's PostgreSQL role no
        superuser."""
        seen = []
        for container in self.engine.containers():
            service = self.engine.inspect(container, '{{index .Config.Labels "com.docker.compose.service"}}')
            status = self.engine.run([self.engine.engine, "exec", container, "cat", "/proc/1/status"])
            bounding = int(re.search(r"^CapBnd:\s+([0-9a-f]+)", status, re.M).group(1), 16)
            allowed = PROXY_CAPABILITIES if service == "proxy" else 0
            check(
                bounding & ~allowed == 0,
                f"{container}: capabilities {bounding:#x} left, {allowed:#x} at most",
            )
            check(
                re.search(r"^NoNewPrivs:\s+1$", status, re.M) is not None, f"{container}: no_new_privs is off"
            )
            mounts = self.engine.run([self.engine.engine, "exec", container, "cat", "/proc/1/mounts"])
            root = [line.split() for line in mounts.splitlines() if line.split()[1:2] == ["/"]]
            check(bool(root) and root[-1][3].split(",")[0] == "ro", f"{container}: / is not read-only")
            seen.append(service)
        redis = self.engine.containers("redis")[0]
        # redis-cli's exit status on an error reply differs between versions: read what it says
        anonymous = self.engine.run(
            [self.engine.engine, "exec", redis, "sh", "-c", "env -u REDISCLI_AUTH redis-cli ping 2>&1; true"]
        )
        check("NOAUTH" in anonymous, f"redis answered a client without the password: {anonymous.strip()}")
        postgres = self.engine.containers("postgres")[0]
        superuser = self.engine.run(
            [self.engine.engine, "exec", postgres, "psql", "-U", "postgres", "-d", "clipserve", "-tAc",
             "SELECT rolsuper FROM pg_roles WHERE rolname = 'clipserve'"]
        ).strip()  # fmt: skip
        check(superuser == "f", f"the api's PostgreSQL role clipserve: rolsuper {superuser!r}, expected 'f'")
        return (
            f"{len(seen)} containers read-only, without capabilities (the proxy: {PROXY_CAPABILITIES:#x}), "
            "no_new_privs; Redis refuses a client without the password; the api's role is no superuser"
        )

    # Driver ------------------------------------------------------------------------------------

    def step(self, name: str, run: Callable[[], str]) -> bool:
        started = time.monotonic()
        try:
            detail, outcome = run(), "ok"
        except CheckFailed as exc:
            detail, outcome = str(exc), "FAILED"
        self.report(name, outcome, time.monotonic() - started, detail)
        return outcome == "ok"

    def report(self, name: str, outcome: str, elapsed: float, detail: str) -> None:
        print(f"[smoke] {name}: {outcome} in {elapsed:.1f} s: {detail}", flush=True)

    def run(self) -> int:
        steps: list[tuple[str, Callable[[], str]]] = [
            ("ready", self.ready),
            ("embed and classify", self.embed_and_classify),
            ("label set shared by replicas", self.labelset_shared),
            ("pgvector collections", self.collections),
            ("every replica answers", self.every_replica_answers),
            ("hot swap under load", self.hot_swap),
            ("users and healthchecks", self.users_and_health),
            ("hardening", self.hardening),
            ("redis restart under load", self.redis_restart),
        ]
        for name, run in steps:
            if not self.step(name, run):
                return 1
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="the proxy, e.g. http://127.0.0.1:8000")
    parser.add_argument("--engine", required=True, help="docker or podman")
    parser.add_argument("--compose", required=True, help="the compose command, e.g. 'docker compose'")
    parser.add_argument("--project", required=True, help="the compose project name")
    parser.add_argument("--export-command", required=True, help="clip-export command publishing the model")
    return Smoke(parser.parse_args(argv)).run()


if __name__ == "__main__":
    sys.exit(main())
