"""The classify-by-set walk: a real `POST /v1/classify` with a stored label set, traced from the route
to the ONNX session and back, enters no clipserve module more than twice; and a set built within the
request asks the cache for its matrix once.

How it is traced: a profile hook (`sys.setprofile`), set once the app has started in the threads
that serve a request (the event loop's, each tower's inference thread, and through
`threading.setprofile` any thread started meanwhile), sees every Python call while the request
runs. An *entry* is the first call into a frame of a clipserve module made from a frame of a
different clipserve module; a coroutine resumed after an `await` is not a new entry (its frame was
seen before), and a coroutine that a task runs counts as entered from the module that created it
(`sys.set_coroutine_origin_tracking_depth`), so handing work to a task hides nothing. Calls made by
frameworks (asyncio, Starlette, FastAPI, thread pools) are not entries, nor are those in and out of the
ASGI stack that wraps every request (`api.middleware`, `api.guards`, `keys`). The request traced is
the common one: one image on an idle image tower (its direct path) and the set's matrix in the cache.
"""

from __future__ import annotations

import collections
import inspect
import sys
import threading
import types
import uuid
from collections.abc import Callable, Iterator

import pytest

from clipserve.service.inference.engine import classes_digest
from clipserve.service.templates import DEFAULT_TEMPLATES
from tests.fixtures.service import b64, image_bytes

PACKAGE = "clipserve."
ASGI_STACK = {"clipserve.service.api.middleware", "clipserve.service.api.guards", "clipserve.service.keys"}
ROUTE = "clipserve.service.api.classify"
MOST_ENTRIES = 2


class WalkTracer:
    """Records the entries into clipserve modules while `recording` is on (see the module docstring)."""

    def __init__(self) -> None:
        self.recording = False
        self.entries: list[tuple[str, str, str]] = []  # (from module, into module, function)
        self._started: set[types.FrameType] = set()
        self._files = {
            module.__file__: name
            for name, module in list(sys.modules.items())
            if name.startswith(PACKAGE) and getattr(module, "__file__", None)
        }

    def hook(self, frame: types.FrameType, event: str, arg: object) -> None:
        if not self.recording or event != "call":
            return
        into = frame.f_globals.get("__name__", "")
        if not into.startswith(PACKAGE) or into in ASGI_STACK:
            return
        if frame in self._started:  # a coroutine or generator resumed
            return
        self._started.add(frame)
        caller = frame.f_back
        origin = caller.f_globals.get("__name__", "") if caller is not None else ""
        if not origin.startswith(PACKAGE):
            origin = self._creator(frame) or ""
        if origin.startswith(PACKAGE) and origin not in ASGI_STACK and origin != into:
            self.entries.append((origin, into, frame.f_code.co_name))

    def _creator(self, frame: types.FrameType) -> str | None:
        """The module that created the coroutine a task runs, when `frame` is one."""
        if not frame.f_code.co_flags & inspect.CO_COROUTINE:
            return None
        import asyncio

        try:
            task = asyncio.current_task()
        except RuntimeError:
            return None
        coro = task.get_coro() if task is not None else None
        if coro is None or getattr(coro, "cr_frame", None) is not frame or not coro.cr_origin:
            return None
        return self._files.get(coro.cr_origin[0][0])

    def walk(self, first: str) -> list[str]:
        """The modules in the order they were entered, starting at the route."""
        return [first, *(into for _, into, _ in self.entries)]


def _in_serving_threads(client, call: Callable[[], object]) -> None:
    """`call()` in the event loop's thread and in each tower's inference thread (one per tower)."""
    client.portal.call(call)
    for engine in client.app.state.registry.models():
        for batcher in (engine.image_batcher, engine.text_batcher):
            batcher.executor.submit(call).result()


@pytest.fixture
def traced_client(make_client) -> Iterator[tuple[object, WalkTracer]]:
    """An app on the tiny bundle, and a tracer hooked into the threads that serve its requests."""
    client = make_client()
    tracer = WalkTracer()

    def hook_on() -> None:
        sys.set_coroutine_origin_tracking_depth(1)  # per thread: who created a task's coroutine
        sys.setprofile(tracer.hook)

    def hook_off() -> None:
        sys.setprofile(None)
        sys.set_coroutine_origin_tracking_depth(0)

    threading.setprofile(tracer.hook)
    _in_serving_threads(client, hook_on)
    try:
        yield client, tracer
    finally:
        tracer.recording = False
        threading.setprofile(None)  # type: ignore[arg-type]
        _in_serving_threads(client, hook_off)


def traced(tracer: WalkTracer, call: Callable[[], object]) -> object:
    tracer.recording = True
    try:
        return call()
    finally:
        tracer.recording = False


def test_classify_by_set_enters_no_module_more_than_twice(traced_client) -> None:
    client, walk_tracer = traced_client
    name = f"walk-{uuid.uuid4().hex[:8]}"
    labels = ["cat", "dog", "car", "tree"]
    put = client.put(f"/v1/labelsets/{name}", json={"labels": labels})
    assert put.status_code == 200 and put.json()["status"] == "ready", put.text
    body = {"images": [b64(image_bytes(seed=1))], "labelset": name, "top_k": 2}
    assert client.post("/v1/classify", json=body).status_code == 200  # warm: the same path, traced next

    response = traced(walk_tracer, lambda: client.post("/v1/classify", json=body))

    assert response.status_code == 200, response.text
    assert {s["label"] for s in response.json()["results"][0]["labels"]} <= set(labels)
    walk = walk_tracer.walk(ROUTE)
    print(f"\nclassify-by-set walk ({len(walk)} module entries):")
    for origin, into, function in walk_tracer.entries:
        print(f"  {origin.removeprefix(PACKAGE):32} -> {into.removeprefix(PACKAGE)}.{function}")
    counts = collections.Counter(walk)
    print("entries per module:", dict(counts))
    assert "clipserve.service.runtime.onnx" in counts, "the walk must reach the ONNX session"
    assert max(counts.values()) <= MOST_ENTRIES, {m: n for m, n in counts.items() if n > MOST_ENTRIES}


def test_a_set_built_within_the_request_looks_its_matrix_up_once(traced_client) -> None:
    """A stored set whose matrix this space has lost (evicted here and in Redis) is built within the
    classify request; the cache is asked for the matrix once, not again by the build."""
    client, walk_tracer = traced_client
    name = f"walk-{uuid.uuid4().hex[:8]}"
    labels = [f"{label}-{uuid.uuid4().hex[:6]}" for label in ("cat", "dog")]
    assert client.put(f"/v1/labelsets/{name}", json={"labels": labels}).status_code == 200
    engine, cache = client.app.state.registry.resolve(None), client.app.state.cache
    key = engine.matrix_key(classes_digest(labels, DEFAULT_TEMPLATES))
    assert client.portal.call(cache.delete, key) == 1
    calls = engine.text_stats.calls
    body = {"images": [b64(image_bytes(seed=2))], "labelset": name}

    response = traced(walk_tracer, lambda: client.post("/v1/classify", json=body))

    assert response.status_code == 200, response.text
    assert engine.text_stats.calls > calls, "the matrix was built within the request"
    lookups = [e for e in walk_tracer.entries if e[1:] == ("clipserve.service.inference.cache", "get_blob")]
    assert len(lookups) == 1, lookups
