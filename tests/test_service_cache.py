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

from service.cache import VectorCache
from service.metrics import Metrics
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
        listed = await cache.scan(key)
        deleted = await cache.delete(key + ":blob")
        await cache.aclose()
        return got, blob, listed, deleted, metrics

    got, blob, listed, deleted, metrics = asyncio.run(scenario())
    assert got == [b"\x00" * 8, None] and blob == b"hello" and key + ":blob" in listed and deleted == 1
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
        stop()
        await cache.set_vectors({"during": b"2"})  # fails over, no exception
        during = (await cache.get_vectors(["during"]), cache.using_redis)
        start()
        await cache.set_vectors({"after": b"3"})
        after = cache.using_redis
        await cache.aclose()
        return during, after, metrics

    (during_values, during_redis), after_redis, metrics = asyncio.run(scenario())
    assert during_values == [b"2"] and not during_redis and after_redis
    assert redis.Redis(port=port).get("after") == b"3"
    assert sample(metrics, "clipserve_cache_fallback") == 0
