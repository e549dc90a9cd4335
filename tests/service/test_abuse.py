"""Abusive requests against real `clip-serve` processes: each is answered within its budget, by a 4xx
that names the limit and the value or by the answer itself, while /livez answers in under a second
throughout and the process's memory stays bounded. Prompts (templates, labels x templates, the
tokenizer's input), label-set builds (a cap, a queue, cancellation, a time budget), class matrices
(an LRU by bytes, Redis with a TTL), images (pixels per image and per request, formats, the 429
before decoding, alpha) and image URLs (a total deadline, a pool per request, malformed and
disguised private addresses); and three replicas sharing a set of the worst templates allowed."""

from __future__ import annotations

import base64
import http.server
import io
import random
import re
import string
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.fixtures.load import Load, encoder_calls
from tests.fixtures.service import ServiceProcess, b64, image_bytes, png_claiming, spawn_clip_serve

IMAGE = b64(image_bytes(seed=5))
# Limits of the shared server below, small where a test must reach them quickly.
MAX_PROMPTS = 400
MAX_REQUEST_PIXELS = 40_000_000
MAX_QUEUE = 8
MATRIX_BYTES = 200_000
CACHE_TTL_S = 100
FETCH_TIMEOUT_S = 2.0


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def words(rng: random.Random, chars: int) -> str:
    """Random lowercase words, exactly `chars` characters: text no cache has seen."""
    text = ""
    while len(text) < chars:
        text += "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 9))) + " "
    return text[:chars].rstrip() + "x" * (chars - len(text[:chars].rstrip()))


def worst_templates(rng: random.Random, count: int = 100, chars: int = 1000, slots: int = 4) -> list[str]:
    """The worst templates the default limits allow: `chars` characters, `slots` times the label."""
    templates = []
    for i in range(count):
        head = f"{i}: " + "{} and " * slots
        templates.append(head + words(rng, chars - len(head)))
    return templates


def worst_set(seed: int, labels: int) -> dict:
    """A label set of `labels` 2,000-character labels in the worst templates: each prompt holds its
    label four times (8,992 characters; the tokenizer reads the first 2,541)."""
    rng = random.Random(seed)
    return {"labels": [words(rng, 2000) for _ in range(labels)], "templates": worst_templates(rng)}


def rss_mb(server: ServiceProcess, field: str = "VmRSS") -> float:
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith(field)) / 1024


