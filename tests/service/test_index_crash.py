"""Crash safety: a writer process is killed with SIGKILL mid-stream; every acknowledged id survives."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from clipserve.service.stores import IndexParams, ModelBinding

REPO_ROOT = Path(__file__).resolve().parents[2]
HASH = "c" * 64
BINDING = ModelBinding("tiny", 1, HASH, 64)
ACKED_BATCHES_BEFORE_KILL = 12
ITEMS_PER_CALL = 1000
# the embedded HNSW graph is snapshotted mid-stream (every 10,000 new items) and repaired on restart;
# pgvector's durability does not depend on the index, and its HNSW inserts are slow (~300 rows/s here)
KINDS = {"embedded": "hnsw", "pgvector": "flat"}

# Upserts calls of ITEMS_PER_CALL items (committed in store batches of 250) forever, and prints the ids
# of each call only once the call returned: those are the acknowledged ones.
WRITER = """
import sys
import numpy as np
from clipserve.service.stores import CollectionExistsError, IndexParams, ModelBinding

backend, location, per_call, kind = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
if backend == "embedded":
    from clipserve.service.stores.embedded import EmbeddedStore
    store = EmbeddedStore(location, batch_size=250)
else:
    from clipserve.service.stores.pgvector import PgVectorStore
    store = PgVectorStore(location, batch_size=250)
try:
    store.create_collection("crash", ModelBinding("tiny", 1, "c" * 64, 64), IndexParams(kind=kind))
except CollectionExistsError:
    pass
rng = np.random.default_rng(0)
call = 0
while True:
    ids = [f"c{call}-{i}" for i in range(per_call)]
    store.upsert("crash", ids, rng.standard_normal((per_call, 64), dtype=np.float32), content_hash="c" * 64,
                 metadata=[{"call": call}] * per_call)
    sys.stdout.write(" ".join(ids) + "\\n")
    sys.stdout.flush()
    call += 1
"""


def run_and_kill_writer(backend: str, location: str) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, backend, location, str(ITEMS_PER_CALL), KINDS[backend]],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO_ROOT,
        env=env,
        text=True,
    )
    acked: list[str] = []
    try:
        for _ in range(ACKED_BATCHES_BEFORE_KILL):
            line = writer.stdout.readline()
            assert line, f"writer died early: {writer.stderr.read()}"
            acked += line.split()
        time.sleep(0.05 + 0.1 * np.random.default_rng().random())  # land the kill inside a later call
        os.kill(writer.pid, signal.SIGKILL)
        rest, _ = writer.communicate(timeout=30)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert writer.returncode == -signal.SIGKILL
    for line in rest.splitlines():  # printed before the kill: acknowledged too
        acked += line.split()
    return acked


def test_kill_9_mid_stream_loses_no_acknowledged_item(store_factory):
    acked = run_and_kill_writer(store_factory.backend, store_factory.location)
    assert len(acked) >= ACKED_BATCHES_BEFORE_KILL * ITEMS_PER_CALL

    store = store_factory.open()
    info = store.describe("crash")
    assert info.binding == BINDING and info.index == IndexParams(kind=KINDS[store_factory.backend])
    # committed beyond the acknowledged: at most the call in flight (or returned, not yet printed)
    assert len(acked) <= info.count <= len(acked) + ITEMS_PER_CALL
    for item_id in acked:
        store.get("crash", item_id)
    # the in-memory index was rebuilt or repaired: acknowledged items are found by search
    rng = np.random.default_rng(1)
    for item_id in rng.choice(acked, 20, replace=False):
        item = store.get("crash", str(item_id))
        hits = store.search("crash", item.vector, content_hash=HASH, top_k=1)
        assert hits[0].id == item_id and hits[0].score > 0.999
    # and the store keeps taking writes
    store.upsert("crash", ["after"], rng.standard_normal((1, 64)), content_hash=HASH)
    assert store.count("crash") == info.count + 1
