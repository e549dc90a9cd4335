"""Behaviour of the collection stores; every test runs against both backends (FAISS+SQLite, pgvector)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from clipserve.service.stores import (
    BackendUnavailableError,
    CollectionExistsError,
    CollectionNotFoundError,
    ImageStorageFullError,
    IndexParams,
    InvalidInputError,
    ItemNotFoundError,
    ModelBinding,
    ModelMismatchError,
    Source,
)
from tests.fixtures.retrieval import unit_rows

DIM = 32
HASH = "a" * 64
OTHER_HASH = "b" * 64
BINDING = ModelBinding("tiny", 1, HASH, DIM)


def random_vectors(count: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    return unit_rows(np.random.default_rng(seed).standard_normal((count, dim), dtype=np.float32))


def ids_of(count: int, prefix: str = "item") -> list[str]:
    return [f"{prefix}-{i}" for i in range(count)]


def brute_force(vectors: np.ndarray, query: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = vectors @ query
    order = np.argsort(-scores, kind="stable")[:top_k]
    return order, scores[order]


def test_collection_lifecycle(store):
    info = store.create_collection("photos", BINDING, IndexParams(kind="hnsw", m=8))
    assert (info.name, info.count, info.binding, info.index.kind, info.index.m) == (
        "photos",
        0,
        BINDING,
        "hnsw",
        8,
    )
    store.create_collection("docs", BINDING, IndexParams())
    assert [c.name for c in store.list_collections()] == ["docs", "photos"]
    with pytest.raises(CollectionExistsError, match="'photos' already exists"):
        store.create_collection("photos", BINDING, IndexParams())
    store.upsert("photos", ["a"], random_vectors(1), content_hash=HASH)
    described = store.describe("photos")
    assert (described.count, described.binding.content_hash, described.index.kind) == (1, HASH, "hnsw")
    store.drop_collection("photos")
    assert [c.name for c in store.list_collections()] == ["docs"]
    for call in (
        lambda: store.describe("photos"),
        lambda: store.drop_collection("photos"),
        lambda: store.upsert("photos", ["a"], random_vectors(1), content_hash=HASH),
        lambda: store.search("photos", random_vectors(1), content_hash=HASH, top_k=1),
        lambda: store.get("photos", "a"),
    ):
        with pytest.raises(CollectionNotFoundError, match="no collection named 'photos'"):
            call()


def test_invalid_collection_names_and_params_refused(store):
    for name in ("", "../etc", "a b", "x" * 200):
        with pytest.raises(InvalidInputError, match="invalid collection name"):
            store.create_collection(name, BINDING, IndexParams())
    with pytest.raises(ValueError, match="nprobe"):
        IndexParams(kind="ivf", nlist=8, nprobe=16)


def test_exact_search_equals_numpy_brute_force(store):
    vectors = random_vectors(3000, seed=1)
    store.create_collection("flat", BINDING, IndexParams(kind="flat"))
    assert store.upsert("flat", ids_of(3000), vectors, content_hash=HASH) == 3000
    for query in random_vectors(10, seed=2):
        hits = store.search("flat", query, content_hash=HASH, top_k=25)
        order, scores = brute_force(vectors, query, 25)
        assert [h.id for h in hits] == [f"item-{i}" for i in order]
        np.testing.assert_allclose([h.score for h in hits], scores, atol=1e-5)


def test_vectors_are_normalized_and_scores_are_cosines(store):
    store.create_collection("c", BINDING, IndexParams())
    raw = np.random.default_rng(3).standard_normal((5, DIM)).astype(np.float32) * 7.5
    store.upsert("c", ids_of(5), raw, content_hash=HASH)
    np.testing.assert_allclose(np.linalg.norm(store.get("c", "item-0").vector), 1.0, atol=1e-6)
    hits = store.search("c", raw[2] * 0.1, content_hash=HASH, top_k=1)
    assert hits[0].id == "item-2" and hits[0].score == pytest.approx(1.0, abs=1e-5)


def test_upsert_replaces_and_duplicates_in_one_call_last_wins(store):
    store.create_collection("c", BINDING, IndexParams())
    vectors = random_vectors(4, seed=4)
    store.upsert("c", ["a", "b"], vectors[:2], content_hash=HASH, metadata=[{"v": 1}, {"v": 1}])
    store.upsert("c", ["a"], vectors[2:3], content_hash=HASH, metadata=[{"v": 2}])
    assert store.count("c") == 2
    np.testing.assert_allclose(store.get("c", "a").vector, vectors[2], atol=1e-6)
    assert store.get("c", "a").metadata == {"v": 2}
    hits = store.search("c", vectors[0], content_hash=HASH, top_k=5)
    assert [h.id for h in hits].count("a") == 1
    # the same id twice in one call: the last one is kept
    assert store.upsert("c", ["d", "d"], vectors[:2], content_hash=HASH, metadata=[{"n": 1}, {"n": 2}]) == 1
    assert store.get("c", "d").metadata == {"n": 2}
    np.testing.assert_allclose(store.get("c", "d").vector, vectors[1], atol=1e-6)
    assert store.count("c") == 3


def test_get_and_delete_items(store):
    store.create_collection("c", BINDING, IndexParams())
    vectors = random_vectors(3, seed=5)
    store.upsert(
        "c",
        ["x", "y", "z"],
        vectors,
        content_hash=HASH,
        metadata=[{"tag": "cat"}, {}, {}],
        sources=[Source("text", "a cat"), Source("image", "https://e/x.jpg"), None],
    )
    item = store.get("c", "x")
    assert (item.id, item.metadata, item.source) == ("x", {"tag": "cat"}, Source("text", "a cat"))
    assert store.get("c", "z").source is None
    store.delete("c", "x")
    assert store.count("c") == 2
    assert "x" not in [h.id for h in store.search("c", vectors[0], content_hash=HASH, top_k=3)]
    with pytest.raises(ItemNotFoundError, match="no item 'x'"):
        store.get("c", "x")
    with pytest.raises(ItemNotFoundError, match="no item 'x'"):
        store.delete("c", "x")


@pytest.mark.parametrize(
    ("vector_at_2", "message"),
    [
        (lambda v: np.full_like(v, np.nan), "vector 2 contains NaN or infinity"),
        (lambda v: np.where(np.arange(len(v)) == 3, np.inf, v), "vector 2 contains NaN or infinity"),
        (lambda v: np.zeros_like(v), "vector 2 is all zeros"),
    ],
)
def test_bad_vectors_refuse_the_whole_call(store, vector_at_2, message):
    store.create_collection("c", BINDING, IndexParams())
    vectors = random_vectors(4, seed=6)
    vectors[2] = vector_at_2(vectors[2])
    with pytest.raises(InvalidInputError, match=message) as caught:
        store.upsert("c", ids_of(4), vectors, content_hash=HASH)
    assert caught.value.index == 2
    assert store.count("c") == 0


def test_wrong_dims_ids_and_queries_refused(store):
    store.create_collection("c", BINDING, IndexParams())
    with pytest.raises(InvalidInputError, match="dimension 16, the collection expects 32"):
        store.upsert("c", ids_of(2), random_vectors(2, dim=16), content_hash=HASH)
    with pytest.raises(InvalidInputError, match="item 1: id must be a non-empty string"):
        store.upsert("c", ["a", ""], random_vectors(2), content_hash=HASH)
    with pytest.raises(InvalidInputError, match="2 ids but 3 vectors"):
        store.upsert("c", ["a", "b"], random_vectors(3), content_hash=HASH)
    with pytest.raises(InvalidInputError, match="item 0: metadata is not plain JSON"):
        store.upsert("c", ["a"], random_vectors(1), content_hash=HASH, metadata=[{"x": float("nan")}])
    store.upsert("c", ["a"], random_vectors(1), content_hash=HASH)
    with pytest.raises(InvalidInputError, match="query vector has dimension 8"):
        store.search("c", random_vectors(1, dim=8), content_hash=HASH, top_k=1)
    with pytest.raises(InvalidInputError, match="query vector 0 contains NaN"):
        store.search("c", np.full(DIM, np.nan), content_hash=HASH, top_k=1)
    for top_k in (0, -3):
        with pytest.raises(InvalidInputError, match="top_k must be a positive integer"):
            store.search("c", random_vectors(1), content_hash=HASH, top_k=top_k)


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_filters(store, kind):
    store.create_collection("c", BINDING, IndexParams(kind=kind))
    count = 600
    vectors = random_vectors(count, seed=7)
    metadata = [
        {
            "color": ["red", "green", "blue"][i % 3],
            "size": i % 4,
            "big": i % 2 == 0,
            "maybe": None if i % 5 == 0 else 1,
        }
        for i in range(count)
    ]
    store.upsert("c", ids_of(count), vectors, content_hash=HASH, metadata=metadata)
    query = random_vectors(1, seed=8)[0]

    def expected(predicate, top_k=10):
        chosen = [i for i in range(count) if predicate(metadata[i])]
        order, _ = brute_force(vectors[chosen], query, top_k)
        return [f"item-{chosen[i]}" for i in order]

    def found(filter, top_k=10):
        return [h.id for h in store.search("c", query, content_hash=HASH, top_k=top_k, filter=filter)]

    assert found({"color": "red"}) == expected(lambda m: m["color"] == "red")
    assert found({"color": "red", "size": 2}) == expected(lambda m: m["color"] == "red" and m["size"] == 2)
    assert found({"size": 1.0}) == expected(lambda m: m["size"] == 1)
    assert found({"big": True}) == expected(lambda m: m["big"])
    assert found({"maybe": None}) == expected(lambda m: m["maybe"] is None)
    assert all(
        h.metadata["color"] == "blue"
        for h in store.search("c", query, content_hash=HASH, top_k=5, filter={"color": "blue"})
    )
    # JSON types must agree: true is not 1 and "2" is not 2
    assert found({"maybe": True}) == []
    assert found({"size": "2"}) == []
    # a field no item has matches nothing: empty results, not an error
    assert found({"no_such_field": "x"}) == []
    with pytest.raises(InvalidInputError, match="only strings, numbers, booleans and null"):
        found({"color": ["red"]})
    with pytest.raises(InvalidInputError, match="invalid filter field"):
        found({'a"b': 1})


def test_filter_selecting_many_items_goes_through_the_index(store_factory):
    """Past the exact-filter limit the embedded store filters inside FAISS with an ID selector."""
    options = {"exact_filter_limit": 50} if store_factory.backend == "embedded" else {}
    store = store_factory.open(**options)
    store.create_collection("c", BINDING, IndexParams(kind="flat"))
    vectors = random_vectors(1000, seed=9)
    store.upsert(
        "c", ids_of(1000), vectors, content_hash=HASH, metadata=[{"even": i % 2 == 0} for i in range(1000)]
    )
    store.delete("c", "item-0")
    query = random_vectors(1, seed=10)[0]
    chosen = [i for i in range(2, 1000, 2)]
    order, scores = brute_force(vectors[chosen], query, 20)
    hits = store.search("c", query, content_hash=HASH, top_k=20, filter={"even": True})
    assert [h.id for h in hits] == [f"item-{chosen[i]}" for i in order]
    np.testing.assert_allclose([h.score for h in hits], scores, atol=1e-5)


def test_model_binding_refuses_other_spaces(store):
    """Moving a collection to another space is a re-embed job's (tests/service/test_refresh_store.py)."""
    store.create_collection("c", BINDING, IndexParams())
    texts = [f"photo number {i}" for i in range(20)]
    store.upsert(
        "c",
        ids_of(20),
        random_vectors(20, seed=11),
        content_hash=HASH,
        sources=[Source("text", t) for t in texts],
    )
    with pytest.raises(ModelMismatchError, match=r"tiny@1 .*re-embed the collection"):
        store.search("c", random_vectors(1)[0], content_hash=OTHER_HASH, top_k=3)
    with pytest.raises(ModelMismatchError):
        store.upsert("c", ["new"], random_vectors(1), content_hash=OTHER_HASH)
    assert store.get("c", "item-3").source == Source("text", texts[3])


