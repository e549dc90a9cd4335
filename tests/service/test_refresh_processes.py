"""A model refresh with real `clip-serve` processes under load: searches (by text and image) and writes
never fail while a published version of other weights moves the collection, the replica running the
job is killed with SIGKILL mid-job and the job goes on (another replica taking its lease, or the same
one restarted), and afterwards every item is there once, with the new version's vectors: the
writes made during the job too (checked against a direct embedding)."""

from __future__ import annotations

import itertools
import random
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.fixtures.models import publish_copy
from tests.fixtures.service import b64, image_bytes

ADMIN = {"authorization": "Bearer admin"}
TEXTS = [f"a photo of thing number {i}" for i in range(150)]
PHOTOS = {f"p{i}": image_bytes(100 + i, size=(40, 36)) for i in range(30)}


class Load:
    """Clients searching by text and by image and adding items, against whichever replicas are up
    (as a load balancer would send them); counts every answer and keeps every acknowledged write."""

    def __init__(self, bases: list[str], clients: int = 3):
        self.bases = list(bases)
        self.stop = threading.Event()
        self.statuses: Counter[str] = Counter()
        self.failures: list[str] = []
        self.written: dict[str, str] = {}
        # writes in flight to a replica as it was killed: committed or not, the client cannot know
        self.unknown: dict[str, str] = {}
        self.versions: Counter[int] = Counter()
        self.lock = threading.Lock()
        self._ids = itertools.count()
        self.threads = [threading.Thread(target=self._work, args=(n,), daemon=True) for n in range(clients)]

    def replace(self, old: str | None, new: str | None) -> None:
        with self.lock:
            if old in self.bases:
                self.bases.remove(old)
            if new is not None:
                self.bases.append(new)

    def _work(self, seed: int) -> None:
        rng = random.Random(seed)
        query_image = b64(PHOTOS["p3"])
        with httpx.Client(timeout=30) as client:
            while not self.stop.is_set():
                with self.lock:
                    base = rng.choice(self.bases)
                kind = ("search-text", "search-image", "write")[next(self._ids) % 3]
                if kind == "write":
                    item_id, text = f"w{next(self._ids)}", f"written during the refresh {rng.random()}"
                    url, body = "/v1/collections/things/items", {"items": [{"id": item_id, "text": text}]}
                elif kind == "search-text":
                    url, body = "/v1/collections/things/search", {"text": rng.choice(TEXTS), "top_k": 3}
                else:
                    url, body = "/v1/collections/things/search", {"image": query_image, "top_k": 3}
                try:
                    response = client.post(base + url, json=body)
                except httpx.TransportError:
                    with self.lock:
                        if base in self.bases:  # a replica that is up did not answer
                            self.failures.append(f"{kind}: no answer from {base}")
                        elif kind == "write":
                            self.unknown[item_id] = text
                    continue
                with self.lock:
                    self.statuses[kind] += 1
                    if response.status_code != 200:
                        self.failures.append(f"{kind}: {response.status_code} {response.text[:200]}")
                    elif kind == "write":
                        self.written[item_id] = text
                    else:
                        self.versions[response.json()["version"]] += 1

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)


def fill(base: str) -> None:
    with httpx.Client(base_url=base, timeout=60) as client:
        assert client.post("/v1/collections", json={"name": "things"}).status_code == 201
        for start in range(0, len(TEXTS), 50):
            items = [{"id": f"t{i}", "text": TEXTS[i]} for i in range(start, min(start + 50, len(TEXTS)))]
            assert client.post("/v1/collections/things/items", json={"items": items}).status_code == 200
        photos = [{"id": item_id, "image": b64(data)} for item_id, data in PHOTOS.items()]
        assert client.post("/v1/collections/things/items", json={"items": photos}).status_code == 200


