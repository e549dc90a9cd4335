"""Vector cache: Redis (redis-py asyncio) shared by every replica, with an in-process stand-in.

Keys are built by the callers from the bundle's content hash, never the model name
(`clipserve:v1:<content-hash>:...`). Two kinds of values:

- vectors (`get_vectors` / `set_vectors`): text embeddings, float32 bytes, with a TTL. Writes reach
  Redis behind the request, coalesced into one pipeline per event-loop turn (`flush()` waits for
  them). A caller whose vectors cost less to compute than a Redis round trip passes `shared=False`
  and keeps them in the in-process LRU of `cache_lru_size` entries, which also stands in for Redis
  while it is down (`round_trip_ms` is what `ModelEngine` weighs against);
- blobs (`get_blob` / `set_blob` / `delete`): class matrices. Each is kept in this process
  too, in one LRU of at most `matrix_bytes` for every model (so the matrices of a model version no
  longer served age out), which also stands in for Redis while it is down. In Redis a blob has the
  TTL of the vectors, renewed when it is read there (GETEX) and, while this process serves it from
  its own copy, every `ttl / 8` (at most hourly) behind the request. (Label-set definitions are
  data: `clipserve.service.stores.labelset_store`.)

When Redis fails, the cache logs one warning, counts the error, sets the fallback gauge and
serves from the stand-in; it tries Redis again after `redis_retry_s` and logs when it is back.
A request never fails because of the cache.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import statistics
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import redis.asyncio as aioredis
from prometheus_client import Gauge
from redis.exceptions import RedisError

from clipserve.service.metrics import Metrics

log = logging.getLogger("clipserve.cache")
T = TypeVar("T")
KEY_PREFIX = "clipserve:v1"
# vector writes waiting for Redis beyond this many are dropped (a cache: the next miss recomputes)
_MAX_PENDING = 4096
# how often a blob served from this process has its TTL in Redis renewed, at most
_RENEW_EVERY_S = 3600.0


class LRU:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self._data: collections.OrderedDict[str, bytes] = collections.OrderedDict()

    def get(self, key: str) -> bytes | None:
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def set(self, key: str, value: bytes) -> None:
        if self.capacity <= 0:
            return
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.capacity:
            self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)


@dataclass
class _Blob:
    value: bytes
    shared: bool  # also in Redis, whose TTL is renewed while it is used here
    renewed: float


class BlobLRU:
    """Blobs by key, at most `capacity` bytes together, the least recently used evicted first. The
    newest blob stays even when alone it is larger: the caller uses it right away."""

    def __init__(self, capacity: int, gauge: Gauge | None = None):
        self.capacity = capacity
        self.nbytes = 0
        self._gauge = gauge
        self._data: collections.OrderedDict[str, _Blob] = collections.OrderedDict()

    def get(self, key: str) -> _Blob | None:
        blob = self._data.get(key)
        if blob is not None:
            self._data.move_to_end(key)
        return blob

    def set(self, key: str, value: bytes, shared: bool) -> None:
        self.pop(key)
        self._data[key] = _Blob(value, shared, time.monotonic())
        self.nbytes += len(value)
        while self.nbytes > self.capacity and len(self._data) > 1:
            _, oldest = self._data.popitem(last=False)
            self.nbytes -= len(oldest.value)
        self._measured()

    def pop(self, key: str) -> bool:
        blob = self._data.pop(key, None)
        if blob is not None:
            self.nbytes -= len(blob.value)
            self._measured()
        return blob is not None

    def _measured(self) -> None:
        if self._gauge is not None:
            self._gauge.set(self.nbytes)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._data))

    def __len__(self) -> int:
        return len(self._data)


class VectorCache:
    def __init__(
        self,
        redis_url: str | None,
        *,
        lru_size: int,
        ttl_s: int,
        retry_s: float,
        metrics: Metrics,
        matrix_bytes: int = 256 * 1024 * 1024,
    ):
        self.metrics = metrics
        self.ttl_s = ttl_s or None
        self.retry_s = retry_s
        self._redis = (
            aioredis.Redis.from_url(
                redis_url, socket_connect_timeout=0.5, socket_timeout=2.0, retry_on_timeout=False
            )
            if redis_url
            else None
        )
        self._vectors = LRU(lru_size)
        self._pending: dict[str, bytes] = {}  # waiting for the writer
        self._writing: dict[str, bytes] = {}  # in the writer's pipeline now
        self._writer: asyncio.Task | None = None
        self.round_trip_ms: float | None = None
        self._blobs = BlobLRU(matrix_bytes, metrics.class_matrix_bytes)
        self._renewing: set[str] = set()
        self._renewer: asyncio.Task | None = None
        self._renew_every_s = min(_RENEW_EVERY_S, ttl_s / 8) if ttl_s else None
        self._lookups: dict[str, list[int]] = {}
        self._down_until = 0.0
        self._down = not redis_url
        metrics.cache_fallback.set(1 if self._down else 0)

    @property
    def configured(self) -> bool:
        """A Redis URL was given (it may be down right now)."""
        return self._redis is not None

    @property
    def using_redis(self) -> bool:
        return self._redis is not None and not self._down

    async def aclose(self) -> None:
        await self.flush()
        if self._renewer is not None:
            self._renewer.cancel()
        if self._redis is not None:
            await self._redis.aclose()

    async def measure_round_trip(self, samples: int = 7) -> float | None:
        """Median milliseconds of one vector look-up in Redis through this client (a missing key),
        kept in `round_trip_ms`; None without a Redis that answers."""
        times = []
        for _ in range(samples):
            started = time.perf_counter()
            ok, _ = await self._try(lambda r: r.mget([f"{KEY_PREFIX}:round-trip-probe"]))
            if not ok:
                return None
            times.append((time.perf_counter() - started) * 1000)
        self.round_trip_ms = statistics.median(times)
        return self.round_trip_ms

    async def _try(self, operation: Callable[[aioredis.Redis], Awaitable[T]]) -> tuple[bool, T | None]:
        if self._redis is None or time.monotonic() < self._down_until:
            return False, None
        try:
            result = await operation(self._redis)
        except (RedisError, OSError) as exc:
            self.metrics.cache_errors.inc()
            if not self._down:
                log.warning("Redis unavailable (%s: %s); using the in-process cache", type(exc).__name__, exc)
            self._down = True
            self._down_until = time.monotonic() + self.retry_s
            self.metrics.cache_fallback.set(1)
            return False, None
        if self._down:
            log.info("Redis is reachable again; using it")
            self._down = False
            self.metrics.cache_fallback.set(0)
        return True, result

    def _count(self, kind: str, values: Iterable[bytes | None]) -> None:
        hits = misses = 0
        for value in values:
            if value is None:
                misses += 1
            else:
                hits += 1
        if hits:
            self.metrics.cache_requests.labels(kind=kind, result="hit").inc(hits)
        if misses:
            self.metrics.cache_requests.labels(kind=kind, result="miss").inc(misses)
        totals = self._lookups.setdefault(kind, [0, 0])
        totals[0] += hits
        totals[1] += hits + misses
        if totals[1]:
            self.metrics.cache_hit_ratio.labels(kind=kind).set(totals[0] / totals[1])

    async def get_vectors(self, keys: list[str], shared: bool = True) -> list[bytes | None]:
        """Values of `keys` (None where absent): from Redis when `shared` and it answers, else from
        this process's LRU; a value still waiting to be written is found too."""
        if not keys:
            return []
        ok, values = await self._try(lambda r: r.mget(keys)) if shared else (False, None)
        if not ok or values is None:
            values = [self._vectors.get(k) for k in keys]
        if self._pending or self._writing:
            values = [self._unwritten(k) if v is None else v for k, v in zip(keys, values, strict=True)]
        self._count("vector", values)
        return list(values)

    async def set_vectors(self, items: dict[str, bytes], shared: bool = True) -> None:
        """Write `items` to Redis behind the caller when `shared` (coalesced with other writes;
        `flush()` waits for them), else, or while Redis is down, to this process's LRU."""
        if not items:
            return
        if not shared or self._redis is None or time.monotonic() < self._down_until:
            self._keep(items)
            return
        self._pending.update(items)
        while len(self._pending) > _MAX_PENDING:
            del self._pending[next(iter(self._pending))]
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write_pending(), name="cache-writes")

    def _unwritten(self, key: str) -> bytes | None:
        value = self._pending.get(key)
        return self._writing.get(key) if value is None else value

    def _keep(self, items: dict[str, bytes]) -> None:
        for key, value in items.items():
            self._vectors.set(key, value)

    async def _write_pending(self) -> None:
        while self._pending:
            items = self._writing = self._pending
            self._pending = {}

            async def write(r: aioredis.Redis, items: dict[str, bytes] = items) -> None:
                async with r.pipeline(transaction=False) as pipe:
                    for key, value in items.items():
                        pipe.set(key, value, ex=self.ttl_s)
                    await pipe.execute()

            ok, _ = await self._try(write)
            if not ok:
                self._keep(items)
            self._writing = {}

    async def flush(self) -> None:
        """Wait until the vector writes queued so far have reached Redis (or failed over)."""
        if self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)

    async def get_blob(self, key: str, kind: str = "blob", keep: bool = True) -> bytes | None:
        """This process's copy, else Redis's (its TTL renewed); one found in Redis is kept here
        when `keep`."""
        local = self._blobs.get(key)
        if local is not None:
            if local.shared:
                self._renew_later(key, local)
            self._count(kind, [local.value])
            return local.value
        ttl = self.ttl_s
        ok, value = await self._try(lambda r: r.getex(key, ex=ttl) if ttl else r.get(key))
        if ok and value is not None and keep:
            self._blobs.set(key, value, shared=True)
        self._count(kind, [value])
        return value

    async def set_blob(self, key: str, value: bytes, shared: bool = True, keep: bool = True) -> None:
        """Kept in this process (unless not `keep`); when `shared`, written to Redis too, with the TTL."""
        if keep:
            self._blobs.set(key, value, shared)
        if shared:
            await self._try(lambda r: r.set(key, value, ex=self.ttl_s))

    def _renew_later(self, key: str, blob: _Blob) -> None:
        if self._renew_every_s is None or self._redis is None:
            return
        now = time.monotonic()
        if now - blob.renewed < self._renew_every_s:
            return
        blob.renewed = now
        self._renewing.add(key)
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew(), name="cache-renewals")

    async def _renew(self) -> None:
        while self._renewing:
            keys, self._renewing = self._renewing, set()

            async def expire(r: aioredis.Redis, keys: set[str] = keys) -> None:
                async with r.pipeline(transaction=False) as pipe:
                    for key in keys:
                        pipe.expire(key, self.ttl_s)
                    await pipe.execute()

            await self._try(expire)

    def forget(self, prefix: str) -> int:
        """Drop this process's copies of the blobs under `prefix` (Redis keeps its own)."""
        keys = [key for key in self._blobs if key.startswith(prefix)]
        for key in keys:
            self._blobs.pop(key)
        return len(keys)

    @property
    def blob_bytes(self) -> int:
        """Bytes of the blobs kept in this process."""
        return self._blobs.nbytes

    async def delete(self, *keys: str) -> int:
        """Delete from Redis and from this process; how many existed (in either)."""
        if not keys:
            return 0
        ok, count = await self._try(lambda r: r.delete(*keys))
        local = sum(self._blobs.pop(k) for k in keys)
        return max(int(count or 0), local) if ok else local