class Watch:
    """While open: each server's /livez polled every 50 ms (its slowest answer kept; no answer counts
    as infinitely slow) and its peak resident memory over what it held at the start (the kernel's
    high-water mark, reset at the start)."""

    def __init__(self, *servers: ServiceProcess):
        self.servers = servers
        self.slowest = dict.fromkeys((s.base for s in servers), 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                for server in self.servers:
                    started = time.perf_counter()
                    try:
                        ok = client.get(f"{server.base}/livez").status_code == 200
                    except httpx.HTTPError:
                        ok = False
                    took = time.perf_counter() - started if ok else float("inf")
                    self.slowest[server.base] = max(self.slowest[server.base], took)
                self._stop.wait(0.05)

    def __enter__(self) -> Watch:
        self.start_mb = {}
        for server in self.servers:
            Path(f"/proc/{server.process.pid}/clear_refs").write_text("5")  # resets VmHWM
            self.start_mb[server.base] = rss_mb(server)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(30)
        self.growth_mb = {s.base: rss_mb(s, "VmHWM") - self.start_mb[s.base] for s in self.servers}

    def assert_healthy(self, max_growth_mb: float) -> None:
        assert all(s < 1.0 for s in self.slowest.values()), f"/livez slowest answers (s): {self.slowest}"
        assert all(g < max_growth_mb for g in self.growth_mb.values()), (
            f"peak RSS growth (MB): {self.growth_mb}"
        )


def expect_limit(response: httpx.Response, status: int, code: str, *words_in_message: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == code, error
    for word in words_in_message:
        assert word in error["message"], error["message"]


@pytest.fixture(scope="module")
def abuse_server(micro_repo: Path, service_redis_url: str, tmp_path_factory) -> Iterator[ServiceProcess]:
    """One real server for the request budgets: the micro model, private URLs allowed (the abusive
    URL servers run on loopback), and the limits above."""
    folder = tmp_path_factory.mktemp("abuse")
    server = spawn_clip_serve(
        folder,
        models_dir=micro_repo,
        redis_url=service_redis_url,
        data_dir=folder / "data",
        preprocess_workers=2,
        url_fetch_enabled="true",
        url_allowed_hosts="127.0.0.1",
        url_allow_private="true",
        url_fetch_timeout_s=FETCH_TIMEOUT_S,
        url_fetch_connections=2,
        max_prompts_per_request=MAX_PROMPTS,
        max_request_pixels=MAX_REQUEST_PIXELS,
        max_queue=MAX_QUEUE,
        cache_matrix_bytes=MATRIX_BYTES,
        cache_ttl_s=CACHE_TTL_S,
    )
    yield server
    server.stop()


# 1. Prompts ---------------------------------------------------------------------------------------


def test_prompt_bombs_are_refused_by_name_and_the_worst_allowed_request_is_served(abuse_server) -> None:
    base, rng = abuse_server.base, random.Random(1)
    label = words(rng, 2000)
    with Watch(abuse_server) as watch, httpx.Client(base_url=base, timeout=60) as client:
        # the 62 KB and 12 KB bodies: one label of 2,000 characters, one template of "{}" x N
        for repeats in (30_000, 5000):
            body = {"images": [IMAGE], "labels": [label], "templates": ["{}" * repeats]}
            response = client.post("/v1/classify", json=body)
            expect_limit(response, 413, "template_too_long", "max_template_chars", str(2 * repeats))
        stored = client.put(
            f"/v1/labelsets/{unique('bomb')}", json={"labels": [label], "templates": ["{}" * 30_000]}
        )
        expect_limit(stored, 413, "template_too_long", "max_template_chars")
        slots = client.post(
            "/v1/classify", json={"images": [IMAGE], "labels": ["cat"], "templates": ["{} " * 5]}
        )
        expect_limit(slots, 413, "too_many_slots", "max_template_slots", "5")
        many = {
            "images": [IMAGE],
            "labels": [f"thing {i}" for i in range(MAX_PROMPTS + 1)],
            "templates": "none",
        }
        expect_limit(
            client.post("/v1/classify", json=many), 413, "too_many_prompts", "max_prompts_per_request", "401"
        )
        worst = {
            "images": [IMAGE],
            "labels": [words(rng, 2000) for _ in range(4)],
            "templates": worst_templates(rng),
        }
        served = client.post("/v1/classify", json=worst)
    assert served.status_code == 200 and len(served.json()["results"][0]["labels"]) == 4, served.text
    watch.assert_healthy(max_growth_mb=200)


# 3. Class matrices: an LRU by bytes in process, a TTL in Redis ------------------------------------------


def matrix_bytes(client: httpx.Client) -> float:
    return float(re.search(r"^clipserve_class_matrix_bytes (\S+)$", client.get("/metrics").text, re.M)[1])


def test_class_matrices_stay_within_their_byte_budget_and_keep_a_ttl_in_redis_while_used(
    abuse_server, service_redis_url
) -> None:
    import redis

    from clipserve.service.inference.engine import classes_digest
    from clipserve.service.templates import DEFAULT_TEMPLATES

    store = redis.Redis.from_url(service_redis_url)
    name, labels = unique("ttl"), ["cat", "dog", "car"]
    with Watch(abuse_server) as watch, httpx.Client(base_url=abuse_server.base, timeout=60) as client:
        space = client.get("/v1/models").json()["data"][0]["content_hash"]
        key = f"clipserve:v1:{space}:classes:{classes_digest(labels, DEFAULT_TEMPLATES)}"
        assert client.put(f"/v1/labelsets/{name}", json={"labels": labels}).status_code == 200
        assert 0 < store.ttl(key) <= CACHE_TTL_S
        store.expire(key, 5)
        # 12 ad-hoc vocabularies of 400 labels (25.6 KB of class vectors each), 300 KB in all
        for round_ in range(12):
            ad_hoc = {
                "images": [IMAGE],
                "labels": [f"r{round_} item {i}" for i in range(400)],
                "templates": "none",
            }
            assert client.post("/v1/classify", json=ad_hoc).status_code == 200
            assert matrix_bytes(client) <= MATRIX_BYTES
        # the set's matrix has left this process: classifying reads it from Redis, renewing its TTL
        assert client.post("/v1/classify", json={"images": [IMAGE], "labelset": name}).status_code == 200
        assert store.ttl(key) > CACHE_TTL_S / 2
        assert client.delete(f"/v1/labelsets/{name}").status_code == 204
        assert store.exists(key) == 0
    watch.assert_healthy(max_growth_mb=150)


# 4. Images -----------------------------------------------------------------------------------------


def test_images_are_refused_from_their_headers_before_admission_and_decoding(abuse_server) -> None:
    from PIL import Image

    tga = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(tga, format="TGA")
    with Watch(abuse_server) as watch, httpx.Client(base_url=abuse_server.base, timeout=60) as client:
        fifty_mp = client.post("/v1/embed", json={"images": [b64(png_claiming(7072, 7072))]})
        expect_limit(fifty_mp, 413, "image_too_large", "7072x7072", "max_image_pixels")
        three = [b64(png_claiming(4000, 4000))] * 3  # 16 MP each: allowed alone, 48 MP together
        expect_limit(
            client.post("/v1/embed", json={"images": three}),
            413,
            "too_many_pixels",
            "48000000",
            "max_request_pixels",
        )
        expect_limit(
            client.post("/v1/embed", json={"images": [b64(tga.getvalue())]}),
            400,
            "invalid_image",
            "format this server decodes",
        )
        # more than the queue holds: refused (429) before anything is decoded (these would be 400s)
        junk = [base64.b64encode(b"not an image %d" % i).decode() for i in range(MAX_QUEUE + 1)]
        crowd = client.post("/v1/embed", json={"images": junk})
        assert crowd.status_code == 429 and crowd.headers["retry-after"], crowd.text
    watch.assert_healthy(max_growth_mb=100)


def test_an_image_with_alpha_is_flattened_in_one_new_image(abuse_server) -> None:
    from PIL import Image

    png = io.BytesIO()
    Image.new("RGBA", (4096, 4096), (10, 200, 30, 100)).save(png, format="PNG")  # 16.8 MP, the default cap
    with Watch(abuse_server) as watch, httpx.Client(base_url=abuse_server.base, timeout=120) as client:
        response = client.post("/v1/embed", json={"images": [b64(png.getvalue())]})
    assert response.status_code == 200, response.text
    # decoded RGBA (64 MiB) and the white RGB canvas it is blended onto (64 MiB); earlier, five such copies
    watch.assert_healthy(max_growth_mb=200)


# 5. Image URLs ---------------------------------------------------------------------------------------


class _SlowPictures(http.server.BaseHTTPRequestHandler):
    picture = image_bytes(seed=8)

    def do_GET(self) -> None:
        if self.path.startswith("/drip"):  # a promised megabyte, one byte every 0.2 s
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", "1000000")
            self.end_headers()
            try:
                for _ in range(300):
                    self.wfile.write(b"\x89")
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                pass
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(self.picture)))
        self.end_headers()
        self.wfile.write(self.picture)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def slow_pictures() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SlowPictures)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join(5)


