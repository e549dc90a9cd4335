"""The dynamic batcher: batch limits, waiting, back-pressure, timeouts, dropped work, failures."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import numpy as np
import pytest

from clipserve.service.errors import InferenceFailed, Overloaded, TimedOut
from clipserve.service.inference.batching import Batcher
from clipserve.service.metrics import Metrics


class Recorder:
    """A real batch function: doubles rows, records batch sizes, can be slowed or made to fail."""

    def __init__(self, delay_s: float = 0.0, fail: bool = False):
        self.batches: list[int] = []
        self.seen: list[float] = []
        self.delay_s, self.fail = delay_s, fail
        self.release = threading.Event()
        self.release.set()

    def __call__(self, rows: Sequence[np.ndarray]) -> np.ndarray:
        self.release.wait(5)
        time.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("boom")
        self.batches.append(len(rows))
        self.seen.extend(float(r[0]) for r in rows)
        return np.stack(rows) * 2


def make(run, **kw) -> Batcher:
    options = dict(max_batch=4, max_wait_ms=20, max_queue=16, timeout_s=5.0)
    options.update(kw)
    return Batcher("m@1", "text", run, metrics=Metrics(), **options)


def rows(*values: float) -> list[np.ndarray]:
    return [np.array([v], dtype=np.float32) for v in values]


def run_async(coro):
    return asyncio.run(coro)


def test_results_come_back_in_order_and_batches_respect_the_limit() -> None:
    recorder = Recorder()

    async def scenario():
        batcher = make(recorder)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit(rows(i, i + 0.5)) for i in range(5)))
        await batcher.close()
        return results

    results = run_async(scenario())
    for i, out in enumerate(results):
        np.testing.assert_array_equal(out[:, 0], [2 * i, 2 * i + 1])
    assert max(recorder.batches) <= 4 and sum(recorder.batches) == 10 and len(recorder.batches) >= 3


def test_a_lone_item_waits_at_most_max_wait() -> None:
    recorder = Recorder()

    async def scenario():
        batcher = make(recorder, max_batch=64, max_wait_ms=30)
        batcher.start()
        started = time.perf_counter()
        await batcher.submit(rows(1))
        elapsed = time.perf_counter() - started
        await batcher.close()
        return elapsed

    assert run_async(scenario()) < 1.0
    assert recorder.batches == [1]


def test_a_full_queue_refuses_as_overloaded_with_a_retry_estimate() -> None:
    recorder = Recorder()
    recorder.release.clear()

    async def scenario():
        batcher = make(recorder, max_queue=6, max_batch=2, max_wait_ms=0)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(rows(1, 2)))
        await asyncio.sleep(0.05)  # the first batch is now inside the (blocked) model
        waiting = asyncio.ensure_future(batcher.submit(rows(3, 4, 5, 6)))
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded) as err:
            await batcher.submit(rows(7, 8, 9))
        recorder.release.set()
        await asyncio.gather(first, waiting)
        await batcher.close()
        return err.value

    error = run_async(scenario())
    assert error.retry_after_s >= 1 and "full" in error.message


def test_a_timeout_fails_the_request_and_its_rows_never_reach_the_model() -> None:
    recorder = Recorder()
    recorder.release.clear()

    async def scenario():
        batcher = make(recorder, timeout_s=0.2, max_batch=1, max_wait_ms=0)
        batcher.start()
        blocker = asyncio.ensure_future(batcher.submit(rows(1)))
        await asyncio.sleep(0.05)
        with pytest.raises(TimedOut) as err:
            await batcher.submit(rows(2))
        recorder.release.set()
        with pytest.raises(TimedOut):
            await blocker  # waited past its own timeout too
        await asyncio.sleep(0.1)
        await batcher.close()
        return err.value

    error = run_async(scenario())
    assert error.code == "timeout" and "did not answer" in error.message
    assert 2.0 not in recorder.seen


def test_cancelled_requests_are_dropped_before_inference() -> None:
    recorder = Recorder()
    recorder.release.clear()

    async def scenario():
        batcher = make(recorder, max_batch=1, max_wait_ms=0)
        batcher.start()
        blocker = asyncio.ensure_future(batcher.submit(rows(1)))
        await asyncio.sleep(0.05)
        gone = asyncio.ensure_future(batcher.submit(rows(2, 3)))
        kept = asyncio.ensure_future(batcher.submit(rows(4)))
        await asyncio.sleep(0.01)
        gone.cancel()  # what the disconnect guard does when a client goes away
        recorder.release.set()
        await asyncio.gather(blocker, kept)
        await batcher.close()

    run_async(scenario())
    assert recorder.seen == [1.0, 4.0]


def test_a_failing_batch_fails_its_requests_and_the_loop_survives() -> None:
    recorder = Recorder(fail=True)

    async def scenario():
        batcher = make(recorder)
        batcher.start()
        with pytest.raises(InferenceFailed) as err:
            await batcher.submit(rows(1))
        recorder.fail = False
        out = await batcher.submit(rows(5))
        alive = batcher.alive
        await batcher.close()
        return err.value, out, alive

    error, out, alive = run_async(scenario())
    assert "failed" in error.message
    assert out[0, 0] == 10 and alive


def test_announced_rows_are_waited_for_and_batched_together() -> None:
    recorder = Recorder()

    async def scenario():
        batcher = make(recorder, max_batch=8, max_wait_ms=500)
        batcher.start()
        batcher.announce(1)  # an image still being decoded
        first = asyncio.ensure_future(batcher.submit(rows(1)))
        await asyncio.sleep(0.05)
        batcher.withdraw(1)
        second = asyncio.ensure_future(batcher.submit(rows(2)))
        await asyncio.gather(first, second)
        await batcher.close()

    run_async(scenario())
    assert recorder.batches == [2]


def test_closing_mid_batch_answers_that_batch_at_once_and_refuses_the_queue() -> None:
    recorder = Recorder()
    recorder.release.clear()  # the model holds its first batch until released

    async def scenario():
        batcher = make(recorder, max_batch=2, timeout_s=30.0)
        batcher.start()
        running = asyncio.ensure_future(batcher.submit(rows(1, 2)))
        while not batcher._running:  # the first batch is in the inference thread
            await asyncio.sleep(0.005)
        queued = asyncio.ensure_future(batcher.submit(rows(3)))
        await asyncio.sleep(0.02)
        started = time.monotonic()
        closing = asyncio.ensure_future(batcher.close())
        await asyncio.sleep(0.1)
        recorder.release.set()
        result = await running
        answered_s = time.monotonic() - started
        await closing
        with pytest.raises(Exception) as refused:
            await queued
        return result, answered_s, refused.value

    result, answered_s, refused = run_async(scenario())
    np.testing.assert_array_equal(result, np.array([[2.0], [4.0]], dtype=np.float32))
    assert answered_s < 5, f"the closing batcher's running batch answered after {answered_s:.1f} s"
    assert type(refused).__name__ == "Unavailable"


def test_a_full_queue_is_refused_before_rows_are_prepared() -> None:
    recorder = Recorder()

    async def scenario():
        batcher = make(recorder, max_queue=4)
        batcher.start()
        batcher.announce(3)  # three rows being decoded for another request
        with pytest.raises(Overloaded) as refused:
            batcher.admit(2)
        batcher.admit(1)
        batcher.withdraw(3)
        await batcher.close()
        return refused.value

    refused = run_async(scenario())
    assert "3 being prepared" in refused.message and refused.retry_after_s >= 1
