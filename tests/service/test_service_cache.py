"""The vector cache against real Redis: round trips, outage fallback, and reconnection."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from clipserve.service.inference.cache import VectorCache
from clipserve.service.inference.engine import shares_text_vectors
from clipserve.service.metrics import Metrics
from tests.fixtures.service import free_port


def make_cache(url: str | None, retry_s: float = 0.0) -> tuple[VectorCache, Metrics]:
    metrics = Metrics()
    return VectorCache(url, lru_size=100, ttl_s=60, retry_s=retry_s, metrics=metrics), metrics


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels or None) or 0.0


def test_vectors_and_blobs_round_trip_through_redis(service_redis_url: str) -> None:
    key = f"clipserve:v1:test:{uuid.uuid4().hex}"

    async def scenario():
        cache, metrics = make_cache(service_redis_url)
        assert await cache.get_vectors([key]) == [None]
        await cache.set_vectors({key: b"\x00" * 8})
        got = await cache.get_vectors([key, key + "x"])
        await cache.set_blob(key + ":blob", b"hello")
        blob = await cache.get_blob(key + ":blob")
        deleted = await cache.delete(key + ":blob")
        await cache.aclose()
        return got, blob, deleted, metrics

    got, blob, deleted, metrics = asyncio.run(scenario())
    assert got == [b"\x00" * 8, None] and blob == b"hello" and deleted == 1
    assert redis.Redis.from_url(service_redis_url).ttl(key) > 0
    assert sample(metrics, "clipserve_cache_requests_total", kind="vector", result="hit") == 1
    assert sample(metrics, "clipserve_cache_requests_total", kind="vector", result="miss") == 2
    assert sample(metrics, "clipserve_cache_hit_ratio", kind="vector") == pytest.approx(1 / 3)


def test_unreachable_redis_falls_back_to_memory_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario():
        cache, metrics = make_cache(f"redis://127.0.0.1:{free_port()}/0", retry_s=60)
        await cache.set_vectors({"k": b"v"})
        got = await cache.get_vectors(["k"])
        await cache.set_blob("b", b"x")
        blob = await cache.get_blob("b")
        await cache.aclose()
        return got, blob, metrics

    with caplog.at_level("WARNING", logger="clipserve.cache"):
        got, blob, metrics = asyncio.run(scenario())
    assert got == [b"v"] and blob == b"x"
    assert (
        sample(metrics, "clipserve_cache_errors_total") >= 1
        and sample(metrics, "clipserve_cache_fallback") == 1
    )
    assert sum("Redis unavailable" in r.message for r in caplog.records) == 1


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[tuple[int, callable]]:
    """A private redis-server on a free port that a test may stop and start again."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    processes: list[subprocess.Popen] = []

    def start() -> None:
        process = subprocess.Popen(
            [binary, "--port", str(port), "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
            stdout=subprocess.DEVNULL,
        )
        processes.append(process)
        client = redis.Redis(port=port)
        for _ in range(100):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop() -> None:
        processes[-1].terminate()
        processes[-1].wait(10)

    start()
    yield port, start, stop
    for process in processes:
        if process.poll() is None:
            process.terminate()
            process.wait(10)


def test_redis_is_used_again_when_it_comes_back(own_redis) -> None:
    port, start, stop = own_redis

    async def scenario():
        cache, metrics = make_cache(f"redis://127.0.0.1:{port}/0", retry_s=0.0)
        await cache.set_vectors({"before": b"1"})
        await cache.flush()
        stop()
        await cache.set_vectors({"during": b"2"})
        await cache.flush()  # the write behind the caller fails over, no exception
        during = (await cache.get_vectors(["during"]), cache.using_redis)
        start()
        await cache.set_vectors({"after": b"3"})
        await cache.flush()
        after = cache.using_redis
        await cache.aclose()
        return during, after, metrics

    (during_values, during_redis), after_redis, metrics = asyncio.run(scenario())
    assert during_values == [b"2"] and not during_redis and after_redis
    assert redis.Redis(port=port).get("after") == b"3"
    assert sample(metrics, "clipserve_cache_fallback") == 0


def test_vectors_are_written_to_redis_behind_the_caller(service_redis_url: str) -> None:
    key = f"clipserve:v1:test:{uuid.uuid4().hex}"
    other = redis.Redis.from_url(service_redis_url)

    async def scenario():
        cache, _ = make_cache(service_redis_url)
        await cache.set_vectors({key: b"1234"})
        written_at_return = other.exists(key)  # the write waits for the caller to give the loop back
        await cache.flush()
        written_after_flush = other.exists(key)
        other.set(key + ":other", b"from another replica")
        seen = await cache.get_vectors([key, key + ":other"])
        await cache.aclose()
        return written_at_return, written_after_flush, seen

    written_at_return, written_after_flush, seen = asyncio.run(scenario())
    assert (written_at_return, written_after_flush) == (0, 1)
    assert seen == [b"1234", b"from another replica"]


def test_unshared_vectors_never_touch_redis(service_redis_url: str) -> None:
    key = f"clipserve:v1:test:{uuid.uuid4().hex}"
    other = redis.Redis.from_url(service_redis_url)
    other.set(key + ":elsewhere", b"x")

    async def scenario():
        cache, _ = make_cache(service_redis_url)
        await cache.set_vectors({key: b"local"}, shared=False)
        await cache.flush()
        got = await cache.get_vectors([key, key + ":elsewhere"], shared=False)
        await cache.aclose()
        return got

    assert asyncio.run(scenario()) == [b"local", None]
    assert not other.exists(key)


def test_round_trip_is_measured_against_a_redis_that_answers(service_redis_url: str) -> None:
    async def scenario():
        reachable, _ = make_cache(service_redis_url)
        unreachable, _ = make_cache(f"redis://127.0.0.1:{free_port()}/0", retry_s=60)
        measured = await reachable.measure_round_trip(), await unreachable.measure_round_trip()
        await reachable.aclose()
        await unreachable.aclose()
        return measured, reachable.round_trip_ms, unreachable.round_trip_ms

    (reachable, unreachable), kept, none = asyncio.run(scenario())
    assert 0 < reachable < 1000 and kept == reachable
    assert unreachable is None and none is None


def test_text_vectors_are_shared_when_encoding_costs_ten_look_ups() -> None:
    shared_cache, _ = make_cache("redis://127.0.0.1:6379/0")
    shared_cache.round_trip_ms = 0.1
    no_redis, _ = make_cache(None)
    assert shares_text_vectors("auto", shared_cache, encode_ms=1.0)
    assert not shares_text_vectors("auto", shared_cache, encode_ms=0.9)
    assert shares_text_vectors("shared", shared_cache, encode_ms=0.1)
    assert not shares_text_vectors("local", shared_cache, encode_ms=50.0)
    assert not shares_text_vectors("shared", no_redis, encode_ms=50.0)
    assert shares_text_vectors("auto", shared_cache, encode_ms=None)  # not timed: as configured
    shared_cache.round_trip_ms = None  # Redis was down at start: a look-up is taken as 1 ms
    assert not shares_text_vectors("auto", shared_cache, encode_ms=9.0)
    assert shares_text_vectors("auto", shared_cache, encode_ms=10.0)


@pytest.mark.parametrize("mode", ["shared", "local"])
def test_a_served_model_caches_text_vectors_where_configured(make_client, service_redis_url, mode) -> None:
    client = make_client(text_cache=mode)
    model = client.get("/v1/models").json()["data"][0]
    assert model["text_cache"] == mode
    redis_client = redis.Redis.from_url(service_redis_url)
    pattern = f"clipserve:v1:{model['content_hash']}:text:*"
    before = set(redis_client.keys(pattern))
    text = f"cached {mode} {uuid.uuid4().hex}"
    first = client.post("/v1/embed", json={"texts": [text]}).json()["text_embeddings"]
    second = client.post("/v1/embed", json={"texts": [text]}).json()["text_embeddings"]
    assert first == second
    client.__exit__(None, None, None)  # shut down: the writes behind the requests are flushed
    written = set(redis_client.keys(pattern)) - before
    assert len(written) == (1 if mode == "shared" else 0)


def test_blobs_kept_in_process_stay_within_their_bytes_oldest_first_out() -> None:
    from clipserve.service.inference.cache import BlobLRU

    lru = BlobLRU(capacity=100)
    for key in "abc":
        lru.set(key, bytes(40), shared=False)
    assert list(lru) == ["b", "c"] and lru.nbytes == 80
    assert lru.get("b") is not None  # used: now the newest
    lru.set("d", bytes(40), shared=True)
    assert list(lru) == ["b", "d"]
    lru.set("big", bytes(500), shared=True)  # larger than the whole budget: kept alone
    assert list(lru) == ["big"] and lru.nbytes == 500
    assert lru.pop("big") and not lru.pop("big") and lru.nbytes == 0
