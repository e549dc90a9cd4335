"""The chart's pods for real, without a cluster: `podman kube play` of what `helm template` renders,
with the serving image, the training image and a model image (scripts/chart-check.sh builds them).

Two releases side by side on a podman network of their own:

- `clipserve-chart`: in-chart Redis and PostgreSQL, models from the models volume, the training
  CronJob. Its API pod waits in `wait-for-model` until the volume holds a model (seeded from the
  model image, as a first publish would), becomes ready and classifies through a published port;
  then the CronJob's pod (the training image, `clip-distill ... --models-dir /models`) publishes a
  new version, and the running API serves it without a restart (CLIPSERVE_RELOAD_POLL_S).
- `clipserve-chart-img`: models from the model image (its init container copies the bundle in),
  the embedded collections backend, no stores: ready, one classification.

podman 4.3 (Debian's) plays Pods, Deployments, ConfigMaps and PersistentVolumeClaims, not
StatefulSets, CronJobs, Services or autoscalers, and its Secret support is broken (a Secret volume
crashes it; secretKeyRef wants a JSON blob). So, and only so, the rendered objects are turned into
what it runs (`playable`): every workload's pod template becomes a Pod named after its Service (the
network's DNS answers pod names), a StatefulSet's claim templates become claims, Secrets become
ConfigMaps with the same data and their references follow, the API's port is published on
127.0.0.1 and no other (podman would publish every containerPort on the host), and restartPolicy Always becomes OnFailure (podman 4.3 restarts finished init containers
under Always). Readiness is the rendered probes themselves: httpGet through the published port,
exec inside the container. Services, the HPA, the PDB and the CRDs are validated (chart_validate.py),
not run.

Prints each step with its time; exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import base64
import copy
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))

from chart_validate import ChartError, Rendered, render

PREFIX = "clipserve-chart"
NETWORK = f"{PREFIX}-net"
MODEL = "shapes-demo"
API_KEY = "chart-check-key-0123456789"
API_UID = 10001
WAITING_S = 5.0
LABELS = ["red circle", "blue square", "green triangle"]
NOT_PLAYED = {
    "Service",
    "HorizontalPodAutoscaler",
    "PodDisruptionBudget",
    "Ingress",
    "ScaledObject",
    "ServiceMonitor",
}


class CheckFailed(Exception):
    pass


def check(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] [chart] {message}", flush=True)


# ---- what podman 4.3 can play ------------------------------------------------------------------


def secret_as_configmap(secret: dict[str, Any]) -> dict[str, Any]:
    data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
    data |= secret.get("stringData") or {}
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": secret["metadata"]["name"]},
        "data": data,
    }


def _secret_refs_to_configmaps(spec: dict[str, Any]) -> None:
    for container in spec.get("initContainers", []) + spec.get("containers", []):
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).pop("secretKeyRef", None)
            if ref is not None:
                env["valueFrom"]["configMapKeyRef"] = ref
        for source in container.get("envFrom", []):
            if "secretRef" in source:
                source["configMapRef"] = source.pop("secretRef")
    for volume in spec.get("volumes", []):
        secret = volume.pop("secret", None)
        if secret is not None:
            volume["configMap"] = {"name": secret.pop("secretName"), **secret}


def _own_empty_dirs(pod: str, spec: dict[str, Any]) -> None:
    """podman 4.3 makes a named volume of each emptyDir, named as the pod's volume: two pods with a
    `tmp` would share one. Each gets a name of its pod's."""
    renamed = {v["name"]: f"{pod}-{v['name']}" for v in spec.get("volumes", []) if "emptyDir" in v}
    for volume in spec.get("volumes", []):
        volume["name"] = renamed.get(volume["name"], volume["name"])
    for container in spec.get("initContainers", []) + spec.get("containers", []):
        for mount in container.get("volumeMounts", []):
            mount["name"] = renamed.get(mount["name"], mount["name"])


