"""The collection stores' side of a refresh, on both backends: a second embedding space filled beside
the bound one by a job (chunks with their progress, stale writes left out), dual writes, the atomic
switch, rollback, cancel, items that cannot move, one job per collection and target, leases."""

from __future__ import annotations

import hashlib
import time

import numpy as np
import pytest

from clipserve.service.stores import IndexParams, ModelBinding, ModelMismatchError, Source
from clipserve.service.stores.collection_store import SpaceVectors
from clipserve.service.stores.jobs import AlreadyCurrentError, ItemError, JobStateError, LeaseLostError
from tests.fixtures.retrieval import unit_rows

V1 = ModelBinding("tiny", 1, "a" * 64, 32)
V2 = ModelBinding("tiny", 2, "b" * 64, 16)
V3 = ModelBinding("tiny", 3, "c" * 64, 16)
OWNER = "replica-a"


def vectors(count: int, dim: int, seed: int) -> np.ndarray:
    return unit_rows(np.random.default_rng(seed).standard_normal((count, dim), dtype=np.float32))


def new_space(text: str, dim: int = 16) -> np.ndarray:
    """A made-up 'model v2': the vector of a text is a function of the text."""
    return vectors(1, dim, seed=int.from_bytes(hashlib.sha256(text.encode()).digest()[:4]))[0]


def filled(store, name: str = "c", count: int = 30, index: str = "flat") -> list[str]:
    store.create_collection(name, V1, IndexParams(kind=index))
    texts = [f"text {i}" for i in range(count)]
    store.upsert(
        name,
        [f"t{i}" for i in range(count)],
        vectors(count, 32, seed=1),
        content_hash=V1.content_hash,
        sources=[Source("text", t) for t in texts],
        metadata=[{"n": i} for i in range(count)],
    )
    return texts


def run_job(store, job_id: str, chunk: int = 7, owner: str = OWNER) -> int:
    """Move every item as a job runner does; returns how many chunks it wrote."""
    chunks, cursor = 0, ""
    while items := store.job_chunk(job_id, cursor, chunk):
        moved = np.stack([new_space(item.source.value) for item in items])
        cursor = items[-1].key
        store.write_job_chunk(job_id, owner, items, moved, [], cursor, 100.0)
        chunks += 1
    return chunks


def started(store, target: ModelBinding = V2, owner: str = OWNER, **options: object):
    job = store.create_job("c", target, auto=False, drop_unembeddable=False, **options)
    claimed = store.claim_job(owner, lease_s=30)
    assert claimed is not None and claimed.id == job.id and claimed.state == "running"
    store.begin_space(job.id, owner)
    return job