def test_inline_images_are_kept_by_content_deduplicated_and_freed(store_factory):
    first = store_factory.open()
    first.create_collection("c", BINDING, IndexParams())
    red, blue = b"\x89PNG red pixels" * 10, b"\xff\xd8 blue pixels" * 10
    sources = [Source.inline_image(red), Source.inline_image(red), Source.inline_image(blue)]
    first.upsert("c", ["a", "b", "c"], random_vectors(3), content_hash=HASH, sources=sources)
    first.close()
    store = store_factory.open()  # the bytes are durable like the items
    red_digest, blue_digest = sources[0].stored_image, sources[2].stored_image
    assert store.get("c", "a").source == Source("image", f"sha256:{red_digest}")
    assert store.images("c", [red_digest, blue_digest, "f" * 64]) == {red_digest: red, blue_digest: blue}
    assert [(item_id, store.get("c", item_id).source.value) for item_id in "abc"] == [
        ("a", f"sha256:{red_digest}"),
        ("b", f"sha256:{red_digest}"),
        ("c", f"sha256:{blue_digest}"),
    ]
    # the red bytes stay while one item still uses them
    store.upsert("c", ["a"], random_vectors(1), content_hash=HASH, sources=[Source("text", "now a text")])
    assert set(store.images("c", [red_digest])) == {red_digest}
    store.delete("c", "b")
    assert store.images("c", [red_digest]) == {}
    store.delete("c", "c")
    assert store.images("c", [blue_digest]) == {}
    with pytest.raises(InvalidInputError, match="carries none"):
        store.upsert(
            "c",
            ["d"],
            random_vectors(1),
            content_hash=HASH,
            sources=[Source("image", f"sha256:{red_digest}")],
        )