def pod_of(name: str, template: dict[str, Any], published: dict[str, int] | None = None) -> dict[str, Any]:
    """The pod template as a Pod podman 4.3 plays as rendered, but for the changes above."""
    spec = copy.deepcopy(template["spec"])
    _secret_refs_to_configmaps(spec)
    _own_empty_dirs(name, spec)
    if spec.get("restartPolicy", "Always") == "Always":
        spec["restartPolicy"] = "OnFailure"
    for container in spec["containers"]:
        # podman 4.3 publishes a containerPort on the host's same port: only the published stay
        container["ports"] = [
            {**port, "hostPort": published[port["name"]], "hostIP": "127.0.0.1"}
            for port in container.get("ports", [])
            if published and port.get("name") in published
        ]
    metadata = {"name": name, "labels": template.get("metadata", {}).get("labels", {})}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


@dataclass
class Playable:
    """One release as podman runs it: shared objects (ConfigMaps, claims), pods by name, the job's pod."""

    shared: list[dict[str, Any]] = field(default_factory=list)
    pods: dict[str, dict[str, Any]] = field(default_factory=dict)
    job: dict[str, Any] | None = None
    not_played: list[str] = field(default_factory=list)

    @property
    def claims(self) -> list[dict[str, Any]]:
        return [o for o in self.shared if o["kind"] == "PersistentVolumeClaim"]

    def with_configmaps(self, pod: dict[str, Any]) -> list[dict[str, Any]]:
        """The pod with every ConfigMap of its release: podman reads them only beside a pod."""
        return [*(o for o in self.shared if o["kind"] == "ConfigMap"), pod]


def playable(rendered: Rendered, api_port: int) -> Playable:
    out = Playable()
    for obj in rendered.objects:
        kind, name = obj["kind"], obj["metadata"]["name"]
        if kind == "ConfigMap" or kind == "PersistentVolumeClaim":
            out.shared.append(obj)
        elif kind == "Secret":
            out.shared.append(secret_as_configmap(obj))
        elif kind == "Deployment":
            out.pods[name] = pod_of(name, obj["spec"]["template"], {"http": api_port})
        elif kind == "StatefulSet":
            pod = pod_of(name, obj["spec"]["template"])
            for claim in obj["spec"].get("volumeClaimTemplates", []):
                claim_name = f"{claim['metadata']['name']}-{name}-0"
                out.shared.append(
                    {
                        "apiVersion": "v1",
                        "kind": "PersistentVolumeClaim",
                        "metadata": {"name": claim_name},
                        "spec": claim["spec"],
                    }
                )
                pod["spec"].setdefault("volumes", []).append(
                    {"name": claim["metadata"]["name"], "persistentVolumeClaim": {"claimName": claim_name}}
                )
            out.pods[name] = pod
        elif kind == "CronJob":
            out.job = pod_of(f"{name}-run", obj["spec"]["jobTemplate"]["spec"]["template"])
        elif kind in NOT_PLAYED:
            out.not_played.append(f"{kind}/{name}")
        else:
            raise CheckFailed(
                f"the chart rendered a {kind}, which this check neither plays nor knows to leave out"
            )
    return out


# ---- podman ------------------------------------------------------------------------------------