def test_a_job_fills_the_other_space_beside_the_bound_one_then_switches(store):
    texts = filled(store)
    job = store.create_job("c", V2, auto=False, drop_unembeddable=False)
    assert (job.state, job.total, job.origin, job.target) == ("pending", 30, V1, V2)
    assert store.versions_in_use() == {
        "tiny@1": ["collection c"],
        "tiny@2": [f"job {job.id} (re-embedding c)"],
    }
    started(store)
    spaces = store.spaces("c")
    assert spaces.bound == V1 and spaces.other.binding == V2 and spaces.other.role == "target"

    assert run_job(store, job.id, chunk=7) == 5
    progress = store.get_job(job.id)
    assert progress.done == 30 and progress.rate == 100.0 and progress.cursor
    # a write while the job runs gives both spaces; one that gives only the bound space leaves the
    # item to the job
    store.upsert(
        "c",
        ["new"],
        vectors(1, 32, seed=5),
        content_hash=V1.content_hash,
        sources=[Source("text", "a new text")],
        also=SpaceVectors(V2.content_hash, new_space("a new text")[None], np.array([True])),
    )
    store.upsert(
        "c", ["t3"], vectors(1, 32, seed=6), content_hash=V1.content_hash, sources=[Source("text", "changed")]
    )
    blockers, total = store.job_blockers(job.id)
    assert (blockers.embeddable, blockers.blocking, total) == (1, 0, 31)
    assert not store.switch(job.id, OWNER, grace_s=60)  # t3 has no vector of v2 yet
    assert [item.item_id for item in store.job_chunk(job.id, "", 100)] == ["t3"]
    run_job(store, job.id)
    # searches answer from v1 until the switch
    with pytest.raises(ModelMismatchError):
        store.search("c", new_space("text 4"), content_hash=V2.content_hash, top_k=1)
    store.prepare_switch(job.id)
    assert store.switch(job.id, OWNER, grace_s=60)

    switched = store.get_job(job.id)
    assert switched.state == "switched" and switched.keep_until and switched.owner is None
    spaces = store.spaces("c")
    assert spaces.bound == V2 and spaces.other.binding == V1 and spaces.other.role == "previous"
    info = store.describe("c")
    assert (info.binding, info.count) == (V2, 31)
    hit = store.search("c", new_space(texts[4]), content_hash=V2.content_hash, top_k=1)[0]
    assert (hit.id, hit.metadata) == ("t4", {"n": 4}) and hit.score == pytest.approx(1.0, abs=1e-5)
    assert store.search("c", new_space("changed"), content_hash=V2.content_hash, top_k=1)[0].id == "t3"
    assert store.search("c", new_space("a new text"), content_hash=V2.content_hash, top_k=1)[0].id == "new"
    np.testing.assert_allclose(store.get("c", "t7").vector, new_space(texts[7]), atol=1e-6)
    with pytest.raises(ModelMismatchError, match="tiny@2"):
        store.search("c", vectors(1, 32, seed=2)[0], content_hash=V1.content_hash, top_k=1)
    assert store.versions_in_use() == {
        "tiny@2": ["collection c"],
        "tiny@1": ["collection c (previous space, for rollback)"],
    }

    claimed = store.claim_job("replica-b", lease_s=30)
    assert claimed is None  # the grace period is not over
    with pytest.raises(AlreadyCurrentError):
        store.create_job("c", V2, auto=False, drop_unembeddable=False)
    with pytest.raises(JobStateError, match="rollback"):
        store.cancel_job(job.id)


def test_an_item_changed_after_the_job_read_it_keeps_its_own_vector(store):
    filled(store, count=5)
    job = started(store)
    items = store.job_chunk(job.id, "", 10)
    store.upsert(
        "c",
        ["t2"],
        vectors(1, 32, seed=7),
        content_hash=V1.content_hash,
        sources=[Source("text", "rewritten")],
        also=SpaceVectors(V2.content_hash, new_space("rewritten")[None], np.array([True])),
    )
    store.delete("c", "t4")
    stale = np.stack([new_space(item.source.value) for item in items])
    store.write_job_chunk(job.id, OWNER, items, stale, [], items[-1].key, None)
    assert store.job_blockers(job.id)[1] == 4
    store.prepare_switch(job.id)
    assert store.switch(job.id, OWNER, grace_s=60)
    np.testing.assert_allclose(store.get("c", "t2").vector, new_space("rewritten"), atol=1e-6)
    assert {hit.id for hit in store.search("c", new_space("x"), content_hash=V2.content_hash, top_k=10)} == {
        "t0",
        "t1",
        "t2",
        "t3",
    }


