"""The embedded backend: FAISS for the vectors, SQLite (WAL, synchronous=FULL) as the durable truth.

Layout under the data dir:
    collections.sqlite3      catalog + every item (id, vectors, metadata, source) + inline images'
                             bytes (table `images`, by collection and sha256) + re-embed jobs (tables
                             `jobs`, `job_errors`), the durable state
    hnsw/<collection>.npz    optional HNSW snapshots, so a restart need not rebuild the graph
    LOCK                     held while a process has the store open (one writer process per data dir)

A write is acknowledged once its SQLite transaction committed with synchronous=FULL. The FAISS index
lives in memory and is derived: rebuilt from SQLite when a collection is first used after a start
(from the HNSW snapshot plus the rows committed after it, when a snapshot exists), so a kill -9 at any
moment loses no acknowledged item.

Each item row has a `label`, an AUTOINCREMENT integer never reused; FAISS holds vectors by position
and `_LiveIndex.labels` maps position -> label. Replacing or deleting an item marks its old position
dead (a tombstone, skipped by an ID selector) and the index is compacted when too many are dead.

Two spaces at once: an item row has two vector slots, (`vector`, `vector_tag`) and (`alt_vector`,
`alt_tag`). The catalog says which slot holds the bound space (`bound_slot`, `bound_tag`) and, in
`other`, which space the other slot holds and under which tag. A vector counts for a space only when
its slot's tag is that space's, so a new job (a new tag) starts on an empty slot without rewriting a
row, a switch only flips the catalog, and the vectors a cancelled job left behind are simply ignored.
Tags are job numbers (0 for the space a collection was created in).
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
    CollectionSpaces,
    FilterValue,
    ImageRefs,
    IndexParams,
    ItemNotFoundError,
    ModelBinding,
    ModelMismatchError,
    OtherSpace,
    PreparedUpsert,
    ProgressCallback,
    ReadWriteLock,
    RefreshPolicy,
    SearchHit,
    Source,
    SpaceVectors,
    StoredItem,
    batches,
    check_binding,
    check_image_bytes,
    encode_metadata,
    normalize_rows,
    prepare_upsert,
    released_images,
    validate_collection_name,
    validate_filter,
    validate_item_id,
    validate_top_k,
    vectors_by_space,
)
from .jobs import (
    ACTIVE_STATES,
    FIRST_IDS,
    MAX_STORED_ERRORS,
    AlreadyCurrentError,
    Blockers,
    ChunkItem,
    ItemError,
    JobNotFoundError,
    JobRecord,
    JobState,
    JobStateError,
    LeaseLostError,
    already_current,
    cannot_cancel_switched,
    dropped_message,
    new_job_id,
    nothing_to_roll_back,
    rollback_blocked,
    rolled_back,
    superseded,
    versions_in_use,
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
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    collection_id INTEGER NOT NULL REFERENCES collections(id) ON DELETE CASCADE,
    state TEXT NOT NULL,
    target TEXT NOT NULL,
    origin TEXT NOT NULL,
    auto INTEGER NOT NULL,
    drop_unembeddable INTEGER NOT NULL,
    cursor TEXT NOT NULL DEFAULT '',
    done INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL DEFAULT 0,
    errors INTEGER NOT NULL DEFAULT 0,
    unembeddable INTEGER NOT NULL DEFAULT 0,
    unembeddable_ids TEXT NOT NULL DEFAULT '[]',
    rate REAL,
    owner TEXT,
    heartbeat REAL,
    created_at REAL NOT NULL,
    started_at REAL,
    switched_at REAL,
    finished_at REAL,
    keep_until REAL,
    message TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_one_active ON jobs (collection_id)
    WHERE state IN ('pending', 'running', 'waiting');
CREATE TABLE IF NOT EXISTS job_errors (
    job_seq INTEGER NOT NULL REFERENCES jobs(seq) ON DELETE CASCADE,
    item_id TEXT NOT NULL,
    code TEXT NOT NULL,
    message TEXT NOT NULL,
    PRIMARY KEY (job_seq, item_id)
);
"""
# Columns added after the first release: added in place to a data dir made before them.
_ADDED_COLUMNS = (
    ("collections", "policy", "TEXT NOT NULL DEFAULT 'reembed'"),
    ("collections", "bound_slot", "INTEGER NOT NULL DEFAULT 0"),
    ("collections", "bound_tag", "INTEGER NOT NULL DEFAULT 0"),
    ("collections", "other", "TEXT"),
    ("items", "vector_tag", "INTEGER NOT NULL DEFAULT 0"),
    ("items", "alt_vector", "BLOB"),
    ("items", "alt_tag", "INTEGER NOT NULL DEFAULT -1"),
)
_SLOTS = (("vector", "vector_tag"), ("alt_vector", "alt_tag"))
_NO_TAG = -1
# Seconds since the epoch with a fraction, in SQLite before 3.42 (which adds unixepoch('subsec')).
_NOW = "((julianday('now') - 2440587.5) * 86400.0)"
_SQLITE_VARIABLES = 900
_COMPACT_MIN_DEAD = 1000
_COMPACT_DEAD_FRACTION = 0.25
_SNAPSHOT_MIN_NEW = 10_000
_IVF_TRAIN_POINTS_PER_LIST_CAP = 64