def test_inline_image_bytes_are_limited_per_collection(store_factory):
    store = store_factory.open(max_image_bytes=1000)
    store.create_collection("c", BINDING, IndexParams())
    store.create_collection("d", BINDING, IndexParams())
    first, second = b"1" * 600, b"2" * 600
    store.upsert("c", ["x"], random_vectors(1), content_hash=HASH, sources=[Source.inline_image(first)])
    # the same bytes again cost nothing; other bytes would pass the limit, and nothing is written
    store.upsert("c", ["y"], random_vectors(1), content_hash=HASH, sources=[Source.inline_image(first)])
    with pytest.raises(ImageStorageFullError, match="over this server's limit of 1000 bytes") as caught:
        store.upsert(
            "c", ["z", "w"], random_vectors(2), content_hash=HASH, sources=[None, Source.inline_image(second)]
        )
    assert caught.value.code == "collection_images_too_large"
    assert store.count("c") == 2
    store.upsert("d", ["z"], random_vectors(1), content_hash=HASH, sources=[Source.inline_image(second)])
    store.delete("c", "x")
    store.delete("c", "y")
    store.upsert("c", ["z"], random_vectors(1), content_hash=HASH, sources=[Source.inline_image(second)])
    assert store.count("c") == 1
    store.drop_collection("c")
    assert store.images("d", [Source.inline_image(second).stored_image])