def test_items_that_cannot_move_block_the_switch_until_dropped(store):
    filled(store, count=6)
    store.upsert("c", ["bare-1", "bare-2"], vectors(2, 32, seed=3), content_hash=V1.content_hash)
    job = started(store)
    items = store.job_chunk(job.id, "", 100)
    assert {item.item_id for item in items} == {f"t{i}" for i in range(6)}
    good = [item for item in items if item.item_id != "t5"]
    store.write_job_chunk(
        job.id,
        OWNER,
        good,
        np.stack([new_space(item.source.value) for item in good]),
        [ItemError("t5", "invalid_image", "image 0 is not a picture")],
        items[-1].key,
        None,
    )
    assert store.job_chunk(job.id, "", 100) == []  # the failed item is not tried again in this job
    blockers, total = store.job_blockers(job.id)
    assert (blockers.embeddable, blockers.unembeddable, blockers.errored, total) == (0, 2, 1, 8)
    assert blockers.first_ids == ["bare-1", "bare-2"]
    store.set_job_state(job.id, OWNER, "waiting", blockers, total)
    waiting = store.get_job(job.id)
    assert (waiting.state, waiting.unembeddable, waiting.unembeddable_ids, waiting.errors) == (
        "waiting",
        2,
        ["bare-1", "bare-2"],
        1,
    )
    assert [(e.item_id, e.code) for e in store.job_errors(job.id, 10)] == [("t5", "invalid_image")]
    assert not store.switch(job.id, OWNER, grace_s=60)

    # asked again with drop_unembeddable: the same job, its failed items tried again
    again = store.create_job("c", V2, auto=False, drop_unembeddable=True)
    assert (again.id, again.state, again.drop_unembeddable, again.errors) == (job.id, "running", True, 0)
    assert [item.item_id for item in store.job_chunk(job.id, "", 100)] == ["t5"]
    store.write_job_chunk(
        job.id, OWNER, [], np.zeros((0, 16)), [ItemError("t5", "invalid_image", "still")], "", None
    )
    assert store.switch(job.id, OWNER, grace_s=60)
    assert store.describe("c").count == 5
    assert "3 items that could not move were deleted" in store.get_job(job.id).message


def test_rollback_within_the_grace_period_finds_the_previous_space_whole(store):
    texts = filled(store, count=8)
    job = started(store)
    run_job(store, job.id)
    store.prepare_switch(job.id)
    assert store.switch(job.id, OWNER, grace_s=60)
    # written after the switch, to both spaces: the previous one stays whole for a rollback
    v1_vector = vectors(1, 32, seed=9)
    store.upsert(
        "c",
        ["late"],
        new_space("late")[None],
        content_hash=V2.content_hash,
        sources=[Source("text", "late")],
        also=SpaceVectors(V1.content_hash, v1_vector, np.array([True])),
    )
    store.upsert("c", ["bare"], vectors(1, 16, seed=4), content_hash=V2.content_hash)
    with pytest.raises(JobStateError, match=r"1 items of 'c' have no vector of tiny@1 .*'bare'"):
        store.rollback("c", drop_unembeddable=False)
    rolled = store.rollback("c", drop_unembeddable=True)
    assert rolled.id == job.id and rolled.state == "rolled_back"
    assert store.spaces("c").bound == V1 and store.spaces("c").other is None
    assert store.search("c", v1_vector[0], content_hash=V1.content_hash, top_k=1)[0].id == "late"
    original = vectors(8, 32, seed=1)
    assert store.search("c", original[2], content_hash=V1.content_hash, top_k=1)[0].id == "t2"
    assert store.describe("c").count == 9
    with pytest.raises(JobStateError, match="keeps no previous space"):
        store.rollback("c", drop_unembeddable=False)
    assert texts  # the v1 vectors were never rewritten


def test_the_grace_period_ends_and_the_previous_space_goes(store):
    filled(store, count=4)
    job = started(store)
    run_job(store, job.id)
    assert store.switch(job.id, OWNER, grace_s=0.05)
    time.sleep(0.1)
    claimed = store.claim_job("replica-b", lease_s=30)
    assert claimed is not None and (claimed.id, claimed.state) == (job.id, "switched")
    store.finish_job(job.id, "replica-b")
    assert store.get_job(job.id).state == "completed"
    assert store.spaces("c").other is None
    assert store.versions_in_use() == {"tiny@2": ["collection c"]}


def test_cancel_gives_the_space_up_and_the_next_job_starts_clean(store):
    filled(store, count=10)
    job = started(store)
    items = store.job_chunk(job.id, "", 4)
    store.write_job_chunk(job.id, OWNER, items, np.stack([new_space("x")] * 4), [], items[-1].key, None)
    cancelled = store.cancel_job(job.id)
    assert cancelled.state == "cancelled" and store.spaces("c").other is None
    assert store.cancel_job(job.id).state == "cancelled"  # twice is harmless
    with pytest.raises(LeaseLostError):
        store.write_job_chunk(job.id, OWNER, [], np.zeros((0, 16)), [], "", None)
    # a new job to the same space starts from nothing: the cancelled job's vectors do not count
    second = started(store)
    assert len(store.job_chunk(second.id, "", 100)) == 10


