"""Dynamic batching: one bounded queue per model and tower.

`Batcher.submit(items)` enqueues already-preprocessed rows (image tensors or token-id rows) and
resolves to their outputs, in order. A loop takes up to `max_batch` rows and runs them in the
tower's own inference thread, so the event loop and the preprocessing pool keep working while the
model runs (decode of the next requests overlaps inference of the current batch).

A request that finds the tower idle (nothing queued, announced or running) skips the queue:
`run_if_idle(prepare)` prepares its rows (decodes its image) and runs them in one trip to the
inference thread, instead of one to the preprocessing pool, one to the queue's loop and one to the
inference thread. Requests that arrive meanwhile find the tower busy and queue as usual.

It waits for a fuller batch (at most `max_wait_ms` after the oldest row) only while rows are
announced (`announce` / `withdraw`: images being decoded right now); otherwise it runs what it has
at once. Under load, rows pile up while the model is busy, so batches fill without waiting.

- a full queue raises `Overloaded` with a retry-after estimate; `admit(count)` asks the same before
  the rows are prepared, so a request refused pays for no decoding;
- a request waiting longer than `timeout_s` raises `TimedOut`; a closed batcher `Unavailable`;
- a batch the model fails on fails its requests with `InferenceFailed`, never the loop;
- closing answers every caller at once: queued rows get `Unavailable`, the batch in the inference
  thread its vectors as soon as the thread is done with it;
- rows of a cancelled request (client gone, timed out) are dropped before they reach the model.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from clipserve.service.errors import InferenceFailed, Overloaded, TimedOut, Unavailable
from clipserve.service.metrics import Metrics

log = logging.getLogger("clipserve.batching")

RunBatch = Callable[[Sequence[np.ndarray]], np.ndarray]


@dataclass
class _Item:
    row: np.ndarray
    future: asyncio.Future
    enqueued: float


def _retrieve(future: asyncio.Future) -> None:
    """Mark the outcome of an abandoned gather as seen, so asyncio does not log it as lost."""
    if not future.cancelled():
        future.exception()


class Batcher:
    def __init__(
        self,
        model: str,
        tower: str,
        run_batch: RunBatch,
        *,
        max_batch: int,
        max_wait_ms: float,
        max_queue: int,
        timeout_s: float,
        metrics: Metrics,
    ):
        self.model, self.tower = model, tower
        self.run_batch = run_batch
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000.0
        self.max_queue, self.timeout_s = max_queue, timeout_s
        self.metrics = metrics
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"infer-{model}-{tower}")
        self._queue: collections.deque[_Item] = collections.deque()
        self._announced = 0
        self._arrived = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._last_batch_s = 0.05
        self._running = 0  # batches (queued or direct) in the inference thread now
        self._labels = {"model": model, "tower": tower}
        self._queue_depth = metrics.queue_depth.labels(**self._labels)
        self._batch_size = metrics.batch_size.labels(**self._labels)
        self._inference_seconds = metrics.inference_seconds.labels(**self._labels)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._loop(), name=f"batch-{self.model}-{self.tower}"
        )

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def depth(self) -> int:
        return len(self._queue)

    async def close(self) -> None:
        """Stop the loop: the batch running in the thread answers its callers when it ends (see
        `_loop`), the rows still queued are refused at once with `Unavailable`."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for item in self._queue:
            if not item.future.done():
                item.future.set_exception(Unavailable("the model was unloaded; retry", retry_after_s=1))
        self._queue.clear()
        self.executor.shutdown(wait=False)

    @property
    def announced(self) -> int:
        return self._announced

    def announce(self, count: int) -> None:
        """`count` rows are being prepared and will be submitted soon: worth waiting for."""
        self._announced += count

    def withdraw(self, count: int) -> None:
        self._announced -= count
        self._arrived.set()

    def admit(self, count: int) -> None:
        """Refuse `count` more rows (`Overloaded`) when the queue, with the rows being prepared for
        it, has no room for them: asked before preparing them."""
        if len(self._queue) + self._announced + count > self.max_queue:
            self.metrics.rejected.labels(reason="queue_full", **self._labels).inc(count)
            raise Overloaded(
                f"the {self.tower} queue of {self.model} is full ({len(self._queue)} items waiting, "
                f"{self._announced} being prepared); retry later",
                retry_after_s=self.retry_after_s(),
            )

    def admit_when_busy(self, count: int) -> None:
        """`admit`, unless the tower is idle (it then takes the rows in one direct trip)."""
        if not self.idle:
            self.admit(count)

    def retry_after_s(self) -> int:
        return max(1, math.ceil(len(self._queue) / self.max_batch * self._last_batch_s))

    async def run_directly(self, rows: Sequence[np.ndarray]) -> np.ndarray:
        """Run rows on the inference thread without the queue: bulk work (label sets) that takes
        turns with live batches instead of filling their queue or their timeout."""
        if not self.alive:
            raise Unavailable(f"the {self.tower} encoder of {self.model} is not running", retry_after_s=1)
        return await asyncio.get_running_loop().run_in_executor(self.executor, self.run_batch, rows)

    @property
    def idle(self) -> bool:
        return not self._queue and not self._announced and not self._running and self.alive

    def _prepare_and_run(self, prepare: Callable[[], Sequence[np.ndarray]]) -> tuple[np.ndarray, int, float]:
        rows = prepare()  # its errors (a bad image) are the request's, not the model's
        started = time.perf_counter()
        try:
            output = self.run_batch(rows)
        except Exception as exc:
            log.exception("%s %s direct batch of %d failed", self.model, self.tower, len(rows))
            raise InferenceFailed(f"the {self.tower} encoder failed: {type(exc).__name__}") from exc
        return output, len(rows), time.perf_counter() - started

    async def run_if_idle(self, prepare: Callable[[], Sequence[np.ndarray]]) -> np.ndarray | None:
        """With the tower idle, `prepare()` the rows and run them in one trip to the inference thread;
        None when it is busy (then submit the rows instead)."""
        if not self.idle:
            return None
        self._running += 1
        try:
            work = asyncio.get_running_loop().run_in_executor(self.executor, self._prepare_and_run, prepare)
            try:
                async with asyncio.timeout(self.timeout_s):
                    output, count, seconds = await work
            except TimeoutError as exc:
                self.metrics.rejected.labels(reason="timeout", **self._labels).inc()
                raise TimedOut(
                    f"the {self.tower} encoder of {self.model} did not answer within {self.timeout_s} s"
                ) from exc
        finally:
            self._running -= 1
            self._arrived.set()  # the queue's loop waits for the thread to be free
        self._batch_size.observe(count)
        self._inference_seconds.observe(seconds)
        return output

    async def submit(self, rows: Sequence[np.ndarray]) -> np.ndarray:
        if not self.alive:
            raise Unavailable(f"the {self.tower} encoder of {self.model} is not running", retry_after_s=1)
        if len(self._queue) + len(rows) > self.max_queue:
            self.metrics.rejected.labels(reason="queue_full", **self._labels).inc(len(rows))
            raise Overloaded(
                f"the {self.tower} queue of {self.model} is full ({len(self._queue)} items waiting); retry later",
                retry_after_s=self.retry_after_s(),
            )
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        futures = []
        for row in rows:
            future = loop.create_future()
            self._queue.append(_Item(row, future, now))
            futures.append(future)
        self._queue_depth.set(len(self._queue))
        self._arrived.set()
        waiting = futures[0] if len(futures) == 1 else asyncio.gather(*futures)
        if len(futures) > 1:
            waiting.add_done_callback(_retrieve)
        try:
            async with asyncio.timeout(self.timeout_s):
                result = await waiting
        except TimeoutError as exc:
            self.metrics.rejected.labels(reason="timeout", **self._labels).inc(len(rows))
            raise TimedOut(
                f"the {self.tower} encoder of {self.model} did not answer within {self.timeout_s} s"
            ) from exc
        return result[None] if len(futures) == 1 else np.stack(result)

    def _take(self) -> list[_Item]:
        batch: list[_Item] = []
        dropped = 0
        while self._queue and len(batch) < self.max_batch:
            item = self._queue.popleft()
            if item.future.done():
                dropped += 1
                continue
            batch.append(item)
        if dropped:
            self.metrics.rejected.labels(reason="cancelled", **self._labels).inc(dropped)
        self._queue_depth.set(len(self._queue))
        return batch

    async def _wait_for_batch(self) -> None:
        # a direct run holds the inference thread: rows keep queueing (and stay droppable) meanwhile
        while not self._queue or self._running:
            self._arrived.clear()
            await self._arrived.wait()
        deadline = self._queue[0].enqueued + self.max_wait
        while len(self._queue) < self.max_batch and self._announced > 0:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                return

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wait_for_batch()
            batch = self._take()
            if not batch:
                continue
            started = time.perf_counter()
            self._running += 1
            work = loop.run_in_executor(self.executor, self.run_batch, [i.row for i in batch])
            try:
                await asyncio.shield(work)
            except asyncio.CancelledError:
                # closed mid-batch: its callers get its outcome the moment the thread has it
                work.add_done_callback(lambda done, batch=batch: self._settle(batch, done))
                raise
            except Exception:  # a failing model must fail its requests, never the loop
                self._settle(batch, work)
                continue
            finally:
                self._running -= 1
            self._last_batch_s = time.perf_counter() - started
            self._batch_size.observe(len(batch))
            self._inference_seconds.observe(self._last_batch_s)
            self._settle(batch, work)

    def _settle(self, batch: list[_Item], work: asyncio.Future) -> None:
        """Hand each caller of a finished batch its vector, or the model's failure."""
        failure = None if work.cancelled() else work.exception()
        if failure is not None:
            log.error("%s %s batch of %d failed", self.model, self.tower, len(batch), exc_info=failure)
        for index, item in enumerate(batch):
            if item.future.done():
                continue
            if work.cancelled():
                item.future.set_exception(Unavailable("the model was unloaded; retry", retry_after_s=1))
            elif failure is not None:
                item.future.set_exception(
                    InferenceFailed(f"the {self.tower} encoder failed: {type(failure).__name__}")
                )
            else:
                item.future.set_result(work.result()[index])
