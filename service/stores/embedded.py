"""The embedded backend: FAISS for the vectors, SQLite (WAL, synchronous=FULL) as the durable truth.

Layout under the data dir:
    collections.sqlite3      catalog + every item (id, vector, metadata, source) + inline images'
                             bytes (table `images`, by collection and sha256), the durable state
    hnsw/<collection>.npz    optional HNSW snapshots, so a restart need not rebuild the graph
    LOCK                     held while a process has the store open (one writer process per data dir)

A write is acknowledged once its SQLite transaction committed with synchronous=FULL. The FAISS index
lives in memory and is derived: rebuilt from SQLite when a collection is first used after a start
(from the HNSW snapshot plus the rows committed after it, when a snapshot exists), so a kill -9 at any
moment loses no acknowledged item.

Each item row has a `label`, an AUTOINCREMENT integer never reused; FAISS holds vectors by position
and `_LiveIndex.labels` maps position -> label. Replacing or deleting an item marks its old position
dead (a tombstone, skipped by an ID selector) and the index is compacted when too many are dead.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from clipserve.contract.cli_settings import usable_cores

from .collection_store import (
    BackendUnavailableError,
    CollectionExistsError,
    CollectionInfo,
    CollectionNotFoundError,
    FilterValue,
    ImageRefs,
    IndexParams,
    ItemNotFoundError,
    ModelBinding,
    ProgressCallback,
    ReadWriteLock,
    SearchHit,
    Source,
    StoredItem,
    batches,
    check_binding,
    check_image_bytes,
    encode_metadata,
    normalize_rows,
    prepare_upsert,
    rebind_rows,
    released_images,
    validate_collection_name,
    validate_filter,
    validate_item_id,
    validate_top_k,
)

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS collections (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    model TEXT NOT NULL,
    version INTEGER NOT NULL,
    content_hash TEXT NOT NULL,
    dim INTEGER NOT NULL,
    index_params TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS items (
    label INTEGER PRIMARY KEY AUTOINCREMENT,
    collection_id INTEGER NOT NULL REFERENCES collections(id) ON DELETE CASCADE,
    item_id TEXT NOT NULL,
    vector BLOB NOT NULL,
    metadata TEXT NOT NULL,
    source_kind TEXT,
    source TEXT,
    UNIQUE (collection_id, item_id)
);
CREATE TABLE IF NOT EXISTS images (
    collection_id INTEGER NOT NULL REFERENCES collections(id) ON DELETE CASCADE,
    digest TEXT NOT NULL,
    data BLOB NOT NULL,
    size INTEGER NOT NULL,
    refs INTEGER NOT NULL,
    PRIMARY KEY (collection_id, digest)
);
CREATE INDEX IF NOT EXISTS images_size ON images (collection_id, size);
"""
_SQLITE_VARIABLES = 900
_COMPACT_MIN_DEAD = 1000
_COMPACT_DEAD_FRACTION = 0.25
_SNAPSHOT_MIN_NEW = 10_000
_IVF_TRAIN_POINTS_PER_LIST_CAP = 64


class _Catalog:
    """One collections row."""

    def __init__(self, row: sqlite3.Row):
        self.id: int = row["id"]
        self.name: str = row["name"]
        self.binding = ModelBinding(row["model"], row["version"], row["content_hash"], row["dim"])
        self.params = IndexParams.model_validate_json(row["index_params"])
        self.created_at: str = row["created_at"]


def _new_faiss_index(params: IndexParams, vectors: np.ndarray, dim: int) -> tuple[faiss.Index, str]:
    """An index holding `vectors` at positions 0..n-1, and the kind actually built.

    IVF needs training data: until the collection holds enough vectors it is searched exactly.
    """
    if params.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, params.m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params.ef_construction
        built = "hnsw"
    elif params.kind == "ivf" and len(vectors) >= params.ivf_train_size:
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, params.nlist, faiss.METRIC_INNER_PRODUCT)
        cap = params.nlist * _IVF_TRAIN_POINTS_PER_LIST_CAP
        sample = (
            vectors
            if len(vectors) <= cap
            else vectors[np.random.default_rng(0).choice(len(vectors), cap, False)]
        )
        index.train(sample)
        built = "ivf"
    else:
        index = faiss.IndexFlatIP(dim)
        built = "flat"
    if len(vectors):
        index.add(vectors)
    return index, built