def test_one_job_per_collection_a_newer_target_supersedes(store):
    filled(store, count=3)
    first = store.create_job("c", V2, auto=True, drop_unembeddable=False)
    assert first is not None and first.auto
    assert store.create_job("c", V2, auto=True, drop_unembeddable=False) is None
    newer = store.create_job("c", V3, auto=True, drop_unembeddable=False)
    assert newer is not None and newer.id != first.id
    superseded = store.get_job(first.id)
    assert superseded.state == "cancelled" and newer.id in superseded.message
    # a policy never starts a job for a target it tried before (cancelled, failed or rolled back)
    store.cancel_job(newer.id)
    assert store.create_job("c", V3, auto=True, drop_unembeddable=False) is None
    assert store.create_job("c", V3, auto=False, drop_unembeddable=False) is not None
    assert [job.state for job in store.list_jobs("c")] == ["pending", "cancelled", "cancelled"]
    with pytest.raises(AlreadyCurrentError):
        store.create_job("c", V1, auto=False, drop_unembeddable=False)


def test_jobs_outlive_the_store_and_a_restart_resumes_from_the_cursor(store_factory):
    first = store_factory.open()
    filled(first, count=12)
    job = started(first)
    items = first.job_chunk(job.id, "", 5)
    first.write_job_chunk(
        job.id, OWNER, items, np.stack([new_space(i.source.value) for i in items]), [], items[-1].key, 10.0
    )
    first.close()
    store = store_factory.open()
    resumed = store.claim_job("replica-b", lease_s=0.0)
    assert resumed is not None and resumed.id == job.id and resumed.cursor == items[-1].key
    store.begin_space(job.id, "replica-b")
    assert len(store.job_chunk(job.id, resumed.cursor, 100)) == 7
    with pytest.raises(LeaseLostError):
        store.write_job_chunk(job.id, OWNER, [], np.zeros((0, 16)), [], "", None)
    run_job(store, job.id, owner="replica-b")
    assert store.switch(job.id, "replica-b", grace_s=60)
    assert store.describe("c").count == 12


def test_a_live_lease_is_not_taken_over_until_it_expires(store_factory):
    if store_factory.backend == "embedded":
        pytest.skip("the embedded store belongs to one process: another owner is a dead one")
    store = store_factory.open()
    filled(store, count=3)
    job = started(store)
    assert store.claim_job("replica-b", lease_s=30) is None
    assert store.heartbeat_job(job.id, OWNER).state == "running"
    time.sleep(0.3)
    taken = store.claim_job("replica-b", lease_s=0.2)
    assert taken is not None and taken.owner == "replica-b"
    assert store.heartbeat_job(job.id, OWNER) is None


def test_hnsw_collections_switch_to_an_index_of_the_new_space(store):
    filled(store, count=40, index="hnsw")
    job = started(store)
    run_job(store, job.id, chunk=16)
    store.prepare_switch(job.id)
    store.upsert(
        "c",
        ["after-prepare"],
        vectors(1, 32, seed=8),
        content_hash=V1.content_hash,
        sources=[Source("text", "after prepare")],
        also=SpaceVectors(V2.content_hash, new_space("after prepare")[None], np.array([True])),
    )
    assert store.switch(job.id, OWNER, grace_s=60)
    for text, item in (("text 17", "t17"), ("after prepare", "after-prepare")):
        assert store.search("c", new_space(text), content_hash=V2.content_hash, top_k=1)[0].id == item


FIRST_RELEASE_SCHEMA = """
CREATE TABLE collections (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE,
    model TEXT NOT NULL, version INTEGER NOT NULL, content_hash TEXT NOT NULL, dim INTEGER NOT NULL,
    index_params TEXT NOT NULL, created_at TEXT NOT NULL);
CREATE TABLE items (label INTEGER PRIMARY KEY AUTOINCREMENT,
    collection_id INTEGER NOT NULL REFERENCES collections(id) ON DELETE CASCADE, item_id TEXT NOT NULL,
    vector BLOB NOT NULL, metadata TEXT NOT NULL, source_kind TEXT, source TEXT, UNIQUE (collection_id, item_id));
"""