def podman(*args: str, check_rc: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check_rc and result.returncode != 0:
        raise CheckFailed(f"podman {' '.join(args[:3])}: {(result.stderr or result.stdout).strip()[-800:]}")
    return result


def play(objects: list[dict[str, Any]], folder: Path, name: str) -> None:
    podman("kube", "play", "--network", NETWORK, "--quiet", str(write(objects, folder, name)))


def play_in_background(objects: list[dict[str, Any]], folder: Path, name: str) -> subprocess.Popen[str]:
    """`kube play` returns once the init containers have finished: this one waits for a model."""
    path = write(objects, folder, name)
    return subprocess.Popen(
        ["podman", "kube", "play", "--network", NETWORK, "--quiet", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def write(objects: list[dict[str, Any]], folder: Path, name: str) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump_all(objects, sort_keys=False))
    return path


def container_of(pod: str, container: str) -> str:
    return f"{pod}-{container}"


def numeric_user(image: str) -> int:
    """The uid an image runs as (its USER may be a name: a stand-in's Debian user, say)."""
    user = podman("image", "inspect", "--format", "{{.Config.User}}", image).stdout.strip() or "0"
    if user.split(":")[0].isdigit():
        return int(user.split(":")[0])
    return int(podman("run", "--rm", "--entrypoint", "id", image, "-u", user).stdout.strip())


# ---- the checks --------------------------------------------------------------------------------


def picture(colour: str) -> str:
    image = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(image).ellipse((12, 12, 52, 52), fill=colour)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def probe_passes(pod: str, container: dict[str, Any], port: int | None) -> bool:
    """The container's rendered readiness probe, run once: httpGet through the published port, exec inside."""
    probe = container.get("readinessProbe")
    if probe is None:
        return True
    if "httpGet" in probe:
        try:
            return (
                httpx.get(f"http://127.0.0.1:{port}{probe['httpGet']['path']}", timeout=3).status_code == 200
            )
        except httpx.HTTPError:
            return False
    if "exec" in probe:
        name = container_of(pod, container["name"])
        return podman("exec", name, *probe["exec"]["command"], check_rc=False, timeout=30).returncode == 0
    return (
        podman(
            "inspect", "--format", "{{.State.Running}}", container_of(pod, container["name"]), check_rc=False
        ).stdout.strip()
        == "true"
    )


def wait_ready(
    pods: dict[str, tuple[dict[str, Any], int | None]], timeout_s: float, since: float
) -> dict[str, float]:
    """Seconds from `since` until each pod's containers pass their readiness probes (polled every 0.5 s)."""
    started, ready = since, {}
    while len(ready) < len(pods):
        for name, (pod, port) in pods.items():
            if name not in ready and all(probe_passes(name, c, port) for c in pod["spec"]["containers"]):
                ready[name] = time.monotonic() - started
                log(f"{name}: ready in {ready[name]:.1f} s")
        if time.monotonic() - started > timeout_s:
            late = sorted(set(pods) - set(ready))
            raise CheckFailed(f"not ready after {timeout_s:.0f} s: {', '.join(late)}\n{logs_of(late)}")
        time.sleep(0.5)
    return ready


def logs_of(pods: list[str]) -> str:
    lines = []
    for pod in pods:
        names = podman(
            "ps", "-a", "--filter", f"pod={pod}", "--format", "{{.Names}}", check_rc=False
        ).stdout.split()
        for name in names:
            if name.endswith("-infra"):
                continue
            out = podman("logs", "--tail", "15", name, check_rc=False)
            lines.append(f"--- {name}\n{(out.stdout + out.stderr).strip()}")
    return "\n".join(lines)


def classify(port: int, key: str | None, expect_version: int | None = None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"images": [picture("red")], "labels": LABELS, "top_k": 2}
    response = httpx.post(f"http://127.0.0.1:{port}/v1/classify", json=body, headers=headers, timeout=30)
    check(
        response.status_code == 200,
        f"/v1/classify on port {port}: {response.status_code} {response.text[:300]}",
    )
    answer = response.json()
    if expect_version is not None:
        check(
            answer["version"] == expect_version,
            f"/v1/classify answered with version {answer['version']}, not {expect_version}",
        )
    return answer


def knows_key_file(image: str) -> bool:
    """Whether the serving image's clip-serve reads API keys from a file (CLIPSERVE_API_KEYS_FILE)."""
    result = podman("run", "--rm", "--entrypoint", "clip-serve", image, "--help", check_rc=False, timeout=120)
    return "--api-keys-file" in result.stdout


@dataclass
class Images:
    serve: str
    train: str
    model: str
    redis: str
    postgres: str


def values_pvc(images: Images) -> list[str]:
    """--set pairs of the `clipserve-chart` release (the rest is the chart's defaults)."""
    serve_repo, serve_tag = images.serve.rsplit(":", 1)
    train_repo, train_tag = images.train.rsplit(":", 1)
    redis_repo, redis_tag = images.redis.rsplit(":", 1)
    pg_repo, pg_tag = images.postgres.rsplit(":", 1)
    redis_uid, pg_uid = numeric_user(images.redis), numeric_user(images.postgres)
    return [
        f"image.repository={serve_repo}",
        f"image.tag={serve_tag}",
        "image.pullPolicy=Never",
        "autoscaling.enabled=false",
        "replicaCount=1",
        "settings.reload_poll_s=2",
        "settings.workers=1",
        f"auth.apiKeys[0].key={API_KEY}",
        "auth.apiKeys[0].scopes={read,write,metrics}",
        f"redis.image.repository={redis_repo}",
        f"redis.image.tag={redis_tag}",
        "redis.image.pullPolicy=Never",
        f"redis.podSecurityContext.runAsUser={redis_uid}",
        f"redis.podSecurityContext.runAsGroup={redis_uid}",
        f"redis.podSecurityContext.fsGroup={redis_uid}",
        f"postgresql.image.repository={pg_repo}",
        f"postgresql.image.tag={pg_tag}",
        "postgresql.image.pullPolicy=Never",
        f"postgresql.podSecurityContext.runAsUser={pg_uid}",
        f"postgresql.podSecurityContext.runAsGroup={pg_uid}",
        f"postgresql.podSecurityContext.fsGroup={pg_uid}",
        "training.enabled=true",
        f"training.modelName={MODEL}",
        f"training.image.repository={train_repo}",
        f"training.image.tag={train_tag}",
        "training.image.pullPolicy=Never",
        # a run of two steps: the check is about the publishing path, not about learning
        "training.settings.data=synthetic:shapes?size=64",
        "training.settings.steps=2",
        "training.settings.batch_size=8",
        "training.settings.evaluate=false",
        "training.settings.progress=false",
    ]


def values_image(images: Images) -> list[str]:
    serve_repo, serve_tag = images.serve.rsplit(":", 1)
    model_repo, model_tag = images.model.rsplit(":", 1)
    return [
        f"image.repository={serve_repo}",
        f"image.tag={serve_tag}",
        "image.pullPolicy=Never",
        "autoscaling.enabled=false",
        "replicaCount=1",
        "podDisruptionBudget.enabled=false",
        "models.source=image",
        f"models.image.repository={model_repo}",
        f"models.image.tag={model_tag}",
        "models.image.pullPolicy=Never",
        "collections.backend=embedded",
        "collections.persistence.enabled=false",
        "redis.enabled=false",
        "postgresql.enabled=false",
    ]


@dataclass
class Run:
    images: Images
    api_port: int
    image_api_port: int
    folder: Path
    timings: list[tuple[str, float]] = field(default_factory=list)
    releases: list[Playable] = field(default_factory=list)
    # seconds to ready: the stores and the model-image API from their kube play, the API on the
    # models volume from the moment its first model landed there
    ready: dict[str, float] = field(default_factory=dict)
    # a `kube play` still waiting on an init container holds podman's locks: ended before clean-up
    playing: subprocess.Popen[str] | None = None

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        log(f"== {name}")
        started = time.monotonic()
        yield
        self.timings.append((name, time.monotonic() - started))
        log(f"{name}: ok in {self.timings[-1][1]:.1f} s")

    def main(self) -> None:
        with self.step("render both releases (helm template) and turn them into pods"):
            pvc = playable(render(set_values=values_pvc(self.images), release=PREFIX), self.api_port)
            img = playable(
                render(set_values=values_image(self.images), release=f"{PREFIX}-img"), self.image_api_port
            )
            self.releases = [pvc, img]
            log(f"not played (validated only): {', '.join(pvc.not_played + img.not_played)}")
            check(pvc.job is not None, "the clipserve-chart release rendered no training CronJob")
        api, stores = PREFIX, [f"{PREFIX}-redis", f"{PREFIX}-postgresql"]
        with self.step("kube play: Redis, PostgreSQL, the API on the model image"):
            podman("network", "create", NETWORK)
            play(pvc.claims + img.claims, self.folder, "claims")
            played = time.monotonic()
            for name in stores:
                play(pvc.with_configmaps(pvc.pods[name]), self.folder, name)
            for name, pod in img.pods.items():
                play(img.with_configmaps(pod), self.folder, name)
        with self.step("stores and the model-image API ready (their rendered readiness probes)"):
            ready = wait_ready(
                {
                    **{s: (pvc.pods[s], None) for s in stores},
                    f"{PREFIX}-img": (img.pods[f"{PREFIX}-img"], self.image_api_port),
                },
                timeout_s=180,
                since=played,
            )
        with self.step("model image: one classification through the published port"):
            answer = classify(self.image_api_port, None)
            log(f"{answer['model']}@{answer['version']}: {answer['results'][0]['labels'][0]}")
        with self.step("models volume: the API waits for a model, one is published, the API becomes ready"):
            bundle = self.bundle_of_model_image()
            mountpoint = Path(
                podman("volume", "inspect", "--format", "{{.Mountpoint}}", f"{PREFIX}-models").stdout.strip()
            )
            self.playing = playing = play_in_background(pvc.with_configmaps(pvc.pods[api]), self.folder, api)
            # kube play returns once the init containers have finished (and holds podman's locks
            # until then): still running after a while, with the volume empty, the API is waiting
            time.sleep(WAITING_S)
            if playing.poll() is not None:
                raise CheckFailed(
                    f"kube play of {api} ended with no model in the volume: {playing.communicate()[0]}"
                )
            log(f"{api}: still in wait-for-model after {WAITING_S:.0f} s with the models volume empty")
            seeded = time.monotonic()
            publish_into(mountpoint, bundle)
            out, _ = playing.communicate(timeout=300)
            check(playing.returncode == 0, f"kube play of {api}: {out}")
            ready |= wait_ready({api: (pvc.pods[api], self.api_port)}, timeout_s=180, since=seeded)
        with self.step("models volume: one classification through the published port, the scaling metric"):
            self.check_auth()
            answer = classify(self.api_port, API_KEY, expect_version=1)
            log(f"{answer['model']}@{answer['version']}: {answer['results'][0]['labels'][0]}")
            metrics = httpx.get(
                f"http://127.0.0.1:{self.api_port}/metrics",
                headers={"Authorization": f"Bearer {API_KEY}"},
                timeout=10,
            )
            check(metrics.status_code == 200, f"/metrics: {metrics.status_code}")
            line = next(
                (x for x in metrics.text.splitlines() if x.startswith("clipserve_requests_in_flight")), None
            )
            check(line is not None, "/metrics has no clipserve_requests_in_flight, the autoscalers' signal")
            log(f"/metrics: {line}")
        started_at = podman(
            "inspect", "--format", "{{.State.StartedAt}}", container_of(api, "api")
        ).stdout.strip()
        with self.step("training Job (the CronJob's pod, the training image) publishes version 2"):
            assert pvc.job is not None
            job = pvc.job["metadata"]["name"]
            play(pvc.with_configmaps(pvc.job), self.folder, job)
            code = podman("wait", container_of(job, "train"), timeout=900).stdout.strip()
            out = podman("logs", container_of(job, "train"), check_rc=False)
            check(code == "0", f"the training Job exited {code}:\n{(out.stdout + out.stderr)[-2000:]}")
            published = [
                line for line in (out.stdout + out.stderr).splitlines() if line.startswith("published ")
            ]
            log(published[-1] if published else "published (no line)")
        with self.step("the running API serves version 2 (hot reload, no restart)"):
            deadline = time.monotonic() + 60
            while True:
                answer = classify(self.api_port, API_KEY)
                if answer["version"] == 2:
                    break
                check(
                    time.monotonic() < deadline,
                    f"still version {answer['version']} 60 s after the Job published 2",
                )
                time.sleep(0.5)
            now = podman(
                "inspect", "--format", "{{.State.StartedAt}}", container_of(api, "api")
            ).stdout.strip()
            check(now == started_at, f"the API container restarted ({started_at} -> {now})")
            log(f"{answer['model']}@{answer['version']} served by the same container (started {started_at})")
        self.ready = ready

    def bundle_of_model_image(self) -> Path:
        """The model image's repository, copied out to this run's folder (with the image's own cp)."""
        out = self.folder / "model-image"
        out.mkdir()
        podman(
            "run",
            "--rm",
            "--user",
            "0",
            "-v",
            f"{out}:/out",
            "--entrypoint",
            "cp",
            self.images.model,
            "-R",
            "/clipserve-models/.",
            "/out/",
        )
        return out

    def check_auth(self) -> None:
        if not knows_key_file(self.images.serve):
            log(
                "API keys from the mounted Secret: not checked, this image's clip-serve has no --api-keys-file"
            )
            return
        response = httpx.post(f"http://127.0.0.1:{self.api_port}/v1/classify", json={}, timeout=10)
        check(
            response.status_code == 401,
            f"without a key /v1/classify answered {response.status_code}, not 401",
        )
        log("API keys from the mounted Secret: 401 without a key, 200 with it")


def publish_into(repository: Path, source: Path) -> None:
    """Each version under `source` into `repository` as the exporter publishes: a hidden temporary
    folder beside it, then one rename, so a poll never sees half a bundle."""
    for version in sorted(source.glob("*/*")):
        target = repository / version.parent.name / version.name
        target.parent.mkdir(exist_ok=True)
        staging = target.parent / f".{version.name}.publishing"
        shutil.copytree(version, staging)
        for path in [target.parent, staging, *staging.rglob("*")]:
            os.chown(path, API_UID, API_UID)
        staging.rename(target)


ANONYMOUS = re.compile(r"^[0-9a-f]{64}$")


def volumes() -> set[str]:
    return set(podman("volume", "ls", "--format", "{{.Name}}", check_rc=False).stdout.split())


def leftovers() -> list[str]:
    found = []
    found += [
        f"pod {n}"
        for n in podman("pod", "ps", "--format", "{{.Name}}", check_rc=False).stdout.split()
        if n.startswith(PREFIX)
    ]
    found += [
        f"volume {n}"
        for n in podman("volume", "ls", "--format", "{{.Name}}", check_rc=False).stdout.split()
        if PREFIX in n
    ]
    found += [
        f"network {n}"
        for n in podman("network", "ls", "--format", "{{.Name}}", check_rc=False).stdout.split()
        if n == NETWORK
    ]
    return found


def clean_up(volumes_before: set[str]) -> None:
    """Every pod, volume and the network of this check, by name, and the anonymous volumes its
    containers made (an image's VOLUME that no mount covers) since it started: nothing else."""
    for line in leftovers():
        kind, name = line.split(" ", 1)
        if kind == "pod":
            podman("pod", "rm", "-f", "-t", "2", name, check_rc=False, timeout=120)
    for line in leftovers():
        kind, name = line.split(" ", 1)
        if kind == "volume":
            podman("volume", "rm", "-f", name, check_rc=False)
        elif kind == "network":
            podman("network", "rm", "-f", name, check_rc=False)
    for name in volumes() - volumes_before:
        if ANONYMOUS.match(name):
            podman("volume", "rm", name, check_rc=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve-image", required=True)
    parser.add_argument("--train-image", required=True)
    parser.add_argument("--model-image", required=True)
    parser.add_argument("--redis-image", default="docker.io/library/redis:7.4-alpine")
    parser.add_argument("--postgres-image", default="docker.io/pgvector/pgvector:pg17")
    parser.add_argument("--api-port", type=int, required=True)
    parser.add_argument("--image-api-port", type=int, required=True)
    args = parser.parse_args(argv)
    images = Images(
        args.serve_image, args.train_image, args.model_image, args.redis_image, args.postgres_image
    )
    left = leftovers()
    if left:
        print(f"chart podman check: FAILED: left from an earlier run: {', '.join(left)}", file=sys.stderr)
        return 1
    volumes_before = volumes()
    # a stopped run (timeout, Ctrl-C) still cleans up after itself
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="clipserve-chart-") as folder:
        run = Run(images, args.api_port, args.image_api_port, Path(folder))
        try:
            run.main()
        except (CheckFailed, ChartError, subprocess.TimeoutExpired, httpx.HTTPError) as exc:
            print(f"chart podman check: FAILED: {exc}", file=sys.stderr)
            return 1
        finally:
            if run.playing is not None and run.playing.poll() is None:
                run.playing.terminate()
                run.playing.wait(timeout=60)
            clean_up(volumes_before)
            left = leftovers()
    if left:
        print(f"chart podman check: FAILED: clean-up left {', '.join(left)}", file=sys.stderr)
        return 1
    log("clean-up: no pod, volume or network of the check left")
    print("chart podman check: passed")
    for name, seconds in run.timings:
        print(f"  {name:<92} {seconds:6.1f} s")
    print(
        "  ready (stores, model-image API: from kube play; models-volume API: from its first model): "
        + ", ".join(f"{pod} {s:.1f} s" for pod, s in run.ready.items())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