class _LiveIndex:
    """The in-memory FAISS index of one collection, guarded by a readers-writer lock."""

    def __init__(
        self,
        binding: ModelBinding,
        params: IndexParams,
        labels: np.ndarray,
        index: faiss.Index,
        built: str,
        unsaved: int,
    ):
        self.binding = binding
        self.params = params
        self.lock = ReadWriteLock()
        self.labels = labels.astype(np.int64)
        self.index, self.built = index, built
        self.dead: set[int] = set()
        self._dead_array: np.ndarray | None = None
        self.added_since_snapshot = unsaved

    @classmethod
    def build(
        cls, binding: ModelBinding, params: IndexParams, labels: np.ndarray, vectors: np.ndarray
    ) -> _LiveIndex:
        index, built = _new_faiss_index(params, vectors, binding.dim)
        return cls(binding, params, labels, index, built, unsaved=len(labels))

    @property
    def alive(self) -> int:
        return len(self.labels) - len(self.dead)

    def positions_of(self, labels: np.ndarray) -> np.ndarray:
        """Positions of the labels present in the index (labels grow with position, so it is sorted)."""
        if not len(labels) or not len(self.labels):
            return np.zeros(0, dtype=np.int64)
        positions = np.searchsorted(self.labels, labels)
        positions = positions[positions < len(self.labels)]
        return positions[np.isin(self.labels[positions], labels)]

    def apply(self, removed_labels: np.ndarray, new_labels: np.ndarray, vectors: np.ndarray) -> None:
        with self.lock.write():
            self.dead.update(int(p) for p in self.positions_of(removed_labels))
            self._dead_array = None
            if len(new_labels):
                self.index.add(vectors)
                self.labels = np.concatenate([self.labels, new_labels.astype(np.int64)])
                self.added_since_snapshot += len(new_labels)

    def needs_rebuild(self) -> bool:
        too_many_dead = len(self.dead) >= max(_COMPACT_MIN_DEAD, _COMPACT_DEAD_FRACTION * len(self.labels))
        ivf_ready = (
            self.params.kind == "ivf" and self.built != "ivf" and self.alive >= self.params.ivf_train_size
        )
        return too_many_dead or ivf_ready

    def _selector(self, allowed_positions: np.ndarray | None) -> faiss.IDSelector | None:
        if allowed_positions is not None:
            return faiss.IDSelectorBatch(allowed_positions)
        if not self.dead:
            return None
        if self._dead_array is None:
            self._dead_array = np.fromiter(self.dead, dtype=np.int64, count=len(self.dead))
        return faiss.IDSelectorNot(faiss.IDSelectorBatch(self._dead_array))

    def _search_params(self, selector: faiss.IDSelector | None, top_k: int) -> faiss.SearchParameters | None:
        if self.built == "hnsw":
            return faiss.SearchParametersHNSW(efSearch=max(self.params.ef_search, top_k), sel=selector)
        if self.built == "ivf":
            return faiss.SearchParametersIVF(nprobe=self.params.nprobe, sel=selector)
        return faiss.SearchParameters(sel=selector) if selector is not None else None

    def search(
        self, query: np.ndarray, top_k: int, content_hash: str, name: str, allowed_labels: np.ndarray | None
    ) -> list[tuple[int, float]]:
        with self.lock.read():
            check_binding(name, self.binding, content_hash)
            allowed = None
            if allowed_labels is not None:
                allowed = np.setdiff1d(self.positions_of(allowed_labels), self._dead_positions())
                if not len(allowed):
                    return []
            if not self.alive:
                return []
            selector = self._selector(allowed)
            scores, positions = self.index.search(query, top_k, params=self._search_params(selector, top_k))
            found = positions[0] >= 0
            return list(
                zip(self.labels[positions[0][found]].tolist(), scores[0][found].tolist(), strict=True)
            )

    def _dead_positions(self) -> np.ndarray:
        return np.fromiter(self.dead, dtype=np.int64, count=len(self.dead))

    def snapshot_to(self, path: Path) -> None:
        with self.lock.read():
            if self.built != "hnsw" or self.dead:
                return
            payload = {
                "index": faiss.serialize_index(self.index),
                "labels": self.labels,
                "content_hash": np.array(self.binding.content_hash),
                "params": np.array(self.params.model_dump_json()),
            }
            self.added_since_snapshot = 0
        tmp = path.with_suffix(".tmp.npz")
        with open(tmp, "wb") as fh:
            np.savez(fh, **payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)