def test_a_drip_fed_url_is_cut_at_the_deadline_and_holds_up_no_other_request(
    abuse_server, slow_pictures
) -> None:
    drips = {"images": [f"{slow_pictures}/drip{i}" for i in range(4)]}  # twice this request's pool
    with Watch(abuse_server) as watch, ThreadPoolExecutor(2) as pool:
        started = time.monotonic()
        dripping = pool.submit(httpx.post, f"{abuse_server.base}/v1/embed", json=drips, timeout=60)
        time.sleep(0.5)
        asked = time.monotonic()
        other = httpx.post(
            f"{abuse_server.base}/v1/embed", json={"images": [f"{slow_pictures}/a.png"]}, timeout=60
        )
        other_s = time.monotonic() - asked
        cut = dripping.result()
        cut_s = time.monotonic() - started
        malformed = httpx.post(
            f"{abuse_server.base}/v1/embed", json={"images": ["http://127.0.0.1:99999/a.png"]}
        )
    assert other.status_code == 200 and other_s < 1.5, (other.status_code, other_s)
    expect_limit(cut, 400, "invalid_image", "url_fetch_timeout_s")
    assert cut_s < FETCH_TIMEOUT_S + 5, cut_s
    expect_limit(malformed, 400, "invalid_image", "malformed", "Port out of range")
    watch.assert_healthy(max_growth_mb=100)