def job_of(base: str, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        jobs = httpx.get(f"{base}/v1/jobs", params={"collection": "things"}).json()["data"]
        if jobs:
            return jobs[0]
        assert time.monotonic() < deadline, "no re-embed job started"
        time.sleep(0.1)


def wait_until(base: str, job_id: str, ready, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        job = httpx.get(f"{base}/v1/jobs/{job_id}").json()
        if ready(job):
            return job
        assert job["state"] not in ("failed", "cancelled"), job
        assert time.monotonic() < deadline, f"job not there after {timeout_s} s: {job}"
        time.sleep(0.1)


def check_every_item_moved(base: str, written: dict[str, str], unknown: dict[str, str] | None = None) -> None:
    """Every item once, each with the vector the new version gives its source; a write whose answer
    was lost with its replica counts if it was committed."""
    with httpx.Client(base_url=base, timeout=60) as client:
        committed = {
            i: t
            for i, t in (unknown or {}).items()
            if client.get(f"/v1/collections/things/items/{i}").status_code == 200
        }
        written = written | committed
        info = client.get("/v1/collections/things").json()
        assert (info["version"], info["count"]) == (2, len(TEXTS) + len(PHOTOS) + len(written))
        texts = {f"t{i}": t for i, t in enumerate(TEXTS)} | written
        ids = list(texts)
        direct = []
        for start in range(0, len(ids), 200):
            part = [texts[i] for i in ids[start : start + 200]]
            direct += client.post("/v1/embed", json={"texts": part, "model": "tiny@2"}).json()[
                "text_embeddings"
            ]
        images = client.post(
            "/v1/embed", json={"images": [b64(d) for d in PHOTOS.values()], "model": "tiny@2"}
        ).json()["image_embeddings"]
        for item_id, expected in [*zip(ids, direct, strict=True), *zip(PHOTOS, images, strict=True)]:
            item = client.get(f"/v1/collections/things/items/{item_id}")
            assert item.status_code == 200, (item_id, item.text)
            assert float(np.dot(item.json()["vector"], expected)) >= 0.9999, item_id


def owner_pid(job: dict) -> int:
    return int(job["owner"].split(":")[1])


@pytest.fixture
def repo(tiny_repo: Path, tmp_path: Path) -> Path:
    root = tmp_path / "models"
    shutil.copytree(tiny_repo, root)
    return root


def settings(repo: Path, redis_url: str, **more: object) -> dict[str, object]:
    return {
        "models_dir": repo,
        "redis_url": redis_url,
        "admin_key": "admin",
        "workers": 1,
        "reembed_poll_s": 0.3,
        "reembed_lease_s": 2,
        "reembed_rate": 40,
        "reembed_chunk": 16,
        "reembed_grace_s": 300,
        **more,
    }


def test_replicas_keep_answering_and_another_takes_the_job_of_one_killed(
    clip_serve, repo, tiny_retrained_repo, postgres_schema_dsn, service_redis_url
):
    config = settings(
        repo, service_redis_url, collections_backend="pgvector", postgres_dsn=postgres_schema_dsn
    )
    replicas = [clip_serve(**config) for _ in range(2)]
    fill(replicas[0].base)
    with Load([r.base for r in replicas]) as load:
        time.sleep(1.0)
        assert publish_copy(repo, source=tiny_retrained_repo) == 2
        for replica in replicas:
            assert httpx.post(f"{replica.base}/v1/admin/reload", headers=ADMIN, timeout=60).status_code == 200
        job = job_of(replicas[0].base)
        job = wait_until(replicas[0].base, job["id"], lambda j: j["done"] > 0 and j["state"] == "running")
        victim = next(r for r in replicas if r.process.pid == owner_pid(job))
        survivor = next(r for r in replicas if r is not victim)
        load.replace(victim.base, None)
        victim.kill()
        done = wait_until(survivor.base, job["id"], lambda j: j["state"] == "switched")
        restarted = clip_serve(**config)  # the killed replica comes back
        load.replace(None, restarted.base)
        time.sleep(1.0)
    assert load.failures == [], load.failures[:5]
    assert load.statuses["write"] > 10 and load.versions[1] > 0 and load.versions[2] > 0, load.statuses
    assert done["done"] == done["total"]
    log = survivor.log()
    assert f"re-embed {job['id']}" in log and "switched" in log  # finished by the survivor
    check_every_item_moved(restarted.base, load.written, load.unknown)


def test_the_job_resumes_when_its_only_replica_is_killed_and_restarted(
    clip_serve, repo, tiny_retrained_repo, tmp_path, service_redis_url
):
    config = settings(repo, service_redis_url, data_dir=tmp_path / "data")
    server = clip_serve(**config)
    fill(server.base)
    with Load([server.base]) as load:
        time.sleep(0.5)
        publish_copy(repo, source=tiny_retrained_repo)
        assert httpx.post(f"{server.base}/v1/admin/reload", headers=ADMIN, timeout=60).status_code == 200
        job = job_of(server.base)
        job = wait_until(server.base, job["id"], lambda j: j["done"] >= 32)
        load.replace(server.base, None)
    server.kill()
    restarted = clip_serve(**config)
    with Load([restarted.base]) as after:
        done = wait_until(restarted.base, job["id"], lambda j: j["state"] == "switched")
        time.sleep(0.5)
    assert load.failures == [] and after.failures == [], (load.failures[:5], after.failures[:5])
    assert after.versions[2] > 0
    assert done["done"] == done["total"] and done["owner"] is None
    resumed = [line for line in restarted.log().splitlines() if f"re-embed {job['id']}" in line]
    assert any("started at" in line and "the first item" not in line for line in resumed), resumed
    check_every_item_moved(restarted.base, load.written | after.written)