class EmbeddedStore:
    """Collections in FAISS + SQLite under one data dir. Safe for threads; one process per data dir."""

    def __init__(
        self,
        data_dir: Path | str,
        *,
        batch_size: int = 5000,
        exact_filter_limit: int = 4096,
        search_threads: int = 1,
        build_threads: int | None = None,
        max_image_bytes: int | None = None,
    ):
        """`search_threads`: OpenMP threads per search; one query per request gains little from more, and
        concurrent requests already use the cores (on a busy 2-core machine, 2 threads per query made flat
        search 4x slower). `build_threads` (default: all cores) for adding, training and rebuilding.
        Both are set on the calling thread only (OpenMP's per-thread setting), around each call.
        `max_image_bytes`: inline images' bytes kept per collection (None: no limit)."""
        self.data_dir = Path(data_dir)
        self.max_image_bytes = max_image_bytes
        self.batch_size = batch_size
        self.exact_filter_limit = exact_filter_limit
        self.search_threads = search_threads
        self.build_threads = build_threads or usable_cores()
        try:
            (self.data_dir / "hnsw").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BackendUnavailableError(
                f"cannot create the collections data dir {self.data_dir}: {exc.strerror}"
            ) from exc
        self._lock_file = self._acquire_dir_lock()
        self._db_path = self.data_dir / "collections.sqlite3"
        self._writer = self._connect()
        self._writer.executescript(_SCHEMA)
        self._write_mutex = threading.RLock()
        self._readers = threading.local()
        self._reader_connections: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._live: dict[int, _LiveIndex] = {}
        self._closed = False

    def _acquire_dir_lock(self) -> Any:
        handle = open(self.data_dir / "LOCK", "a+")  # noqa: SIM115 - held for the store's lifetime
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            handle.close()
            raise BackendUnavailableError(
                f"collections data dir {self.data_dir} is in use by another process; the embedded backend "
                "serves one instance (use the pgvector backend for several replicas)"
            ) from exc
        return handle

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._db_path, isolation_level=None, check_same_thread=False, timeout=30)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._readers, "conn", None)
        if conn is None:
            conn = self._connect()
            self._readers.conn = conn
            with self._readers_lock:
                self._reader_connections.append(conn)
        return conn

    # catalog

    def _catalog(self, conn: sqlite3.Connection, name: str) -> _Catalog:
        validate_collection_name(name)
        row = conn.execute("SELECT * FROM collections WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise CollectionNotFoundError(f"no collection named {name!r}")
        return _Catalog(row)

    def _info(self, conn: sqlite3.Connection, catalog: _Catalog) -> CollectionInfo:
        count = conn.execute("SELECT count(*) FROM items WHERE collection_id = ?", (catalog.id,)).fetchone()[
            0
        ]
        return CollectionInfo(catalog.name, catalog.binding, catalog.params, count, catalog.created_at)

    def create_collection(self, name: str, binding: ModelBinding, index: IndexParams) -> CollectionInfo:
        validate_collection_name(name)
        created_at = datetime.now(UTC).isoformat(timespec="seconds")
        with self._write_mutex:
            try:
                self._writer.execute(
                    "INSERT INTO collections (name, model, version, content_hash, dim, index_params, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        name,
                        binding.model,
                        binding.version,
                        binding.content_hash,
                        binding.dim,
                        index.model_dump_json(),
                        created_at,
                    ),
                )
            except sqlite3.IntegrityError as exc:
                raise CollectionExistsError(f"collection {name!r} already exists") from exc
        return CollectionInfo(name, binding, index, 0, created_at)

    def drop_collection(self, name: str) -> None:
        with self._write_mutex:
            catalog = self._catalog(self._writer, name)
            with _write_transaction(self._writer):
                self._writer.execute("DELETE FROM items WHERE collection_id = ?", (catalog.id,))
                self._writer.execute("DELETE FROM images WHERE collection_id = ?", (catalog.id,))
                self._writer.execute("DELETE FROM collections WHERE id = ?", (catalog.id,))
            self._live.pop(catalog.id, None)
            self._snapshot_path(catalog.id).unlink(missing_ok=True)

    def list_collections(self) -> list[CollectionInfo]:
        conn = self._reader()
        rows = conn.execute("SELECT * FROM collections ORDER BY name").fetchall()
        return [self._info(conn, _Catalog(row)) for row in rows]

    def describe(self, name: str) -> CollectionInfo:
        conn = self._reader()
        return self._info(conn, self._catalog(conn, name))

    def binding(self, name: str) -> ModelBinding:
        return self._catalog(self._reader(), name).binding

    def count(self, name: str) -> int:
        return self.describe(name).count

    # the in-memory index

    def _snapshot_path(self, collection_id: int) -> Path:
        return self.data_dir / "hnsw" / f"{collection_id}.npz"

    def _load_rows(self, collection_id: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
        rows = self._writer.execute(
            "SELECT label, vector FROM items WHERE collection_id = ? ORDER BY label", (collection_id,)
        ).fetchall()
        labels = np.array([row[0] for row in rows], dtype=np.int64)
        vectors = np.frombuffer(b"".join(row[1] for row in rows), dtype=np.float32).reshape(len(rows), dim)
        return labels, vectors

    def _restore_snapshot(self, catalog: _Catalog) -> _LiveIndex | None:
        path = self._snapshot_path(catalog.id)
        if catalog.params.kind != "hnsw" or not path.is_file():
            return None
        try:
            with np.load(path) as snap:
                if str(snap["content_hash"]) != catalog.binding.content_hash or str(snap["params"]) != (
                    catalog.params.model_dump_json()
                ):
                    return None
                index = faiss.deserialize_index(snap["index"])
                labels = snap["labels"]
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            log.warning("ignoring unreadable HNSW snapshot %s: %s", path, exc)
            return None
        live_labels = np.array(
            [
                r[0]
                for r in self._writer.execute(
                    "SELECT label FROM items WHERE collection_id = ?", (catalog.id,)
                )
            ],
            dtype=np.int64,
        )
        missing = np.setdiff1d(live_labels, labels)
        if len(missing) and len(labels) and missing.min() < labels.max():
            return None
        live = _LiveIndex(catalog.binding, catalog.params, labels, index, "hnsw", unsaved=0)
        live.dead.update(np.flatnonzero(~np.isin(labels, live_labels)).tolist())
        if len(missing):
            live.apply(np.zeros(0, dtype=np.int64), missing, self._vectors_of(missing, catalog.binding.dim))
        return live

    def _vectors_of(self, labels: np.ndarray, dim: int) -> np.ndarray:
        blobs: dict[int, bytes] = {}
        for chunk in batches(len(labels), _SQLITE_VARIABLES):
            part = labels[chunk].tolist()
            marks = ",".join("?" * len(part))
            blobs.update(
                self._writer.execute(f"SELECT label, vector FROM items WHERE label IN ({marks})", part)
            )
        return np.frombuffer(b"".join(blobs[int(label)] for label in labels), dtype=np.float32).reshape(
            -1, dim
        )

    def _live_index(self, catalog: _Catalog) -> _LiveIndex:
        live = self._live.get(catalog.id)
        if live is not None:
            return live
        with self._write_mutex:
            live = self._live.get(catalog.id)
            if live is None:
                faiss.omp_set_num_threads(self.build_threads)
                live = self._restore_snapshot(catalog)
                if live is None:
                    live = _LiveIndex.build(
                        catalog.binding, catalog.params, *self._load_rows(catalog.id, catalog.binding.dim)
                    )
                self._live[catalog.id] = live
            return live

    def _rebuild(self, catalog: _Catalog) -> None:
        live = _LiveIndex.build(
            catalog.binding, catalog.params, *self._load_rows(catalog.id, catalog.binding.dim)
        )
        self._live[catalog.id] = live

    def snapshot(self) -> None:
        """Write HNSW graphs to disk so the next start need not rebuild them (done on close too)."""
        with self._write_mutex:
            for collection_id, live in list(self._live.items()):
                live.snapshot_to(self._snapshot_path(collection_id))

    # items

    def upsert(
        self,
        name: str,
        ids: Sequence[str],
        vectors: np.ndarray,
        *,
        content_hash: str,
        metadata: Sequence[dict[str, Any]] | None = None,
        sources: Sequence[Source | None] | None = None,
        progress: ProgressCallback | None = None,
    ) -> int:
        with self._write_mutex:
            faiss.omp_set_num_threads(self.build_threads)
            catalog = self._catalog(self._writer, name)
            check_binding(name, catalog.binding, content_hash)
            ids, vectors, metadata, sources = prepare_upsert(
                ids, vectors, catalog.binding.dim, metadata, sources
            )
            encoded = [encode_metadata(entry, position) for position, entry in enumerate(metadata)]
            live = self._live_index(catalog)
            for chunk in batches(len(ids), self.batch_size):
                removed, labels = self._write_batch(
                    catalog, ids[chunk], vectors[chunk], encoded[chunk], sources[chunk]
                )
                live.apply(removed, labels, vectors[chunk])
                if progress is not None:
                    progress(chunk.stop, len(ids))
            self._maintain(catalog, live)
            return len(ids)

    def _write_batch(
        self,
        catalog: _Catalog,
        ids: list[str],
        vectors: np.ndarray,
        metadata: list[str],
        sources: list[Source | None],
    ) -> tuple[np.ndarray, np.ndarray]:
        """Commit one batch durably; returns (labels replaced, labels assigned)."""
        conn = self._writer
        with _write_transaction(conn):
            current = self._catalog(conn, catalog.name)
            if current.id != catalog.id or current.binding != catalog.binding:
                raise CollectionNotFoundError(
                    f"collection {catalog.name!r} was dropped or re-bound during the write"
                )
            removed: list[int] = []
            removed_sources: list[tuple[str | None, str | None]] = []
            for chunk in batches(len(ids), _SQLITE_VARIABLES):
                part = ids[chunk]
                marks = ",".join("?" * len(part))
                for row in conn.execute(
                    f"DELETE FROM items WHERE collection_id = ? AND item_id IN ({marks}) "
                    "RETURNING label, source_kind, source",
                    (catalog.id, *part),
                ):
                    removed.append(row[0])
                    removed_sources.append((row[1], row[2]))
            row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'items'").fetchone()
            first = (row[0] if row else 0) + 1
            labels = np.arange(first, first + len(ids), dtype=np.int64)
            conn.executemany(
                "INSERT INTO items (label, collection_id, item_id, vector, metadata, source_kind, source) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    (
                        int(label),
                        catalog.id,
                        item_id,
                        vector.tobytes(),
                        meta,
                        source.kind if source else None,
                        source.value if source else None,
                    )
                    for label, item_id, vector, meta, source in zip(
                        labels, ids, vectors, metadata, sources, strict=True
                    )
                ),
            )
            self._count_images(conn, catalog, ImageRefs.of(sources), released_images(removed_sources))
        return np.array(removed, dtype=np.int64), labels

    def _count_images(
        self, conn: sqlite3.Connection, catalog: _Catalog, added: ImageRefs, released: dict[str, int]
    ) -> None:
        """Inside a write's transaction: keep the bytes of new inline images, count the items using
        each, free those no item uses any more, and hold the collection to `max_image_bytes`."""
        conn.executemany(
            "INSERT INTO images (collection_id, digest, data, size, refs) VALUES (?, ?, ?, ?, 0) "
            "ON CONFLICT DO NOTHING",
            ((catalog.id, digest, data, len(data)) for digest, data in added.data.items()),
        )
        change = dict(added.uses)
        for digest, count in released.items():
            change[digest] = change.get(digest, 0) - count
        conn.executemany(
            "UPDATE images SET refs = refs + ? WHERE collection_id = ? AND digest = ?",
            ((delta, catalog.id, digest) for digest, delta in change.items() if delta),
        )
        conn.executemany(
            "DELETE FROM images WHERE collection_id = ? AND digest = ? AND refs <= 0",
            ((catalog.id, digest) for digest in released),
        )
        if added.data:
            total = conn.execute(
                "SELECT coalesce(sum(size), 0) FROM images WHERE collection_id = ?", (catalog.id,)
            ).fetchone()[0]
            check_image_bytes(catalog.name, total, self.max_image_bytes)

    def images(self, name: str, digests: Sequence[str]) -> dict[str, bytes]:
        conn = self._reader()
        catalog = self._catalog(conn, name)
        found: dict[str, bytes] = {}
        unique = list(dict.fromkeys(digests))
        for chunk in batches(len(unique), _SQLITE_VARIABLES):
            part = unique[chunk]
            marks = ",".join("?" * len(part))
            found.update(
                conn.execute(
                    f"SELECT digest, data FROM images WHERE collection_id = ? AND digest IN ({marks})",
                    (catalog.id, *part),
                ).fetchall()
            )
        return found

    def _maintain(self, catalog: _Catalog, live: _LiveIndex) -> None:
        """Compact tombstones, train IVF once there is enough data, snapshot a grown HNSW graph."""
        if live.needs_rebuild():
            self._rebuild(catalog)
            live = self._live[catalog.id]
        if live.built == "hnsw" and live.added_since_snapshot >= _SNAPSHOT_MIN_NEW:
            live.snapshot_to(self._snapshot_path(catalog.id))

    def get(self, name: str, item_id: str) -> StoredItem:
        validate_item_id(item_id)
        conn = self._reader()
        catalog = self._catalog(conn, name)
        row = conn.execute(
            "SELECT item_id, vector, metadata, source_kind, source FROM items WHERE collection_id = ? AND item_id = ?",
            (catalog.id, item_id),
        ).fetchone()
        if row is None:
            raise ItemNotFoundError(f"collection {name!r} has no item {item_id!r}")
        source = Source(row["source_kind"], row["source"]) if row["source_kind"] else None
        return StoredItem(
            row["item_id"],
            np.frombuffer(row["vector"], dtype=np.float32).copy(),
            json.loads(row["metadata"]),
            source,
        )

    def delete(self, name: str, item_id: str) -> None:
        validate_item_id(item_id)
        with self._write_mutex:
            catalog = self._catalog(self._writer, name)
            live = self._live_index(catalog)
            conn = self._writer
            with _write_transaction(conn):
                row = conn.execute(
                    "DELETE FROM items WHERE collection_id = ? AND item_id = ? RETURNING label, source_kind, source",
                    (catalog.id, item_id),
                ).fetchone()
                if row is None:
                    raise ItemNotFoundError(f"collection {name!r} has no item {item_id!r}")
                self._count_images(conn, catalog, ImageRefs(), released_images([(row[1], row[2])]))
            live.apply(np.array([row[0]], dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros((0, 1)))
            self._maintain(catalog, live)

    # search

    def search(
        self,
        name: str,
        query: np.ndarray,
        *,
        content_hash: str,
        top_k: int,
        filter: dict[str, FilterValue] | None = None,
    ) -> list[SearchHit]:
        validate_top_k(top_k)
        conditions = validate_filter(filter)
        conn = self._reader()
        allowed = None
        # one read transaction: the binding checked is the one of the rows read (no re-bind in between)
        with _read_transaction(conn):
            catalog = self._catalog(conn, name)
            check_binding(name, catalog.binding, content_hash)
            query = normalize_rows(query, catalog.binding.dim, what="query vector")
            if conditions:
                allowed = self._matching_labels(conn, catalog.id, conditions)
                if len(allowed) <= self.exact_filter_limit:
                    return self._exact_search(conn, catalog, query, allowed, top_k)
        live = self._live_index(catalog)
        faiss.omp_set_num_threads(self.search_threads)
        scored = live.search(query, top_k, content_hash, name, allowed)
        return self._hits(conn, scored)

    def _matching_labels(
        self, conn: sqlite3.Connection, collection_id: int, filter: dict[str, FilterValue]
    ) -> np.ndarray:
        clauses, params = [], []
        for key, value in filter.items():
            clause, args = _filter_clause(key, value)
            clauses.append(clause)
            params += args
        sql = f"SELECT label FROM items WHERE collection_id = ? AND {' AND '.join(clauses)} ORDER BY label"
        return np.array([row[0] for row in conn.execute(sql, (collection_id, *params))], dtype=np.int64)

    def _exact_search(
        self, conn: sqlite3.Connection, catalog: _Catalog, query: np.ndarray, labels: np.ndarray, top_k: int
    ) -> list[SearchHit]:
        if not len(labels):
            return []
        rows = []
        for chunk in batches(len(labels), _SQLITE_VARIABLES):
            part = labels[chunk].tolist()
            marks = ",".join("?" * len(part))
            rows += conn.execute(
                f"SELECT item_id, vector, metadata FROM items WHERE label IN ({marks})", part
            ).fetchall()
        if not rows:
            return []
        matrix = np.frombuffer(b"".join(row[1] for row in rows), dtype=np.float32).reshape(len(rows), -1)
        scores = matrix @ query[0]
        order = np.argsort(-scores, kind="stable")[:top_k]
        return [SearchHit(rows[i][0], float(scores[i]), json.loads(rows[i][2])) for i in order]

    def _hits(self, conn: sqlite3.Connection, scored: list[tuple[int, float]]) -> list[SearchHit]:
        if not scored:
            return []
        marks = ",".join("?" * len(scored))
        rows = {
            row[0]: row
            for row in conn.execute(
                f"SELECT label, item_id, metadata FROM items WHERE label IN ({marks})",
                [label for label, _ in scored],
            )
        }
        # a label missing here was replaced or deleted after the index answered: skip it
        return [
            SearchHit(rows[label][1], score, json.loads(rows[label][2]))
            for label, score in scored
            if label in rows
        ]

    # re-embedding

    def iter_sources(self, name: str, batch_size: int = 1000) -> Iterator[list[tuple[str, Source | None]]]:
        conn = self._reader()
        catalog = self._catalog(conn, name)
        last = 0
        while True:
            rows = conn.execute(
                "SELECT label, item_id, source_kind, source FROM items WHERE collection_id = ? AND label > ? "
                "ORDER BY label LIMIT ?",
                (catalog.id, last, batch_size),
            ).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            yield [(row[1], Source(row[2], row[3]) if row[2] else None) for row in rows]

    def rebind(self, name: str, binding: ModelBinding, ids: Sequence[str], vectors: np.ndarray) -> None:
        """Move the collection to another embedding space: new vectors for every item, in one transaction."""
        with self._write_mutex:
            catalog = self._catalog(self._writer, name)
            conn = self._writer
            with _write_transaction(conn):
                stored = {
                    row[0]
                    for row in conn.execute(
                        "SELECT item_id FROM items WHERE collection_id = ?", (catalog.id,)
                    )
                }
                normalized = rebind_rows(name, stored, ids, vectors, binding.dim)
                conn.executemany(
                    "UPDATE items SET vector = ? WHERE collection_id = ? AND item_id = ?",
                    (
                        (vector.tobytes(), catalog.id, item_id)
                        for item_id, vector in zip(ids, normalized, strict=True)
                    ),
                )
                conn.execute(
                    "UPDATE collections SET model = ?, version = ?, content_hash = ?, dim = ? WHERE id = ?",
                    (binding.model, binding.version, binding.content_hash, binding.dim, catalog.id),
                )
            self._snapshot_path(catalog.id).unlink(missing_ok=True)
            faiss.omp_set_num_threads(self.build_threads)
            self._rebuild(self._catalog(conn, name))

    def close(self) -> None:
        """Snapshot HNSW graphs and release the data dir; closing twice is harmless."""
        if self._closed:
            return
        self._closed = True
        try:
            self.snapshot()
        finally:
            with self._readers_lock:
                for conn in self._reader_connections:
                    conn.close()
                self._reader_connections.clear()
            self._writer.close()
            self._lock_file.close()


@contextmanager
def _write_transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error, the COMMIT's own included: a
    transaction left open would make every later write of this connection fail ("cannot start a
    transaction within a transaction"). Some errors (a full disk) have rolled back already. What
    SQLite could not do (a full disk, an I/O error, a lock held too long) is a store that cannot
    write now: 503 with Retry-After, the store intact."""
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    except sqlite3.OperationalError as exc:
        raise BackendUnavailableError(
            f"collections are unavailable: the store could not write ({exc}); retry shortly"
        ) from exc


@contextmanager
def _read_transaction(conn: sqlite3.Connection) -> Iterator[None]:
    conn.execute("BEGIN")
    try:
        yield
    finally:
        conn.execute("COMMIT")


def _filter_clause(key: str, value: FilterValue) -> tuple[str, list[Any]]:
    """SQL matching one metadata field; JSON types must agree (true is not 1, "1" is not 1)."""
    path = f'$."{key}"'
    if value is None:
        return "json_type(metadata, ?) = 'null'", [path]
    if isinstance(value, bool):
        return "json_type(metadata, ?) = ?", [path, "true" if value else "false"]
    if isinstance(value, int | float):
        return "json_type(metadata, ?) IN ('integer', 'real') AND json_extract(metadata, ?) = ?", [
            path,
            path,
            value,
        ]
    return "json_type(metadata, ?) = 'text' AND json_extract(metadata, ?) = ?", [path, path, value]