def test_ipv6_forms_of_private_addresses_are_refused(make_client) -> None:
    from clipserve.service.inference.inputs import is_public

    client = make_client(url_fetch_enabled=True, url_allowed_hosts=["*"])
    disguised = [
        "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
        "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
        "64:ff9b:1::808:808",  # local-use NAT64: a site's own translator
        "2002:7f00:1::1",  # 6to4 of 127.0.0.1
        "2002:c0a8:101::1",  # 6to4 of 192.168.1.1
        "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo whose client is 127.0.0.1
        "::127.0.0.1",  # IPv4-compatible
        "::ffff:127.0.0.1",  # IPv4-mapped
    ]
    for address in disguised:
        response = client.post("/v1/embed", json={"images": [f"http://[{address}]/a.png"]})
        expect_limit(response, 400, "invalid_image", "private or loopback")
    import ipaddress

    assert is_public(ipaddress.ip_address("64:ff9b::808:808"))  # NAT64 of 8.8.8.8 is as public as it
    assert is_public(ipaddress.ip_address("2002:808:808::1"))


# 2. Label-set builds -------------------------------------------------------------------------------------


def wait_for(client: httpx.Client, name: str, statuses: set[str], timeout_s: float = 180) -> dict:
    deadline = time.monotonic() + timeout_s
    while (info := client.get(f"/v1/labelsets/{name}").json())["status"] not in statuses:
        assert time.monotonic() < deadline, info
        time.sleep(0.2)
    return info


def test_builds_are_capped_queued_and_stopped_by_put_and_delete(clip_serve, micro_repo, tmp_path) -> None:
    server = clip_serve(
        models_dir=micro_repo, redis_url="none", data_dir=tmp_path / "data", labelset_builds=1
    )
    first, second = unique("first"), unique("second")
    light = {"labels": [f"thing {i}" for i in range(60)], "templates": "imagenet80"}  # 4,800 short prompts
    with Watch(server) as watch, httpx.Client(base_url=server.base, timeout=60) as client:
        put = client.put(f"/v1/labelsets/{first}", json=worst_set(1, 60))
        assert put.status_code == 202 and put.json()["status"] == "building", put.text
        put = client.put(f"/v1/labelsets/{second}", json=worst_set(2, 60))
        assert put.status_code == 202 and put.json()["status"] == "queued", put.text
        assert client.get(f"/v1/labelsets/{second}").json()["queue_position"] == 1
        busy = client.post("/v1/classify", json={"images": [IMAGE], "labelset": second})
        expect_limit(busy, 409, "labelset_building", "queued")
        # the new labels of the first set stop the build of its old ones; deleting the second stops its
        replaced = client.put(f"/v1/labelsets/{first}", json=light)
        assert replaced.status_code == 202 and replaced.json()["status"] == "queued", replaced.text
        assert client.delete(f"/v1/labelsets/{second}").status_code == 204
        info = wait_for(client, first, {"ready", "failed"})
        assert client.get(f"/v1/labelsets/{second}").status_code == 404
        metrics = client.get("/metrics").text
    assert info["status"] == "ready" and info["labels"] == light["labels"], info
    log = server.log()
    assert f"label set {first}: stopped its build on micro@1 (replaced)" in log
    assert f"label set {second}: stopped its build on micro@1 (deleted)" in log
    assert 'clipserve_labelset_builds{state="running"} 0.0' in metrics
    watch.assert_healthy(max_growth_mb=300)