_JOB_SELECT = (
    f"SELECT j.*, c.name AS collection_name, {_NOW} - j.heartbeat AS age "
    "FROM jobs j JOIN collections c ON c.id = j.collection_id "
)


def _iso(seconds: float | None) -> str | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")


def _job_record(row: sqlite3.Row) -> JobRecord:
    return JobRecord(
        id=row["id"],
        collection=row["collection_name"],
        state=row["state"],
        target=ModelBinding.of(row["target"]),
        origin=ModelBinding.of(row["origin"]),
        auto=bool(row["auto"]),
        drop_unembeddable=bool(row["drop_unembeddable"]),
        done=row["done"],
        total=row["total"],
        errors=row["errors"],
        unembeddable=row["unembeddable"],
        unembeddable_ids=json.loads(row["unembeddable_ids"]),
        rate=row["rate"],
        owner=row["owner"],
        heartbeat_age_s=row["age"],
        created_at=_iso(row["created_at"]) or "",
        started_at=_iso(row["started_at"]),
        switched_at=_iso(row["switched_at"]),
        finished_at=_iso(row["finished_at"]),
        keep_until=_iso(row["keep_until"]),
        message=row["message"],
        cursor=row["cursor"],
        seq=row["seq"],
    )


class _Catalog:
    """One collections row."""

    def __init__(self, row: sqlite3.Row):
        self.id: int = row["id"]
        self.name: str = row["name"]
        self.binding = ModelBinding(row["model"], row["version"], row["content_hash"], row["dim"])
        self.params = IndexParams.model_validate_json(row["index_params"])
        self.created_at: str = row["created_at"]
        self.policy: RefreshPolicy = row["policy"]
        self.bound_slot: int = row["bound_slot"]
        self.bound_tag: int = row["bound_tag"]
        self.other = OtherSpace.of(row["other"])

    @property
    def bound_columns(self) -> tuple[str, str]:
        """(vector column, tag column) of the bound space."""
        return _SLOTS[self.bound_slot]

    @property
    def other_columns(self) -> tuple[str, str]:
        return _SLOTS[1 - self.bound_slot]

    @property
    def spaces(self) -> CollectionSpaces:
        return CollectionSpaces(self.binding, self.other, self.policy)

    @property
    def bound_state(self) -> tuple:
        """What the bound space's index depends on."""
        return (self.id, self.binding, self.bound_slot, self.bound_tag)

    @property
    def state(self) -> tuple:
        """What a write depends on: both spaces and where they live."""
        return (*self.bound_state, self.other)


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
        self._add_columns()
        self._write_mutex = threading.RLock()
        self._readers = threading.local()
        self._reader_connections: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        # the bound space's index of each collection, by (collection id, tag)
        self._live: dict[tuple[int, int], _LiveIndex] = {}
        # a job's target index, built before its switch, by (collection id, tag)
        self._prepared: dict[tuple[int, int], _LiveIndex] = {}
        self._closed = False

    def _add_columns(self) -> None:
        for table, column, declaration in _ADDED_COLUMNS:
            present = {row[1] for row in self._writer.execute(f"PRAGMA table_info({table})")}
            if column not in present:
                self._writer.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")

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
        return CollectionInfo(
            catalog.name,
            catalog.binding,
            catalog.params,
            count,
            catalog.created_at,
            catalog.other,
            catalog.policy,
        )

    @contextmanager
    def _write_transaction(self) -> Iterator[sqlite3.Connection]:
        """The writer connection in one IMMEDIATE transaction (`_committed`); the caller holds the
        write mutex."""
        with _committed(self._writer):
            yield self._writer

    def create_collection(
        self, name: str, binding: ModelBinding, index: IndexParams, policy: RefreshPolicy = "reembed"
    ) -> CollectionInfo:
        validate_collection_name(name)
        created_at = datetime.now(UTC).isoformat(timespec="seconds")
        with self._write_mutex:
            try:
                self._writer.execute(
                    "INSERT INTO collections (name, model, version, content_hash, dim, index_params, "
                    "created_at, policy) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        name,
                        binding.model,
                        binding.version,
                        binding.content_hash,
                        binding.dim,
                        index.model_dump_json(),
                        created_at,
                        policy,
                    ),
                )
            except sqlite3.IntegrityError as exc:
                raise CollectionExistsError(f"collection {name!r} already exists") from exc
        return CollectionInfo(name, binding, index, 0, created_at, policy=policy)

    def drop_collection(self, name: str) -> None:
        with self._write_mutex:
            catalog = self._catalog(self._writer, name)
            with self._write_transaction() as conn:
                conn.execute("DELETE FROM items WHERE collection_id = ?", (catalog.id,))
                conn.execute("DELETE FROM images WHERE collection_id = ?", (catalog.id,))
                conn.execute("DELETE FROM collections WHERE id = ?", (catalog.id,))
            self._forget_indexes(catalog.id)
            self._snapshot_path(catalog.id).unlink(missing_ok=True)

    def _forget_indexes(self, collection_id: int, keep: tuple[int, int] | None = None) -> None:
        for indexes in (self._live, self._prepared):
            for key in [key for key in indexes if key[0] == collection_id and key != keep]:
                del indexes[key]

    def list_collections(self) -> list[CollectionInfo]:
        conn = self._reader()
        rows = conn.execute("SELECT * FROM collections ORDER BY name").fetchall()
        return [self._info(conn, _Catalog(row)) for row in rows]

    def describe(self, name: str) -> CollectionInfo:
        conn = self._reader()
        return self._info(conn, self._catalog(conn, name))

    def binding(self, name: str) -> ModelBinding:
        return self._catalog(self._reader(), name).binding

    def spaces(self, name: str) -> CollectionSpaces:
        return self._catalog(self._reader(), name).spaces

    def all_spaces(self) -> dict[str, CollectionSpaces]:
        rows = self._reader().execute("SELECT * FROM collections ORDER BY name").fetchall()
        return {catalog.name: catalog.spaces for catalog in map(_Catalog, rows)}

    def count(self, name: str) -> int:
        return self.describe(name).count

    # the in-memory index

    def _snapshot_path(self, collection_id: int) -> Path:
        return self.data_dir / "hnsw" / f"{collection_id}.npz"

    def _load_rows(
        self, conn: sqlite3.Connection, collection_id: int, columns: tuple[str, str], tag: int, dim: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """(labels, vectors) of the items that have a vector of space `tag` in the slot `columns`."""
        vector, tag_column = columns
        rows = conn.execute(
            f"SELECT label, {vector} FROM items WHERE collection_id = ? AND {tag_column} = ? ORDER BY label",
            (collection_id, tag),
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
            live.apply(
                np.zeros(0, dtype=np.int64),
                missing,
                self._vectors_of(missing, catalog.bound_columns[0], catalog.binding.dim),
            )
        return live

    def _vectors_of(
        self, labels: np.ndarray, column: str, dim: int, conn: sqlite3.Connection | None = None
    ) -> np.ndarray:
        blobs: dict[int, bytes] = {}
        for chunk in batches(len(labels), _SQLITE_VARIABLES):
            part = labels[chunk].tolist()
            marks = ",".join("?" * len(part))
            blobs.update(
                (conn or self._writer).execute(
                    f"SELECT label, {column} FROM items WHERE label IN ({marks})", part
                )
            )
        return np.frombuffer(b"".join(blobs[int(label)] for label in labels), dtype=np.float32).reshape(
            -1, dim
        )

    def _live_index(self, catalog: _Catalog) -> _LiveIndex:
        """The bound space's index, built on first use; a catalog read before a switch gets
        `ModelMismatchError` (the caller reads the binding again) rather than an index of the old space."""
        live = self._live.get((catalog.id, catalog.bound_tag))
        if live is not None:
            return live
        with self._write_mutex:
            if self._catalog(self._writer, catalog.name).bound_state != catalog.bound_state:
                raise ModelMismatchError(f"collection {catalog.name!r} moved to another space meanwhile")
            key = (catalog.id, catalog.bound_tag)
            live = self._live.get(key)
            if live is None:
                faiss.omp_set_num_threads(self.build_threads)
                live = self._restore_snapshot(catalog)
                if live is None:
                    live = self._build(
                        self._writer, catalog, catalog.bound_columns, catalog.bound_tag, catalog.binding
                    )
                self._live[key] = live
            return live

    def _build(
        self,
        conn: sqlite3.Connection,
        catalog: _Catalog,
        columns: tuple[str, str],
        tag: int,
        binding: ModelBinding,
    ) -> _LiveIndex:
        labels, vectors = self._load_rows(conn, catalog.id, columns, tag, binding.dim)
        return _LiveIndex.build(binding, catalog.params, labels, vectors)

    def _rebuild(self, catalog: _Catalog) -> None:
        live = self._build(self._writer, catalog, catalog.bound_columns, catalog.bound_tag, catalog.binding)
        self._live[(catalog.id, catalog.bound_tag)] = live

    def snapshot(self) -> None:
        """Write HNSW graphs to disk so the next start need not rebuild them (done on close too)."""
        with self._write_mutex:
            for (collection_id, _tag), live in list(self._live.items()):
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
        also: SpaceVectors | None = None,
    ) -> int:
        with self._write_mutex:
            faiss.omp_set_num_threads(self.build_threads)
            catalog = self._catalog(self._writer, name)
            bound, other = vectors_by_space(name, catalog.spaces, content_hash, vectors, also)
            other_dim = catalog.other.binding.dim if catalog.other is not None else 0
            prepared = prepare_upsert(ids, bound, catalog.binding.dim, metadata, sources, other, other_dim)
            encoded = [encode_metadata(entry, position) for position, entry in enumerate(prepared.metadata)]
            live = self._live_index(catalog)
            for chunk in batches(len(prepared.ids), self.batch_size):
                part = prepared.part(chunk)
                removed, labels = self._write_batch(catalog, part, encoded[chunk])
                live.apply(removed, labels, part.vectors)
                if progress is not None:
                    progress(chunk.stop, len(prepared.ids))
            self._maintain(catalog, live)
            return len(prepared.ids)

    def _write_batch(
        self, catalog: _Catalog, batch: PreparedUpsert, metadata: list[str]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Commit one batch durably, both spaces; returns (labels replaced, labels assigned)."""
        ids, sources = batch.ids, batch.sources
        with self._write_transaction() as conn:
            if self._catalog(conn, catalog.name).state != catalog.state:
                raise ModelMismatchError(f"collection {catalog.name!r} changed spaces during the write")
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
            (vector, tag), (other_vector, other_tag) = catalog.bound_columns, catalog.other_columns
            other_space = catalog.other.tag if catalog.other is not None else _NO_TAG
            conn.executemany(
                f"INSERT INTO items (label, collection_id, item_id, {vector}, {tag}, {other_vector}, "
                f"{other_tag}, metadata, source_kind, source) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    (
                        int(label),
                        catalog.id,
                        item_id,
                        bound.tobytes(),
                        catalog.bound_tag,
                        other.tobytes() if present else b"",
                        other_space if present else _NO_TAG,
                        meta,
                        source.kind if source else None,
                        source.value if source else None,
                    )
                    for label, item_id, bound, other, present, meta, source in zip(
                        labels,
                        ids,
                        batch.vectors,
                        batch.other_vectors,
                        batch.other_present,
                        metadata,
                        sources,
                        strict=True,
                    )
                ),
            )
            self._count_images(conn, catalog, ImageRefs.of(sources), released_images(removed_sources))
            self._forget_item_errors(conn, catalog, ids)
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
            live = self._live[(catalog.id, catalog.bound_tag)]
        if live.built == "hnsw" and live.added_since_snapshot >= _SNAPSHOT_MIN_NEW:
            live.snapshot_to(self._snapshot_path(catalog.id))

    def get(self, name: str, item_id: str) -> StoredItem:
        validate_item_id(item_id)
        conn = self._reader()
        with _read_transaction(conn):
            catalog = self._catalog(conn, name)
            row = conn.execute(
                f"SELECT item_id, {catalog.bound_columns[0]} AS vector, metadata, source_kind, source "
                "FROM items WHERE collection_id = ? AND item_id = ?",
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
            with self._write_transaction() as conn:
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
                f"SELECT item_id, {catalog.bound_columns[0]}, metadata FROM items WHERE label IN ({marks})",
                part,
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

    # Spaces and re-embed jobs ----------------------------------------------------------------------

    def versions_in_use(self) -> dict[str, list[str]]:
        conn = self._reader()
        with _read_transaction(conn):
            catalog = [
                (c.name, c.binding, c.other)
                for c in map(_Catalog, conn.execute("SELECT * FROM collections ORDER BY name"))
            ]
            active = [
                (row[0], row[1], ModelBinding.of(row[2]))
                for row in conn.execute(
                    "SELECT j.id, c.name, j.target FROM jobs j JOIN collections c ON c.id = j.collection_id "
                    "WHERE j.state IN ('pending', 'running', 'waiting')"
                )
            ]
        return versions_in_use(catalog, active)

    def _job_row(self, conn: sqlite3.Connection, job_id: str) -> sqlite3.Row:
        row = conn.execute(_JOB_SELECT + "WHERE j.id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFoundError(f"no job {job_id!r}")
        return row

    def _fenced(
        self, conn: sqlite3.Connection, job_id: str, owner: str, states: Sequence[str]
    ) -> tuple[sqlite3.Row, _Catalog]:
        """The job, if it is still ours and in one of `states`, and its collection's catalog."""
        row = conn.execute(_JOB_SELECT + "WHERE j.id = ?", (job_id,)).fetchone()
        if row is None or row["owner"] != owner or row["state"] not in states:
            raise LeaseLostError(f"job {job_id} is no longer run by this replica")
        return row, self._catalog_by_id(conn, row["collection_id"])

    def _catalog_by_id(self, conn: sqlite3.Connection, collection_id: int) -> _Catalog:
        return _Catalog(conn.execute("SELECT * FROM collections WHERE id = ?", (collection_id,)).fetchone())

    @staticmethod
    def _target_space(row: sqlite3.Row, catalog: _Catalog) -> OtherSpace:
        """The other space, which must be this job's target."""
        if catalog.other is None or catalog.other.job != row["id"] or catalog.other.role != "target":
            raise LeaseLostError(f"collection {catalog.name!r} no longer holds job {row['id']}'s space")
        return catalog.other

    def get_job(self, job_id: str) -> JobRecord:
        return _job_record(self._job_row(self._reader(), job_id))

    def list_jobs(self, collection: str | None = None, limit: int = 100) -> list[JobRecord]:
        conn = self._reader()
        if collection is None:
            rows = conn.execute(_JOB_SELECT + "ORDER BY j.seq DESC LIMIT ?", (limit,))
        else:
            catalog = self._catalog(conn, collection)
            rows = conn.execute(
                _JOB_SELECT + "WHERE j.collection_id = ? ORDER BY j.seq DESC LIMIT ?", (catalog.id, limit)
            )
        return [_job_record(row) for row in rows]

    def job_errors(self, job_id: str, limit: int) -> list[ItemError]:
        conn = self._reader()
        seq = self._job_row(conn, job_id)["seq"]
        rows = conn.execute(
            "SELECT item_id, code, message FROM job_errors WHERE job_seq = ? ORDER BY item_id LIMIT ?",
            (seq, limit),
        )
        return [ItemError(*row) for row in rows]

    def create_job(
        self, name: str, target: ModelBinding, *, auto: bool, drop_unembeddable: bool
    ) -> JobRecord | None:
        with self._write_mutex, self._write_transaction() as conn:
            catalog = self._catalog(conn, name)
            if target.content_hash == catalog.binding.content_hash:
                if auto:
                    return None
                raise AlreadyCurrentError(already_current(name, catalog.binding))
            active = conn.execute(
                _JOB_SELECT + "WHERE j.collection_id = ? AND j.state IN ('pending', 'running', 'waiting')",
                (catalog.id,),
            ).fetchone()
            if active is not None and ModelBinding.of(active["target"]).content_hash == target.content_hash:
                if auto:
                    return None
                conn.execute(
                    "UPDATE jobs SET drop_unembeddable = max(drop_unembeddable, ?), errors = 0, "
                    "cursor = CASE state WHEN 'waiting' THEN '' ELSE cursor END, "
                    "state = CASE state WHEN 'waiting' THEN 'running' ELSE state END WHERE seq = ?",
                    (int(drop_unembeddable), active["seq"]),
                )
                conn.execute("DELETE FROM job_errors WHERE job_seq = ?", (active["seq"],))
                return _job_record(self._job_row(conn, active["id"]))
            if (
                auto
                and conn.execute(
                    "SELECT 1 FROM jobs WHERE collection_id = ? AND json_extract(target, '$.content_hash') = ?",
                    (catalog.id, target.content_hash),
                ).fetchone()
            ):
                return None
            job_id = new_job_id()
            if active is not None:
                conn.execute(
                    f"UPDATE jobs SET state = 'cancelled', owner = NULL, finished_at = {_NOW}, message = ? "
                    "WHERE seq = ?",
                    (superseded(job_id, target), active["seq"]),
                )
            self._end_other_space(conn, catalog, f"the previous space was given up: job {job_id} started")
            total = conn.execute(
                "SELECT count(*) FROM items WHERE collection_id = ?", (catalog.id,)
            ).fetchone()[0]
            conn.execute(
                "INSERT INTO jobs (id, collection_id, state, target, origin, auto, drop_unembeddable, total, "
                f"created_at) VALUES (?, ?, 'pending', ?, ?, ?, ?, ?, {_NOW})",
                (
                    job_id,
                    catalog.id,
                    target.json(),
                    catalog.binding.json(),
                    int(auto),
                    int(drop_unembeddable),
                    total,
                ),
            )
            return _job_record(self._job_row(conn, job_id))

    def _end_other_space(self, conn: sqlite3.Connection, catalog: _Catalog, message: str) -> None:
        """Inside a write transaction: the collection holds its bound space only from now on."""
        if catalog.other is None:
            return
        if catalog.other.role == "previous":
            conn.execute(
                f"UPDATE jobs SET state = 'completed', owner = NULL, finished_at = {_NOW}, message = ? "
                "WHERE id = ? AND state = 'switched'",
                (message, catalog.other.job),
            )
        conn.execute("UPDATE collections SET other = NULL WHERE id = ?", (catalog.id,))
        self._prepared.pop((catalog.id, catalog.other.tag), None)

    def cancel_job(self, job_id: str) -> JobRecord:
        with self._write_mutex, self._write_transaction() as conn:
            row = self._job_row(conn, job_id)
            if row["state"] == "switched":
                raise JobStateError(cannot_cancel_switched(_job_record(row)))
            if row["state"] in ACTIVE_STATES:
                conn.execute(
                    f"UPDATE jobs SET state = 'cancelled', owner = NULL, finished_at = {_NOW}, "
                    "message = 'cancelled' WHERE seq = ?",
                    (row["seq"],),
                )
                catalog = self._catalog_by_id(conn, row["collection_id"])
                if catalog.other is not None and catalog.other.job == job_id:
                    self._end_other_space(conn, catalog, "cancelled")
            return _job_record(self._job_row(conn, job_id))

    def claim_job(self, owner: str, lease_s: float) -> JobRecord | None:
        """The data dir belongs to this process alone, so a job of another owner is one of a process that
        died: taken at once, whatever its heartbeat says."""
        with self._write_mutex, self._write_transaction() as conn:
            row = conn.execute(
                "SELECT id FROM jobs WHERE (state IN ('pending', 'running', 'waiting') "
                f"OR (state = 'switched' AND keep_until <= {_NOW})) AND (owner IS NULL OR owner != ?) "
                "ORDER BY seq LIMIT 1",
                (owner,),
            ).fetchone()
            if row is None:
                return None
            conn.execute(
                f"UPDATE jobs SET owner = ?, heartbeat = {_NOW}, started_at = coalesce(started_at, {_NOW}), "
                "state = CASE state WHEN 'pending' THEN 'running' ELSE state END WHERE id = ?",
                (owner, row[0]),
            )
            return _job_record(self._job_row(conn, row[0]))

    def heartbeat_job(self, job_id: str, owner: str) -> JobRecord | None:
        with self._write_mutex, self._write_transaction() as conn:
            beat = conn.execute(
                f"UPDATE jobs SET heartbeat = {_NOW} WHERE id = ? AND owner = ? "
                "AND state IN ('running', 'waiting', 'switched')",
                (job_id, owner),
            )
            return _job_record(self._job_row(conn, job_id)) if beat.rowcount else None

    def release_job(self, job_id: str, owner: str) -> None:
        with self._write_mutex, self._write_transaction() as conn:
            conn.execute("UPDATE jobs SET owner = NULL WHERE id = ? AND owner = ?", (job_id, owner))

    def begin_space(self, job_id: str, owner: str) -> None:
        with self._write_mutex, self._write_transaction() as conn:
            row, catalog = self._fenced(conn, job_id, owner, ("running", "waiting"))
            if catalog.other is not None and catalog.other.job == job_id:
                return
            self._end_other_space(conn, catalog, f"the previous space was given up: job {job_id} started")
            # the job's number tags its vectors: whatever an earlier space left in the slot does not count
            space = OtherSpace(ModelBinding.of(row["target"]), "target", job_id, tag=row["seq"])
            conn.execute("UPDATE collections SET other = ? WHERE id = ?", (space.json(), catalog.id))

    def job_chunk(self, job_id: str, after: str, limit: int) -> list[ChunkItem]:
        conn = self._reader()
        with _read_transaction(conn):
            row = self._job_row(conn, job_id)
            catalog = self._catalog_by_id(conn, row["collection_id"])
            space = self._target_space(row, catalog)
            tag = catalog.other_columns[1]
            rows = conn.execute(
                f"SELECT label, item_id, source_kind, source FROM items i WHERE collection_id = ? AND label > ? "
                f"AND {tag} != ? AND source_kind IS NOT NULL AND NOT EXISTS "
                "(SELECT 1 FROM job_errors e WHERE e.job_seq = ? AND e.item_id = i.item_id) ORDER BY label LIMIT ?",
                (catalog.id, int(after or 0), space.tag, row["seq"], limit),
            ).fetchall()
        return [ChunkItem(str(r[0]), r[1], Source(r[2], r[3])) for r in rows]

    def write_job_chunk(
        self,
        job_id: str,
        owner: str,
        items: Sequence[ChunkItem],
        vectors: np.ndarray,
        errors: Sequence[ItemError],
        cursor: str,
        rate: float | None,
    ) -> None:
        with self._write_mutex, self._write_transaction() as conn:
            row, catalog = self._fenced(conn, job_id, owner, ("running", "waiting"))
            space = self._target_space(row, catalog)
            vector, tag = catalog.other_columns
            normalized = normalize_rows(vectors, space.binding.dim) if len(items) else vectors
            # an item replaced or re-sourced since it was read has a new label or source: left alone,
            # its write gave it its vector (or the next pass will)
            conn.executemany(
                f"UPDATE items SET {vector} = ?, {tag} = ? WHERE label = ? AND item_id = ? AND source_kind = ? "
                f"AND source = ? AND {tag} != ?",
                (
                    (
                        v.tobytes(),
                        space.tag,
                        int(item.key),
                        item.item_id,
                        item.source.kind,
                        item.source.value,
                        space.tag,
                    )
                    for item, v in zip(items, normalized, strict=True)
                ),
            )
            stored = conn.execute(
                "SELECT count(*) FROM job_errors WHERE job_seq = ?", (row["seq"],)
            ).fetchone()[0]
            conn.executemany(
                "INSERT OR REPLACE INTO job_errors (job_seq, item_id, code, message) VALUES (?, ?, ?, ?)",
                (
                    (row["seq"], e.item_id, e.code, e.message)
                    for e in errors[: max(0, MAX_STORED_ERRORS - stored)]
                ),
            )
            conn.execute(
                f"UPDATE jobs SET state = 'running', cursor = ?, done = done + ?, errors = errors + ?, rate = ?, "
                f"heartbeat = {_NOW} "
                "WHERE seq = ?",
                (cursor, len(items) + len(errors), len(errors), rate, row["seq"]),
            )

    def _blockers(
        self, conn: sqlite3.Connection, row: sqlite3.Row, catalog: _Catalog
    ) -> tuple[Blockers, int]:
        space = self._target_space(row, catalog)
        tag = catalog.other_columns[1]
        failed = "item_id IN (SELECT item_id FROM job_errors WHERE job_seq = :seq)"
        counts = conn.execute(
            f"SELECT count(*), coalesce(sum({tag} != :tag AND source_kind IS NOT NULL AND NOT {failed}), 0), "
            f"coalesce(sum({tag} != :tag AND source_kind IS NULL), 0), "
            f"coalesce(sum({tag} != :tag AND source_kind IS NOT NULL AND {failed}), 0) "
            "FROM items WHERE collection_id = :id",
            {"tag": space.tag, "seq": row["seq"], "id": catalog.id},
        ).fetchone()
        first = conn.execute(
            f"SELECT item_id FROM items WHERE collection_id = ? AND {tag} != ? AND source_kind IS NULL "
            "ORDER BY label LIMIT ?",
            (catalog.id, space.tag, FIRST_IDS),
        ).fetchall()
        return Blockers(counts[1], counts[2], counts[3], [r[0] for r in first]), counts[0]

    def job_blockers(self, job_id: str) -> tuple[Blockers, int]:
        conn = self._reader()
        with _read_transaction(conn):
            row = self._job_row(conn, job_id)
            return self._blockers(conn, row, self._catalog_by_id(conn, row["collection_id"]))

    def set_job_state(self, job_id: str, owner: str, state: JobState, blockers: Blockers, total: int) -> None:
        with self._write_mutex, self._write_transaction() as conn:
            row, _ = self._fenced(conn, job_id, owner, ("running", "waiting"))
            conn.execute(
                f"UPDATE jobs SET state = ?, unembeddable = ?, unembeddable_ids = ?, total = ?, done = ?, "
                f"heartbeat = {_NOW} WHERE seq = ?",
                (
                    state,
                    blockers.unembeddable,
                    json.dumps(blockers.first_ids),
                    total,
                    total - blockers.embeddable - blockers.blocking,
                    row["seq"],
                ),
            )

    def prepare_switch(self, job_id: str, threads: int | None = None) -> None:
        conn = self._reader()
        with _read_transaction(conn):
            row = self._job_row(conn, job_id)
            catalog = self._catalog_by_id(conn, row["collection_id"])
            space = self._target_space(row, catalog)
            labels, vectors = self._load_rows(
                conn, catalog.id, catalog.other_columns, space.tag, space.binding.dim
            )
        faiss.omp_set_num_threads(threads or self.build_threads)
        self._prepared[(catalog.id, space.tag)] = _LiveIndex.build(
            space.binding, catalog.params, labels, vectors
        )

    def _caught_up(self, catalog: _Catalog, slot: tuple[str, str], space: OtherSpace) -> _LiveIndex:
        """The index of `space` prepared before, brought up to the rows committed since (under the write
        mutex); built afresh when there is none, or when rows older than its newest were filled since."""
        key = (catalog.id, space.tag)
        live = self._prepared.pop(key, None)
        if live is None:
            return self._build(self._writer, catalog, slot, space.tag, space.binding)
        now = np.array(
            [
                r[0]
                for r in self._writer.execute(
                    f"SELECT label FROM items WHERE collection_id = ? AND {slot[1]} = ? ORDER BY label",
                    (catalog.id, space.tag),
                )
            ],
            dtype=np.int64,
        )
        added = np.setdiff1d(now, live.labels)
        if len(added) and len(live.labels) and added.min() < live.labels.max():
            return self._build(self._writer, catalog, slot, space.tag, space.binding)
        live.apply(np.setdiff1d(live.labels, now), added, self._vectors_of(added, slot[0], space.binding.dim))
        return live

    def switch(self, job_id: str, owner: str, grace_s: float) -> bool:
        with self._write_mutex:
            row = self._job_row(self._writer, job_id)
            catalog = self._catalog_by_id(self._writer, row["collection_id"])
            space = self._target_space(row, catalog)
            live = self._caught_up(catalog, catalog.other_columns, space)
            with self._write_transaction() as conn:
                row, catalog = self._fenced(conn, job_id, owner, ("running", "waiting"))
                blockers, _total = self._blockers(conn, row, catalog)
                if blockers.embeddable or (blockers.blocking and not row["drop_unembeddable"]):
                    self._prepared[(catalog.id, space.tag)] = live
                    return False
                dropped = self._drop_lacking(conn, catalog, catalog.other_columns[1], space.tag)
                previous = OtherSpace(catalog.binding, "previous", job_id, tag=catalog.bound_tag)
                target = space.binding
                conn.execute(
                    "UPDATE collections SET model = ?, version = ?, content_hash = ?, dim = ?, bound_slot = ?, "
                    "bound_tag = ?, other = ? WHERE id = ?",
                    (
                        target.model,
                        target.version,
                        target.content_hash,
                        target.dim,
                        1 - catalog.bound_slot,
                        space.tag,
                        previous.json(),
                        catalog.id,
                    ),
                )
                conn.execute(
                    f"UPDATE jobs SET state = 'switched', switched_at = {_NOW}, keep_until = {_NOW} + ?, "
                    "owner = NULL, done = total, unembeddable = 0, unembeddable_ids = '[]', message = ? WHERE seq = ?",
                    (grace_s, dropped_message(len(dropped)), row["seq"]),
                )
            self._install(catalog, live, dropped, space.tag)
            return True

    def _install(self, catalog: _Catalog, live: _LiveIndex, dropped: np.ndarray, tag: int) -> None:
        """After a switch or rollback committed: the new bound space's index serves, the old one goes."""
        if len(dropped):
            live.apply(dropped, np.zeros(0, dtype=np.int64), np.zeros((0, live.binding.dim), np.float32))
        key = (catalog.id, tag)
        self._live[key] = live
        self._forget_indexes(catalog.id, keep=key)
        self._snapshot_path(catalog.id).unlink(missing_ok=True)
        self._maintain(self._catalog_by_id(self._writer, catalog.id), live)

    def _drop_lacking(
        self, conn: sqlite3.Connection, catalog: _Catalog, tag_column: str, tag: int
    ) -> np.ndarray:
        """Delete the items with no vector of space `tag` (asked for with drop_unembeddable)."""
        rows = conn.execute(
            f"DELETE FROM items WHERE collection_id = ? AND {tag_column} != ? RETURNING label, source_kind, source",
            (catalog.id, tag),
        ).fetchall()
        if rows:
            self._count_images(conn, catalog, ImageRefs(), released_images([(r[1], r[2]) for r in rows]))
        return np.array([r[0] for r in rows], dtype=np.int64)

    def finish_job(self, job_id: str, owner: str) -> None:
        with self._write_mutex, self._write_transaction() as conn:
            row, catalog = self._fenced(conn, job_id, owner, ("switched",))
            if catalog.other is not None and catalog.other.job == job_id and catalog.other.role == "previous":
                conn.execute("UPDATE collections SET other = NULL WHERE id = ?", (catalog.id,))
            conn.execute(
                f"UPDATE jobs SET state = 'completed', owner = NULL, finished_at = {_NOW} WHERE seq = ?",
                (row["seq"],),
            )

    def fail_job(self, job_id: str, owner: str, message: str) -> None:
        with self._write_mutex, self._write_transaction() as conn:
            row, catalog = self._fenced(conn, job_id, owner, ACTIVE_STATES)
            conn.execute(
                f"UPDATE jobs SET state = 'failed', owner = NULL, finished_at = {_NOW}, message = ? WHERE seq = ?",
                (message, row["seq"]),
            )
            if catalog.other is not None and catalog.other.job == job_id:
                self._end_other_space(conn, catalog, message)

    def rollback(self, name: str, drop_unembeddable: bool) -> JobRecord:
        with self._write_mutex:
            catalog = self._catalog(self._writer, name)
            previous = catalog.other
            if previous is None or previous.role != "previous":
                raise JobStateError(nothing_to_roll_back(name))
            slot = catalog.other_columns
            live = self._build(self._writer, catalog, slot, previous.tag, previous.binding)
            with self._write_transaction() as conn:
                lacking = conn.execute(
                    f"SELECT item_id FROM items WHERE collection_id = ? AND {slot[1]} != ? ORDER BY label",
                    (catalog.id, previous.tag),
                ).fetchall()
                if lacking and not drop_unembeddable:
                    raise JobStateError(rollback_blocked(name, previous.binding, [r[0] for r in lacking]))
                dropped = self._drop_lacking(conn, catalog, slot[1], previous.tag)
                target = previous.binding
                conn.execute(
                    "UPDATE collections SET model = ?, version = ?, content_hash = ?, dim = ?, bound_slot = ?, "
                    "bound_tag = ?, other = NULL WHERE id = ?",
                    (
                        target.model,
                        target.version,
                        target.content_hash,
                        target.dim,
                        1 - catalog.bound_slot,
                        previous.tag,
                        catalog.id,
                    ),
                )
                conn.execute(
                    f"UPDATE jobs SET state = 'rolled_back', owner = NULL, finished_at = {_NOW}, message = ? "
                    "WHERE id = ?",
                    (rolled_back(target, len(dropped)), previous.job),
                )
                record = _job_record(self._job_row(conn, previous.job))
            self._install(catalog, live, dropped, previous.tag)
            return record

    def _forget_item_errors(self, conn: sqlite3.Connection, catalog: _Catalog, ids: Sequence[str]) -> None:
        """Items written again are tried again by the collection's running job."""
        if catalog.other is None or catalog.other.role != "target":
            return
        for chunk in batches(len(ids), _SQLITE_VARIABLES):
            part = ids[chunk]
            conn.execute(
                f"DELETE FROM job_errors WHERE job_seq = ? AND item_id IN ({','.join('?' * len(part))})",
                (catalog.other.tag, *part),
            )

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
def _committed(conn: sqlite3.Connection) -> Iterator[None]:
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