def test_items_survive_a_restart(store_factory):
    first = store_factory.open()
    first.create_collection("c", BINDING, IndexParams(kind="hnsw"))
    vectors = random_vectors(300, seed=13)
    first.upsert("c", ids_of(300), vectors, content_hash=HASH, metadata=[{"i": i} for i in range(300)])
    first.close()
    second = store_factory.open()
    assert second.describe("c").count == 300
    hits = second.search("c", vectors[42], content_hash=HASH, top_k=3)
    assert (hits[0].id, hits[0].metadata) == ("item-42", {"i": 42})


def test_hnsw_snapshot_is_repaired_with_later_writes(store_factory):
    """Restart after writes the snapshot missed (kill -9 after them): they are replayed from durable state."""
    first = store_factory.open()
    first.create_collection("c", BINDING, IndexParams(kind="hnsw"))
    vectors = random_vectors(400, seed=14)
    first.upsert("c", ids_of(300), vectors[:300], content_hash=HASH)
    first.close()  # the embedded store snapshots its HNSW graph here
    second = store_factory.open()
    second.upsert("c", ids_of(400)[300:], vectors[300:], content_hash=HASH)
    for item_id in ("item-0", "item-1", "item-350"):
        second.delete("c", item_id)
    second.upsert("c", ["item-2"], vectors[399:400], content_hash=HASH)
    second.close()  # dead entries in the graph: no new snapshot, the old one is repaired on start
    third = store_factory.open()
    alive = [i for i in range(400) if i not in (0, 1, 2, 350)]
    expected_vectors = np.concatenate([vectors[alive], vectors[399:400]])
    expected_ids = [f"item-{i}" for i in alive] + ["item-2"]
    for query in random_vectors(5, seed=15):
        order, _ = brute_force(expected_vectors, query, 5)
        assert [h.id for h in third.search("c", query, content_hash=HASH, top_k=5)] == [
            expected_ids[i] for i in order
        ]
    assert third.count("c") == 397