def test_a_build_over_its_time_budget_fails_the_set_on_every_replica(
    clip_serve, micro_repo, tmp_path, private_redis
) -> None:
    private_redis.start()
    shared = dict(
        models_dir=micro_repo,
        redis_url=private_redis.url(),
        data_dir=tmp_path / "shared",
        labelset_build_timeout_s=1,
        labelset_lease_s=2,
    )
    builder, other = clip_serve(**shared), clip_serve(**shared)
    name = unique("slow")
    with Watch(builder, other) as watch:
        put = httpx.put(f"{builder.base}/v1/labelsets/{name}", json=worst_set(3, 60), timeout=60)
        assert put.status_code == 202, put.text
        with httpx.Client(base_url=other.base, timeout=60) as client:
            failed = wait_for(client, name, {"failed", "ready"}, timeout_s=60)
            assert failed["status"] == "failed" and "labelset_build_timeout_s" in failed["error"], failed
            time.sleep(5)  # past the lease: no replica takes the failed build up again
            assert client.get(f"/v1/labelsets/{name}").json()["status"] == "failed"
            refused = client.post("/v1/classify", json={"images": [IMAGE], "labelset": name})
            expect_limit(refused, 409, "labelset_failed", "labelset_build_timeout_s")
            assert encoder_calls(client.get("/metrics").text, "text") == 0
        on_builder = httpx.get(f"{builder.base}/v1/labelsets/{name}").json()
        assert on_builder["status"] == "failed", on_builder
        again = httpx.put(f"{other.base}/v1/labelsets/{name}", json=worst_set(3, 60), timeout=60)
        assert again.status_code == 202 and again.json()["status"] == "building", again.text
    watch.assert_healthy(max_growth_mb=300)


# Chaos ---------------------------------------------------------------------------------------------------


def test_chaos_three_replicas_share_a_set_of_the_worst_templates_and_none_stalls(
    clip_serve, micro_repo, tmp_path, private_redis
) -> None:
    private_redis.start()
    shared = dict(models_dir=micro_repo, redis_url=private_redis.url(), data_dir=tmp_path / "shared")
    replicas = [clip_serve(**shared) for _ in range(3)]
    name = unique("worst")
    labelset = worst_set(4, 45)  # 4,500 prompts of the worst kind: built in the background
    requests = {
        "list": lambda c: c.get("/v1/labelsets"),
        "get": lambda c: c.get(f"/v1/labelsets/{name}"),
        "classify": lambda c: c.post("/v1/classify", json={"images": [IMAGE], "labelset": name}),
        "embed": lambda c: c.post("/v1/embed", json={"images": [IMAGE]}),
    }
    put = httpx.put(f"{replicas[0].base}/v1/labelsets/{name}", json=labelset, timeout=60)
    assert put.status_code == 202, put.text
    loads = [Load(replica.base, requests, clients=2) for replica in replicas]
    with Watch(*replicas) as watch:
        for load in loads:
            load.__enter__()
        try:
            for replica in replicas:
                with httpx.Client(base_url=replica.base, timeout=60) as client:
                    assert wait_for(client, name, {"ready", "failed"})["status"] == "ready"
        finally:
            for load in loads:
                load.__exit__()
    results = [entry for load in loads for entry in load.results]
    statuses = {(kind, status) for _, kind, status, _ in results}
    assert all(status in (200, 409) for _, status in statuses), sorted(statuses)
    assert ("classify", 200) in statuses
    text_calls = [encoder_calls(httpx.get(f"{r.base}/metrics").text, "text") for r in replicas]
    assert sum(calls > 0 for calls in text_calls) == 1, text_calls  # one replica built it, for all
    watch.assert_healthy(max_growth_mb=300)