def test_a_data_dir_made_before_refreshes_opens_and_moves(tmp_path):
    """The embedded store adds its new columns to an existing data dir in place."""
    import sqlite3

    from clipserve.service.stores.embedded import EmbeddedStore

    folder = tmp_path / "collections"
    folder.mkdir()
    db = sqlite3.connect(folder / "collections.sqlite3")
    db.executescript(FIRST_RELEASE_SCHEMA)
    db.execute(
        "INSERT INTO collections (name, model, version, content_hash, dim, index_params, created_at) "
        "VALUES ('c', 'tiny', 1, ?, 32, ?, '2026-11-01T10:00:00+00:00')",
        (V1.content_hash, IndexParams().model_dump_json()),
    )
    old = vectors(3, 32, seed=1)
    db.executemany(
        "INSERT INTO items (collection_id, item_id, vector, metadata, source_kind, source) "
        "VALUES (1, ?, ?, '{}', 'text', ?)",
        [(f"t{i}", old[i].tobytes(), f"text {i}") for i in range(3)],
    )
    db.commit()
    db.close()
    store = EmbeddedStore(folder)
    try:
        assert store.spaces("c").bound == V1 and store.spaces("c").policy == "reembed"
        assert store.search("c", old[1], content_hash=V1.content_hash, top_k=1)[0].id == "t1"
        job = started(store)
        run_job(store, job.id)
        assert store.switch(job.id, OWNER, grace_s=60)
        assert store.search("c", new_space("text 2"), content_hash=V2.content_hash, top_k=1)[0].id == "t2"
    finally:
        store.close()


def test_a_postgres_schema_made_before_refreshes_opens_and_moves(postgres_schema_dsn):
    """The pgvector store adds its new catalog columns in place; a job adds its column beside the old one."""
    import psycopg
    from pgvector.psycopg import register_vector

    from clipserve.service.stores.pgvector import PgVectorStore

    old = vectors(3, 32, seed=1)
    with psycopg.connect(postgres_schema_dsn, autocommit=True) as conn:
        register_vector(conn)
        conn.execute(
            "CREATE TABLE clipserve_collections (id BIGSERIAL PRIMARY KEY, name TEXT NOT NULL UNIQUE, "
            "model TEXT NOT NULL, version INTEGER NOT NULL, content_hash TEXT NOT NULL, dim INTEGER NOT NULL, "
            "index_params JSONB NOT NULL, created_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        conn.execute(
            "INSERT INTO clipserve_collections (name, model, version, content_hash, dim, index_params) "
            "VALUES ('c', 'tiny', 1, %s, 32, %s)",
            (V1.content_hash, IndexParams().model_dump_json()),
        )
        conn.execute(
            "CREATE TABLE clipserve_items_1 (item_id TEXT PRIMARY KEY, embedding vector(32) NOT NULL, "
            "metadata JSONB NOT NULL, source_kind TEXT, source TEXT)"
        )
        for i in range(3):
            conn.execute(
                "INSERT INTO clipserve_items_1 VALUES (%s, %s, '{}', 'text', %s)",
                (f"t{i}", old[i], f"text {i}"),
            )
    store = PgVectorStore(postgres_schema_dsn)
    try:
        assert store.spaces("c").bound == V1 and store.spaces("c").policy == "reembed"
        job = started(store)
        run_job(store, job.id)
        assert store.switch(job.id, OWNER, grace_s=60)
        assert store.search("c", new_space("text 2"), content_hash=V2.content_hash, top_k=1)[0].id == "t2"
        # a bare vector during the grace period: the old column (once NOT NULL) takes the row without one
        store.upsert("c", ["bare"], vectors(1, 16, seed=3), content_hash=V2.content_hash)
        assert store.describe("c").count == 4
    finally:
        store.close()