def test_ivf_is_exact_until_trained_then_approximate(store):
    params = IndexParams(kind="ivf", nlist=4, nprobe=4)  # nprobe == nlist: the trained index is still exact
    store.create_collection("c", BINDING, params)
    vectors = random_vectors(params.ivf_train_size + 100, seed=16)
    query = random_vectors(1, seed=17)[0]
    store.upsert("c", ids_of(50), vectors[:50], content_hash=HASH)
    order, _ = brute_force(vectors[:50], query, 10)
    assert [h.id for h in store.search("c", query, content_hash=HASH, top_k=10)] == [
        f"item-{i}" for i in order
    ]
    store.upsert("c", ids_of(len(vectors))[50:], vectors[50:], content_hash=HASH)
    order, _ = brute_force(vectors, query, 10)
    assert [h.id for h in store.search("c", query, content_hash=HASH, top_k=10)] == [
        f"item-{i}" for i in order
    ]


def test_bulk_upsert_reports_progress_in_batches(store_factory):
    store = store_factory.open(batch_size=1000)
    store.create_collection("c", BINDING, IndexParams())
    seen: list[tuple[int, int]] = []
    assert (
        store.upsert(
            "c",
            ids_of(3500),
            random_vectors(3500),
            content_hash=HASH,
            progress=lambda done, total: seen.append((done, total)),
        )
        == 3500
    )
    assert seen == [(1000, 3500), (2000, 3500), (3000, 3500), (3500, 3500)]
    assert store.count("c") == 3500


def test_readers_keep_working_while_a_bulk_write_runs(store_factory):
    store = store_factory.open(batch_size=500)
    store.create_collection("c", BINDING, IndexParams(kind="hnsw"))
    store.upsert("c", ["seed"], random_vectors(1, seed=18), content_hash=HASH)
    batches_done: list[float] = []
    searches_done: list[float] = []
    errors: list[BaseException] = []

    def write() -> None:
        try:
            store.upsert(
                "c",
                ids_of(12_000),
                random_vectors(12_000, seed=19),
                content_hash=HASH,
                progress=lambda done, total: batches_done.append(time.perf_counter()),
            )
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    writer = threading.Thread(target=write)
    writer.start()
    query = random_vectors(1, seed=20)[0]
    while writer.is_alive():
        hits = store.search("c", query, content_hash=HASH, top_k=5)
        assert hits and all(np.isfinite(h.score) for h in hits)
        searches_done.append(time.perf_counter())
    writer.join()
    assert not errors
    assert len(batches_done) == 24
    between = [t for t in searches_done if batches_done[0] < t < batches_done[-1]]
    assert between, "no search completed while the bulk write was in progress"
    assert store.count("c") == 12_001


def test_unreachable_postgres_is_a_clear_error():
    from clipserve.service.stores.pgvector import PgVectorStore

    with pytest.raises(BackendUnavailableError, match="cannot connect to PostgreSQL"):
        PgVectorStore("postgresql://clipserve@127.0.0.1:1/none?connect_timeout=2")


def test_embedded_data_dir_serves_one_process_at_a_time(tmp_path):
    from clipserve.service.stores.embedded import EmbeddedStore

    first = EmbeddedStore(tmp_path)
    try:
        with pytest.raises(BackendUnavailableError, match="in use by another process"):
            EmbeddedStore(tmp_path)
    finally:
        first.close()
    EmbeddedStore(tmp_path).close()


def test_pgvector_bulk_upsert_into_hnsw_rebuilds_the_index(postgres_schema_dsn):
    """pgvector inserts into an HNSW graph row by row, far slower than a build: big upserts rebuild."""
    import psycopg

    from clipserve.service.stores.pgvector import PgVectorStore

    store = PgVectorStore(postgres_schema_dsn, reindex_min_rows=500)
    try:
        store.create_collection("c", BINDING, IndexParams(kind="hnsw"))
        vectors = random_vectors(2300, seed=21)

        def index_oid() -> int | None:
            with psycopg.connect(postgres_schema_dsn) as conn:
                return conn.execute("SELECT to_regclass('clipserve_items_1_ann')::oid").fetchone()[0]

        store.upsert("c", ids_of(1200), vectors[:1200], content_hash=HASH)
        first = index_oid()
        assert first is not None
        store.upsert("c", ids_of(1300)[1200:], vectors[1200:1300], content_hash=HASH)  # small: kept
        assert index_oid() == first
        store.upsert("c", ids_of(2300)[1300:], vectors[1300:], content_hash=HASH)  # bulk: rebuilt
        rebuilt = index_oid()
        assert rebuilt is not None and rebuilt != first
        for position in (5, 1250, 2299):
            assert (
                store.search("c", vectors[position], content_hash=HASH, top_k=1)[0].id == f"item-{position}"
            )
    finally:
        store.close()
