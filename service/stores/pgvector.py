"""The PostgreSQL + pgvector backend: every API replica shares the same collections.

Schema (created on first use, in the DSN's first search_path schema):
    clipserve_collections        the catalog: name, model binding, index parameters, refresh policy,
                                 which vector column is bound and what the other one holds
    clipserve_items_<id>         one table per collection: item_id, embedding vector(dim), metadata
                                 JSONB (GIN index for filters), source kind and value; while the
                                 collection moves to another space, embedding_b vector(dim') too
    clipserve_images             inline images' bytes, by collection and sha256, with the number of
                                 items using each (freed at zero)
    clipserve_jobs, clipserve_job_errors    re-embed jobs (clipserve.service.stores.jobs)

Two spaces at once: the catalog's `bound_slot` says which vector column (`embedding` or
`embedding_b`) holds the bound space; the other column, added when a job starts (DROP and ADD
COLUMN: instant, and it empties it), holds the job's target, then the previous space for a rollback.
A switch rewrites one catalog row; every search reads the catalog in its own snapshot, so every
replica moves at once. The target's ANN index is built (CONCURRENTLY) before the switch.

Writes are committed transactions, so an acknowledged write survives a crash of the API and of
PostgreSQL itself. The ANN index (HNSW or IVFFlat, on inner product) is built with CREATE INDEX once
the collection holds enough rows (IVFFlat needs data for its centroids); before that, and for "flat"
collections, searches scan exactly. PostgreSQL's MVCC keeps readers working during writes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import psycopg
from pgvector.psycopg import register_vector
from psycopg import sql

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
from .postgres import ConnectionPool


def unavailable(detail: str) -> BackendUnavailableError:
    return BackendUnavailableError(f"collections are unavailable: {detail}; retry shortly")


_SCHEMA_LOCK_KEY = 0x636C6970  # any constant shared by every replica
_CATALOG = """
CREATE TABLE IF NOT EXISTS clipserve_collections (
    id BIGSERIAL PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    model TEXT NOT NULL,
    version INTEGER NOT NULL,
    content_hash TEXT NOT NULL,
    dim INTEGER NOT NULL,
    index_params JSONB NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
)
"""
# Catalog columns added after the first release: added in place to a database made before them.
_CATALOG_ADDED = """
ALTER TABLE clipserve_collections ADD COLUMN IF NOT EXISTS policy TEXT NOT NULL DEFAULT 'reembed';
ALTER TABLE clipserve_collections ADD COLUMN IF NOT EXISTS bound_slot SMALLINT NOT NULL DEFAULT 0;
ALTER TABLE clipserve_collections ADD COLUMN IF NOT EXISTS other JSONB
"""
_JOBS = """
CREATE TABLE IF NOT EXISTS clipserve_jobs (
    seq BIGSERIAL PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    collection_id BIGINT NOT NULL REFERENCES clipserve_collections(id) ON DELETE CASCADE,
    state TEXT NOT NULL,
    target JSONB NOT NULL,
    origin JSONB NOT NULL,
    auto BOOLEAN NOT NULL,
    drop_unembeddable BOOLEAN NOT NULL,
    cursor TEXT NOT NULL DEFAULT '',
    done BIGINT NOT NULL DEFAULT 0,
    total BIGINT NOT NULL DEFAULT 0,
    errors BIGINT NOT NULL DEFAULT 0,
    unembeddable BIGINT NOT NULL DEFAULT 0,
    unembeddable_ids JSONB NOT NULL DEFAULT '[]',
    rate DOUBLE PRECISION,
    owner TEXT,
    heartbeat TIMESTAMPTZ,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    started_at TIMESTAMPTZ,
    switched_at TIMESTAMPTZ,
    finished_at TIMESTAMPTZ,
    keep_until TIMESTAMPTZ,
    message TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS clipserve_jobs_one_active ON clipserve_jobs (collection_id)
    WHERE state IN ('pending', 'running', 'waiting');
CREATE TABLE IF NOT EXISTS clipserve_job_errors (
    job_seq BIGINT NOT NULL REFERENCES clipserve_jobs(seq) ON DELETE CASCADE,
    item_id TEXT NOT NULL,
    code TEXT NOT NULL,
    message TEXT NOT NULL,
    PRIMARY KEY (job_seq, item_id)
)
"""
_JOB_SELECT = (
    "SELECT j.seq, j.id, c.name, j.state, j.target, j.origin, j.auto, j.drop_unembeddable, j.cursor, "
    "j.done, j.total, j.errors, j.unembeddable, j.unembeddable_ids, j.rate, j.owner, "
    "extract(epoch FROM now() - j.heartbeat)::float8, j.created_at, j.started_at, j.switched_at, "
    "j.finished_at, j.keep_until, j.message, j.collection_id "
    "FROM clipserve_jobs j JOIN clipserve_collections c ON c.id = j.collection_id "
)
_CATALOG_COLUMNS = (
    "id, name, model, version, content_hash, dim, index_params, created_at, policy, bound_slot, other"
)
_SLOT_COLUMNS = ("embedding", "embedding_b")
_DDL_LOCK_TIMEOUT = "5s"  # a column added or dropped waits this long for searches in flight, then retries
_IMAGES = """
CREATE TABLE IF NOT EXISTS clipserve_images (
    collection_id BIGINT NOT NULL REFERENCES clipserve_collections(id) ON DELETE CASCADE,
    digest TEXT NOT NULL,
    data BYTEA NOT NULL,
    size INTEGER NOT NULL,
    refs INTEGER NOT NULL,
    PRIMARY KEY (collection_id, digest)
)
"""
_HNSW_MIN_ITEMS = 1000
_REINDEX_RATIO = 8
_MAX_INLINE_DIM = 1500  # 4 bytes a dimension, and a row must fit in an 8 KB page
_STAGING_COLUMNS = ["text", "vector", "vector", "text", "text", "text"]


def _iso(value: Any) -> str | None:
    return None if value is None else value.isoformat(timespec="seconds")


def _job_record(row: tuple[Any, ...]) -> JobRecord:
    (seq, job_id, name, state, target, origin, auto, drop, cursor, done, total, errors, unembeddable, ids, rate,
     owner, age, created, started, switched, finished, keep_until, message, _collection) = row  # fmt: skip
    return JobRecord(
        id=job_id,
        collection=name,
        state=state,
        target=ModelBinding.of(target),
        origin=ModelBinding.of(origin),
        auto=auto,
        drop_unembeddable=drop,
        done=done,
        total=total,
        errors=errors,
        unembeddable=unembeddable,
        unembeddable_ids=list(ids),
        rate=rate,
        owner=owner,
        heartbeat_age_s=age,
        created_at=_iso(created) or "",
        started_at=_iso(started),
        switched_at=_iso(switched),
        finished_at=_iso(finished),
        keep_until=_iso(keep_until),
        message=message,
        cursor=cursor,
        seq=seq,
    )


class _Catalog:
    def __init__(self, row: tuple[Any, ...]):
        self.id, self.name, model, version, content_hash, dim, params, created_at, policy, slot, other = row
        self.binding = ModelBinding(model, version, content_hash, dim)
        self.params = IndexParams.model_validate(params)
        self.created_at: str = created_at.isoformat(timespec="seconds")
        self.policy: RefreshPolicy = policy
        self.bound_slot: int = slot
        self.other = OtherSpace.of(other)
        self.table = sql.Identifier(f"clipserve_items_{self.id}")
        self.index_name = self._index_name(slot)
        self.other_index_name = self._index_name(1 - slot)
        self.column = sql.Identifier(_SLOT_COLUMNS[slot])
        self.other_column = sql.Identifier(_SLOT_COLUMNS[1 - slot])

    def _index_name(self, slot: int) -> str:
        return f"clipserve_items_{self.id}_ann" + ("_b" if slot else "")

    @property
    def spaces(self) -> CollectionSpaces:
        return CollectionSpaces(self.binding, self.other, self.policy)

    @property
    def state(self) -> tuple:
        """What a write depends on: both spaces and where they live."""
        return (self.id, self.binding, self.bound_slot, self.other)

    @property
    def index_threshold(self) -> int | None:
        """Rows needed before the ANN index is built; None for exact collections."""
        if self.params.kind == "hnsw":
            return _HNSW_MIN_ITEMS
        if self.params.kind == "ivf":
            return self.params.ivf_train_size
        return None


class PgVectorStore:
    """Collections in PostgreSQL with pgvector, configured by a DSN."""

    def __init__(
        self,
        dsn: str,
        *,
        batch_size: int = 5000,
        pool_size: int = 8,
        maintenance_work_mem: str = "512MB",
        reindex_min_rows: int = 5000,
        max_image_bytes: int | None = None,
    ):
        """`reindex_min_rows`: an upsert of at least this many rows into an HNSW collection at most
        `_REINDEX_RATIO` times its size drops the index and builds it again after the write, because
        pgvector inserts rows into an HNSW graph one by one about 12x slower than CREATE INDEX builds it
        (measured here: 110 vs 1,300 rows/s at 512-d); searches scan exactly meanwhile.
        `max_image_bytes`: inline images' bytes kept per collection (None: no limit)."""
        self.batch_size = batch_size
        self.max_image_bytes = max_image_bytes
        self.maintenance_work_mem = maintenance_work_mem
        self.reindex_min_rows = reindex_min_rows
        self._pool = ConnectionPool(dsn, pool_size, unavailable, configure=register_vector)
        self._create_schema()

    def _create_schema(self) -> None:
        with self._pool.open() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_KEY,))
            try:
                conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            except psycopg.Error as exc:
                raise unavailable(
                    "cannot enable pgvector in this PostgreSQL: it needs the extension installed (e.g. the "
                    f"pgvector/pgvector image) and CREATE EXTENSION vector run once by an owner: {exc}"
                ) from exc
            conn.execute(_CATALOG)
            conn.execute(_CATALOG_ADDED)
            conn.execute(_IMAGES)
            conn.execute(_JOBS)

    def _catalog(self, conn: psycopg.Connection, name: str, lock: str = "") -> _Catalog:
        validate_collection_name(name)
        row = conn.execute(
            f"SELECT {_CATALOG_COLUMNS} FROM clipserve_collections WHERE name = %s {lock}", (name,)
        ).fetchone()
        if row is None:
            raise CollectionNotFoundError(f"no collection named {name!r}")
        return _Catalog(row)

    def _catalog_by_id(self, conn: psycopg.Connection, collection_id: int, lock: str = "") -> _Catalog:
        row = conn.execute(
            f"SELECT {_CATALOG_COLUMNS} FROM clipserve_collections WHERE id = %s {lock}", (collection_id,)
        ).fetchone()
        return _Catalog(row)

    def _count(self, conn: psycopg.Connection, catalog: _Catalog) -> int:
        return conn.execute(sql.SQL("SELECT count(*) FROM {}").format(catalog.table)).fetchone()[0]

    def _info(self, conn: psycopg.Connection, catalog: _Catalog) -> CollectionInfo:
        return CollectionInfo(
            catalog.name,
            catalog.binding,
            catalog.params,
            self._count(conn, catalog),
            catalog.created_at,
            catalog.other,
            catalog.policy,
        )

    # collections

    def create_collection(
        self, name: str, binding: ModelBinding, index: IndexParams, policy: RefreshPolicy = "reembed"
    ) -> CollectionInfo:
        validate_collection_name(name)
        try:
            with self._pool.transaction() as conn:
                row = conn.execute(
                    "INSERT INTO clipserve_collections (name, model, version, content_hash, dim, index_params, "
                    f"policy) VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING {_CATALOG_COLUMNS}",
                    (
                        name,
                        binding.model,
                        binding.version,
                        binding.content_hash,
                        binding.dim,
                        psycopg.types.json.Jsonb(index.model_dump()),
                        policy,
                    ),
                ).fetchone()
                catalog = _Catalog(row)
                self._create_items_table(conn, catalog.table, binding.dim)
        except psycopg.errors.UniqueViolation as exc:
            raise CollectionExistsError(f"collection {name!r} already exists") from exc
        return CollectionInfo(name, binding, index, 0, catalog.created_at, policy=policy)

    @staticmethod
    def _create_items_table(conn: psycopg.Connection, table: sql.Identifier, dim: int) -> None:
        conn.execute(
            sql.SQL(
                "CREATE TABLE {} (item_id TEXT PRIMARY KEY, embedding vector({}) NOT NULL, "
                "metadata JSONB NOT NULL, source_kind TEXT, source TEXT)"
            ).format(table, sql.Literal(dim))
        )
        _keep_vectors_inline(conn, table, sql.Identifier(_SLOT_COLUMNS[0]), dim)
        conn.execute(sql.SQL("CREATE INDEX ON {} USING gin (metadata jsonb_path_ops)").format(table))

    def drop_collection(self, name: str) -> None:
        with self._pool.transaction() as conn:
            catalog = self._catalog(conn, name, lock="FOR UPDATE")
            conn.execute(sql.SQL("DROP TABLE {}").format(catalog.table))
            conn.execute("DELETE FROM clipserve_collections WHERE id = %s", (catalog.id,))

    def list_collections(self) -> list[CollectionInfo]:
        with self._pool.transaction() as conn:
            rows = conn.execute(
                f"SELECT {_CATALOG_COLUMNS} FROM clipserve_collections ORDER BY name"
            ).fetchall()
            return [self._info(conn, _Catalog(row)) for row in rows]

    def describe(self, name: str) -> CollectionInfo:
        with self._pool.transaction() as conn:
            return self._info(conn, self._catalog(conn, name))

    def binding(self, name: str) -> ModelBinding:
        with self._pool.transaction() as conn:
            return self._catalog(conn, name).binding

    def spaces(self, name: str) -> CollectionSpaces:
        with self._pool.transaction() as conn:
            return self._catalog(conn, name).spaces

    def all_spaces(self) -> dict[str, CollectionSpaces]:
        with self._pool.transaction() as conn:
            rows = conn.execute(
                f"SELECT {_CATALOG_COLUMNS} FROM clipserve_collections ORDER BY name"
            ).fetchall()
        return {catalog.name: catalog.spaces for catalog in map(_Catalog, rows)}

    def count(self, name: str) -> int:
        return self.describe(name).count

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
        with self._pool.transaction() as conn:
            catalog = self._catalog(conn, name)
        bound, other = vectors_by_space(name, catalog.spaces, content_hash, vectors, also)
        other_dim = catalog.other.binding.dim if catalog.other is not None else 0
        prepared = prepare_upsert(ids, bound, catalog.binding.dim, metadata, sources, other, other_dim)
        encoded = [encode_metadata(entry, position) for position, entry in enumerate(prepared.metadata)]
        self._drop_hnsw_before_bulk(catalog, len(prepared.ids))
        for chunk in batches(len(prepared.ids), self.batch_size):
            self._write_batch(catalog, prepared.part(chunk), encoded[chunk])
            if progress is not None:
                progress(chunk.stop, len(prepared.ids))
        self._ensure_ann_index(catalog)
        return len(prepared.ids)

    def _write_batch(self, catalog: _Catalog, batch: PreparedUpsert, metadata: list[str]) -> None:
        ids, sources = batch.ids, batch.sources
        with self._pool.transaction() as conn:
            current = self._catalog(conn, catalog.name, lock="FOR SHARE")
            if current.id != catalog.id:
                raise CollectionNotFoundError(f"collection {catalog.name!r} was dropped during the write")
            if current.state != catalog.state:
                raise ModelMismatchError(f"collection {catalog.name!r} changed spaces during the write")
            added = ImageRefs.of(sources)
            released: dict[str, int] = {}
            if added.uses or catalog.other is not None or self._may_hold_images(conn, catalog):
                # the rows replaced, locked until the commit in id order (as a re-embed job locks them),
                # so that each image reference is released once
                released = released_images(
                    conn.execute(
                        sql.SQL(
                            "SELECT source_kind, source FROM {} WHERE item_id = ANY(%s) ORDER BY item_id FOR UPDATE"
                        ).format(catalog.table),
                        (ids,),
                    ).fetchall()
                )
            two = catalog.other is not None
            conn.execute(
                sql.SQL(
                    "CREATE TEMP TABLE clipserve_staging (item_id TEXT, embedding vector({}), other vector({}), "
                    "metadata TEXT, source_kind TEXT, source TEXT) ON COMMIT DROP"
                ).format(sql.Literal(catalog.binding.dim), sql.Literal(max(1, batch.other_vectors.shape[1])))
            )
            with conn.cursor().copy("COPY clipserve_staging FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(_STAGING_COLUMNS)
                for item_id, vector, other, present, meta, source in zip(
                    ids,
                    batch.vectors,
                    batch.other_vectors,
                    batch.other_present,
                    metadata,
                    sources,
                    strict=True,
                ):
                    copy.write_row(
                        (
                            item_id,
                            vector,
                            other if present else None,
                            meta,
                            source.kind if source else None,
                            source.value if source else None,
                        )
                    )
            # the other space's column is written only while the collection holds one (given or empty)
            other_column = sql.SQL(", {}").format(catalog.other_column) if two else sql.SQL("")
            other_value = sql.SQL(", other") if two else sql.SQL("")
            other_update = sql.SQL(", {} = excluded.{}").format(catalog.other_column, catalog.other_column)
            conn.execute(
                sql.SQL(
                    "INSERT INTO {table} (item_id, {column}{other_column}, metadata, source_kind, source) "
                    "SELECT item_id, embedding{other_value}, metadata::jsonb, source_kind, source "
                    "FROM clipserve_staging ORDER BY item_id "
                    "ON CONFLICT (item_id) DO UPDATE SET {column} = excluded.{column}{other_update}, "
                    "metadata = excluded.metadata, source_kind = excluded.source_kind, source = excluded.source"
                ).format(
                    table=catalog.table,
                    column=catalog.column,
                    other_column=other_column,
                    other_value=other_value,
                    other_update=other_update if two else sql.SQL(""),
                )
            )
            self._count_images(conn, catalog, added, released)
            self._forget_item_errors(conn, catalog, ids)

    @staticmethod
    def _may_hold_images(conn: psycopg.Connection, catalog: _Catalog) -> bool:
        query = "SELECT EXISTS (SELECT 1 FROM clipserve_images WHERE collection_id = %s)"
        return bool(conn.execute(query, (catalog.id,)).fetchone()[0])

    def _count_images(
        self, conn: psycopg.Connection, catalog: _Catalog, added: ImageRefs, released: dict[str, int]
    ) -> None:
        """Inside a write's transaction: keep the bytes of new inline images, count the items using
        each, free those no item uses any more, and hold the collection to `max_image_bytes`."""
        change = dict(added.uses)
        for digest, count in released.items():
            change[digest] = change.get(digest, 0) - count
        if not change:
            return
        with conn.cursor() as cursor:
            # in digest order, so two writers lock the rows they share in the same order
            cursor.executemany(
                "INSERT INTO clipserve_images (collection_id, digest, data, size, refs) "
                "VALUES (%s, %s, %s, %s, %s) "
                "ON CONFLICT (collection_id, digest) DO UPDATE SET refs = clipserve_images.refs + excluded.refs",
                [
                    (catalog.id, digest, added.data[digest], len(added.data[digest]), change[digest])
                    for digest in sorted(added.data)
                ],
            )
            cursor.executemany(
                "UPDATE clipserve_images SET refs = refs + %s WHERE collection_id = %s AND digest = %s",
                [
                    (change[digest], catalog.id, digest)
                    for digest in sorted(change)
                    if digest not in added.data and change[digest]
                ],
            )
        if released:
            conn.execute(
                "DELETE FROM clipserve_images WHERE collection_id = %s AND digest = ANY(%s) AND refs <= 0",
                (catalog.id, sorted(released)),
            )
        if added.data:
            total = conn.execute(
                "SELECT coalesce(sum(size), 0) FROM clipserve_images WHERE collection_id = %s", (catalog.id,)
            ).fetchone()[0]
            check_image_bytes(catalog.name, int(total), self.max_image_bytes)

    def images(self, name: str, digests: Sequence[str]) -> dict[str, bytes]:
        with self._pool.transaction() as conn:
            catalog = self._catalog(conn, name)
            rows = conn.execute(
                "SELECT digest, data FROM clipserve_images WHERE collection_id = %s AND digest = ANY(%s)",
                (catalog.id, list(dict.fromkeys(digests))),
            ).fetchall()
        return {digest: bytes(data) for digest, data in rows}

    def _drop_hnsw_before_bulk(self, catalog: _Catalog, new_rows: int) -> None:
        if catalog.params.kind != "hnsw" or new_rows < self.reindex_min_rows:
            return
        with self._pool.transaction() as conn:
            if conn.execute("SELECT to_regclass(%s)", (catalog.index_name,)).fetchone()[0] is None:
                return
            if self._count(conn, catalog) > _REINDEX_RATIO * new_rows:
                return
            conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(catalog.index_name)))

    def _ensure_ann_index(self, catalog: _Catalog) -> None:
        """Build the HNSW/IVFFlat index once there are enough rows; one replica builds, readers go on."""
        threshold = catalog.index_threshold
        if threshold is None:
            return
        with self._pool.transaction() as conn:
            if conn.execute("SELECT to_regclass(%s)", (catalog.index_name,)).fetchone()[0] is not None:
                return
            if self._count(conn, catalog) < threshold:
                return
            if not conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (catalog.id,)).fetchone()[0]:
                return
            conn.execute("SELECT set_config('maintenance_work_mem', %s, true)", (self.maintenance_work_mem,))
            method, options = _index_method(catalog.params)
            conn.execute(
                sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} USING {} ({} vector_ip_ops) WITH ({})").format(
                    sql.Identifier(catalog.index_name),
                    catalog.table,
                    sql.SQL(method),
                    catalog.column,
                    options,
                )
            )

    def get(self, name: str, item_id: str) -> StoredItem:
        validate_item_id(item_id)
        with self._pool.transaction() as conn:
            catalog = self._catalog(conn, name)
            row = conn.execute(
                sql.SQL(
                    "SELECT item_id, {}, metadata, source_kind, source FROM {} WHERE item_id = %s"
                ).format(catalog.column, catalog.table),
                (item_id,),
            ).fetchone()
        if row is None:
            raise ItemNotFoundError(f"collection {name!r} has no item {item_id!r}")
        source = Source(row[3], row[4]) if row[3] else None
        return StoredItem(row[0], row[1].to_numpy().astype(np.float32), row[2], source)

    def delete(self, name: str, item_id: str) -> None:
        validate_item_id(item_id)
        with self._pool.transaction() as conn:
            catalog = self._catalog(conn, name)
            deleted = conn.execute(
                sql.SQL("DELETE FROM {} WHERE item_id = %s RETURNING source_kind, source").format(
                    catalog.table
                ),
                (item_id,),
            ).fetchone()
            if deleted is None:
                raise ItemNotFoundError(f"collection {name!r} has no item {item_id!r}")
            self._count_images(conn, catalog, ImageRefs(), released_images([deleted]))

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
        with self._pool.transaction() as conn:
            # one snapshot: the binding checked is the one of the rows searched (no re-bind in between)
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            catalog = self._catalog(conn, name)
            check_binding(name, catalog.binding, content_hash)
            vector = normalize_rows(query, catalog.binding.dim, what="query vector")[0]
            self._set_search_options(conn, catalog.params, top_k, filtered=bool(conditions))
            where = sql.SQL("WHERE metadata @> %s::jsonb") if conditions else sql.SQL("")
            params: list[Any] = [vector]
            if conditions:
                params.append(json.dumps(conditions))
            rows = conn.execute(
                sql.SQL(
                    "SELECT item_id, metadata, {} <#> %s AS distance FROM {} {} ORDER BY distance LIMIT %s"
                ).format(catalog.column, catalog.table, where),
                (*params, top_k),
            ).fetchall()
        hits = [SearchHit(row[0], -float(row[2]), row[1]) for row in rows]
        # relaxed iterative scans may return rows slightly out of order
        return sorted(hits, key=lambda hit: -hit.score)

    @staticmethod
    def _set_search_options(
        conn: psycopg.Connection, params: IndexParams, top_k: int, filtered: bool
    ) -> None:
        options = {
            "hnsw.ef_search": str(min(1000, max(params.ef_search, top_k))),
            "ivfflat.probes": str(params.nprobe),
        }
        if filtered:
            # keep scanning the index until enough rows pass the filter (pgvector >= 0.8)
            options["hnsw.iterative_scan"] = "strict_order"
            options["ivfflat.iterative_scan"] = "relaxed_order"
        for key, value in options.items():
            conn.execute("SELECT set_config(%s, %s, true)", (key, value))

    # Spaces and re-embed jobs ----------------------------------------------------------------------
    # Locks are taken job row first, then the catalog row, then item rows in id order, everywhere.

    def versions_in_use(self) -> dict[str, list[str]]:
        with self._pool.transaction() as conn:
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            rows = conn.execute(
                f"SELECT {_CATALOG_COLUMNS} FROM clipserve_collections ORDER BY name"
            ).fetchall()
            active = conn.execute(
                "SELECT j.id, c.name, j.target FROM clipserve_jobs j JOIN clipserve_collections c "
                "ON c.id = j.collection_id WHERE j.state IN ('pending', 'running', 'waiting')"
            ).fetchall()
        catalog = [(c.name, c.binding, c.other) for c in map(_Catalog, rows)]
        return versions_in_use(catalog, [(r[0], r[1], ModelBinding.of(r[2])) for r in active])

    @staticmethod
    def _job_row(conn: psycopg.Connection, job_id: str, lock: str = "") -> tuple[Any, ...]:
        row = conn.execute(_JOB_SELECT + f"WHERE j.id = %s {lock}", (job_id,)).fetchone()
        if row is None:
            raise JobNotFoundError(f"no job {job_id!r}")
        return row

    def _fenced(
        self, conn: psycopg.Connection, job_id: str, owner: str, states: Sequence[str]
    ) -> tuple[JobRecord, _Catalog]:
        """The job, locked, if it is still ours and in one of `states`, and its collection's catalog."""
        row = conn.execute(_JOB_SELECT + "WHERE j.id = %s FOR UPDATE OF j", (job_id,)).fetchone()
        if row is None or row[15] != owner or row[3] not in states:
            raise LeaseLostError(f"job {job_id} is no longer run by this replica")
        return _job_record(row), self._catalog_by_id(conn, row[-1], lock="FOR UPDATE")

    @staticmethod
    def _target_space(job: JobRecord, catalog: _Catalog) -> OtherSpace:
        if catalog.other is None or catalog.other.job != job.id or catalog.other.role != "target":
            raise LeaseLostError(f"collection {catalog.name!r} no longer holds job {job.id}'s space")
        return catalog.other

    def get_job(self, job_id: str) -> JobRecord:
        with self._pool.transaction() as conn:
            return _job_record(self._job_row(conn, job_id))

    def list_jobs(self, collection: str | None = None, limit: int = 100) -> list[JobRecord]:
        with self._pool.transaction() as conn:
            if collection is None:
                rows = conn.execute(_JOB_SELECT + "ORDER BY j.seq DESC LIMIT %s", (limit,)).fetchall()
            else:
                catalog = self._catalog(conn, collection)
                rows = conn.execute(
                    _JOB_SELECT + "WHERE j.collection_id = %s ORDER BY j.seq DESC LIMIT %s",
                    (catalog.id, limit),
                ).fetchall()
        return [_job_record(row) for row in rows]

    def job_errors(self, job_id: str, limit: int) -> list[ItemError]:
        with self._pool.transaction() as conn:
            seq = self._job_row(conn, job_id)[0]
            rows = conn.execute(
                "SELECT item_id, code, message FROM clipserve_job_errors WHERE job_seq = %s ORDER BY item_id LIMIT %s",
                (seq, limit),
            ).fetchall()
        return [ItemError(*row) for row in rows]

    def create_job(
        self, name: str, target: ModelBinding, *, auto: bool, drop_unembeddable: bool
    ) -> JobRecord | None:
        with self._pool.transaction() as conn:
            collection_id = self._catalog(conn, name).id
            active = conn.execute(
                _JOB_SELECT + "WHERE j.collection_id = %s AND j.state IN ('pending', 'running', 'waiting') "
                "FOR UPDATE OF j",
                (collection_id,),
            ).fetchone()
            catalog = self._catalog(conn, name, lock="FOR UPDATE")
            if target.content_hash == catalog.binding.content_hash:
                if auto:
                    return None
                raise AlreadyCurrentError(already_current(name, catalog.binding))
            current = _job_record(active) if active is not None else None
            if current is not None and current.target.content_hash == target.content_hash:
                if auto:
                    return None
                conn.execute(
                    "UPDATE clipserve_jobs SET drop_unembeddable = drop_unembeddable OR %s, errors = 0, "
                    "cursor = CASE state WHEN 'waiting' THEN '' ELSE cursor END, "
                    "state = CASE state WHEN 'waiting' THEN 'running' ELSE state END WHERE seq = %s",
                    (drop_unembeddable, current.seq),
                )
                conn.execute("DELETE FROM clipserve_job_errors WHERE job_seq = %s", (current.seq,))
                return _job_record(self._job_row(conn, current.id))
            if (
                auto
                and conn.execute(
                    "SELECT 1 FROM clipserve_jobs WHERE collection_id = %s AND target->>'content_hash' = %s",
                    (catalog.id, target.content_hash),
                ).fetchone()
            ):
                return None
            job_id = new_job_id()
            if current is not None:
                conn.execute(
                    "UPDATE clipserve_jobs SET state = 'cancelled', owner = NULL, finished_at = now(), "
                    "message = %s WHERE seq = %s",
                    (superseded(job_id, target), current.seq),
                )
            self._end_other_space(conn, catalog, f"the previous space was given up: job {job_id} started")
            conn.execute(
                "INSERT INTO clipserve_jobs (id, collection_id, state, target, origin, auto, drop_unembeddable, "
                "total) VALUES (%s, %s, 'pending', %s, %s, %s, %s, %s)",
                (
                    job_id,
                    catalog.id,
                    target.json(),
                    catalog.binding.json(),
                    auto,
                    drop_unembeddable,
                    self._count(conn, catalog),
                ),
            )
            return _job_record(self._job_row(conn, job_id))

    @staticmethod
    def _end_other_space(conn: psycopg.Connection, catalog: _Catalog, message: str) -> None:
        """Inside a transaction holding the catalog row: the collection holds its bound space only. The
        column stays until the next job replaces it (dropping it here would wait for every search)."""
        if catalog.other is None:
            return
        if catalog.other.role == "previous":
            conn.execute(
                "UPDATE clipserve_jobs SET state = 'completed', owner = NULL, finished_at = now(), message = %s "
                "WHERE id = %s AND state = 'switched'",
                (message, catalog.other.job),
            )
        conn.execute("UPDATE clipserve_collections SET other = NULL WHERE id = %s", (catalog.id,))

    def cancel_job(self, job_id: str) -> JobRecord:
        with self._pool.transaction() as conn:
            job = _job_record(self._job_row(conn, job_id, lock="FOR UPDATE OF j"))
            if job.state == "switched":
                raise JobStateError(cannot_cancel_switched(job))
            if job.active:
                conn.execute(
                    "UPDATE clipserve_jobs SET state = 'cancelled', owner = NULL, finished_at = now(), "
                    "message = 'cancelled' WHERE seq = %s",
                    (job.seq,),
                )
                catalog = self._catalog(conn, job.collection, lock="FOR UPDATE")
                if catalog.other is not None and catalog.other.job == job_id:
                    self._end_other_space(conn, catalog, "cancelled")
            return _job_record(self._job_row(conn, job_id))

    def claim_job(self, owner: str, lease_s: float) -> JobRecord | None:
        with self._pool.transaction() as conn:
            row = conn.execute(
                "UPDATE clipserve_jobs SET owner = %s, heartbeat = now(), started_at = coalesce(started_at, now()), "
                "state = CASE state WHEN 'pending' THEN 'running' ELSE state END WHERE seq = ("
                "SELECT seq FROM clipserve_jobs WHERE (state IN ('pending', 'running', 'waiting') "
                "OR (state = 'switched' AND keep_until <= now())) "
                "AND (owner IS NULL OR heartbeat < now() - make_interval(secs => %s)) "
                "ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING id",
                (owner, lease_s),
            ).fetchone()
            return None if row is None else _job_record(self._job_row(conn, row[0]))

    def heartbeat_job(self, job_id: str, owner: str) -> JobRecord | None:
        with self._pool.transaction() as conn:
            beat = conn.execute(
                "UPDATE clipserve_jobs SET heartbeat = now() WHERE id = %s AND owner = %s "
                "AND state IN ('running', 'waiting', 'switched')",
                (job_id, owner),
            )
            return _job_record(self._job_row(conn, job_id)) if beat.rowcount else None

    def release_job(self, job_id: str, owner: str) -> None:
        with self._pool.transaction() as conn:
            conn.execute(
                "UPDATE clipserve_jobs SET owner = NULL WHERE id = %s AND owner = %s", (job_id, owner)
            )

    def begin_space(self, job_id: str, owner: str) -> None:
        with self._pool.transaction() as conn:
            conn.execute("SELECT set_config('lock_timeout', %s, true)", (_DDL_LOCK_TIMEOUT,))
            job, catalog = self._fenced(conn, job_id, owner, ("running", "waiting"))
            if catalog.other is not None and catalog.other.job == job_id:
                return
            self._end_other_space(conn, catalog, f"the previous space was given up: job {job_id} started")
            table, column, dim = catalog.table, catalog.other_column, job.target.dim
            # a fresh column: whatever an earlier space left there is gone, and it takes the new dimension
            conn.execute(sql.SQL("ALTER TABLE {} DROP COLUMN IF EXISTS {}").format(table, column))
            # once kept as the previous space, the bound column must take the rows that have none there
            conn.execute(
                sql.SQL("ALTER TABLE {} ALTER COLUMN {} DROP NOT NULL").format(table, catalog.column)
            )
            conn.execute(
                sql.SQL("ALTER TABLE {} ADD COLUMN {} vector({})").format(table, column, sql.Literal(dim))
            )
            _keep_vectors_inline(conn, table, column, catalog.binding.dim + dim)
            space = OtherSpace(job.target, "target", job_id, tag=job.seq)
            conn.execute(
                "UPDATE clipserve_collections SET other = %s WHERE id = %s", (space.json(), catalog.id)
            )

    def job_chunk(self, job_id: str, after: str, limit: int) -> list[ChunkItem]:
        with self._pool.transaction() as conn:
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            job = _job_record(self._job_row(conn, job_id))
            catalog = self._catalog(conn, job.collection)
            self._target_space(job, catalog)
            rows = conn.execute(
                sql.SQL(
                    "SELECT item_id, source_kind, source FROM {} i WHERE item_id > %s AND {} IS NULL "
                    "AND source_kind IS NOT NULL AND NOT EXISTS (SELECT 1 FROM clipserve_job_errors e "
                    "WHERE e.job_seq = %s AND e.item_id = i.item_id) ORDER BY item_id LIMIT %s"
                ).format(catalog.table, catalog.other_column),
                (after, job.seq, limit),
            ).fetchall()
        return [ChunkItem(r[0], r[0], Source(r[1], r[2])) for r in rows]

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
        with self._pool.transaction() as conn:
            job, catalog = self._fenced(conn, job_id, owner, ("running", "waiting"))
            space = self._target_space(job, catalog)
            if items:
                normalized = normalize_rows(vectors, space.binding.dim)
                ids = [item.item_id for item in items]
                conn.execute(
                    sql.SQL("SELECT 1 FROM {} WHERE item_id = ANY(%s) ORDER BY item_id FOR UPDATE").format(
                        catalog.table
                    ),
                    (ids,),
                )
                conn.execute(
                    sql.SQL(
                        "CREATE TEMP TABLE clipserve_moved (item_id TEXT, embedding vector({}), source_kind TEXT, "
                        "source TEXT) ON COMMIT DROP"
                    ).format(sql.Literal(space.binding.dim))
                )
                with conn.cursor().copy("COPY clipserve_moved FROM STDIN (FORMAT BINARY)") as copy:
                    copy.set_types(["text", "vector", "text", "text"])
                    for item, vector in zip(items, normalized, strict=True):
                        copy.write_row((item.item_id, vector, item.source.kind, item.source.value))
                # an item re-sourced since it was read is left alone: its write gave it its vector
                conn.execute(
                    sql.SQL(
                        "UPDATE {table} t SET {column} = m.embedding FROM clipserve_moved m WHERE t.item_id = "
                        "m.item_id AND t.source_kind = m.source_kind AND t.source = m.source AND t.{column} IS NULL"
                    ).format(table=catalog.table, column=catalog.other_column)
                )
            if errors:
                stored = conn.execute(
                    "SELECT count(*) FROM clipserve_job_errors WHERE job_seq = %s", (job.seq,)
                ).fetchone()[0]
                with conn.cursor() as cursor_:
                    cursor_.executemany(
                        "INSERT INTO clipserve_job_errors (job_seq, item_id, code, message) VALUES (%s, %s, %s, %s) "
                        "ON CONFLICT (job_seq, item_id) DO UPDATE SET code = excluded.code, message = excluded.message",
                        [
                            (job.seq, e.item_id, e.code, e.message)
                            for e in errors[: max(0, MAX_STORED_ERRORS - stored)]
                        ],
                    )
            conn.execute(
                "UPDATE clipserve_jobs SET state = 'running', cursor = %s, done = done + %s, errors = errors + %s, "
                "rate = %s, "
                "heartbeat = now() WHERE seq = %s",
                (cursor, len(items) + len(errors), len(errors), rate, job.seq),
            )

    def _blockers(self, conn: psycopg.Connection, job: JobRecord, catalog: _Catalog) -> tuple[Blockers, int]:
        self._target_space(job, catalog)
        failed = sql.SQL(
            "EXISTS (SELECT 1 FROM clipserve_job_errors e WHERE e.job_seq = %(seq)s AND e.item_id = t.item_id)"
        )
        counts = conn.execute(
            sql.SQL(
                "SELECT count(*), count(*) FILTER (WHERE {col} IS NULL AND source_kind IS NOT NULL AND NOT {failed}), "
                "count(*) FILTER (WHERE {col} IS NULL AND source_kind IS NULL), "
                "count(*) FILTER (WHERE {col} IS NULL AND source_kind IS NOT NULL AND {failed}) FROM {table} t"
            ).format(col=catalog.other_column, failed=failed, table=catalog.table),
            {"seq": job.seq},
        ).fetchone()
        first = conn.execute(
            sql.SQL(
                "SELECT item_id FROM {} WHERE {} IS NULL AND source_kind IS NULL ORDER BY item_id LIMIT %s"
            ).format(catalog.table, catalog.other_column),
            (FIRST_IDS,),
        ).fetchall()
        return Blockers(counts[1], counts[2], counts[3], [r[0] for r in first]), counts[0]

    def job_blockers(self, job_id: str) -> tuple[Blockers, int]:
        with self._pool.transaction() as conn:
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            job = _job_record(self._job_row(conn, job_id))
            return self._blockers(conn, job, self._catalog(conn, job.collection))

    def set_job_state(self, job_id: str, owner: str, state: JobState, blockers: Blockers, total: int) -> None:
        with self._pool.transaction() as conn:
            job, _ = self._fenced(conn, job_id, owner, ("running", "waiting"))
            conn.execute(
                "UPDATE clipserve_jobs SET state = %s, unembeddable = %s, unembeddable_ids = %s, total = %s, "
                "done = %s, heartbeat = now() WHERE seq = %s",
                (
                    state,
                    blockers.unembeddable,
                    json.dumps(blockers.first_ids),
                    total,
                    total - blockers.embeddable - blockers.blocking,
                    job.seq,
                ),
            )

    def prepare_switch(self, job_id: str, threads: int | None = None) -> None:
        """The target column's ANN index, built CONCURRENTLY (writes go on) when the collection is big
        enough for one; an index left invalid by a build that died is built again."""
        with self._pool.transaction() as conn:
            job = _job_record(self._job_row(conn, job_id))
            catalog = self._catalog(conn, job.collection)
            self._target_space(job, catalog)
            threshold = catalog.index_threshold
            if threshold is None or self._count(conn, catalog) < threshold:
                return
            valid = conn.execute(
                "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relname = %s",
                (catalog.other_index_name,),
            ).fetchone()
        if valid is not None and valid[0]:
            return
        method, options = _index_method(catalog.params)
        name = sql.Identifier(catalog.other_index_name)
        try:
            with self._pool.connection() as conn:  # autocommit: CONCURRENTLY runs outside a transaction
                if valid is not None:
                    conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(name))
                conn.execute(
                    "SELECT set_config('maintenance_work_mem', %s, false)", (self.maintenance_work_mem,)
                )
                if threads:
                    conn.execute(
                        "SELECT set_config('max_parallel_maintenance_workers', %s, false)",
                        (str(threads - 1),),
                    )
                conn.execute(
                    sql.SQL(
                        "CREATE INDEX CONCURRENTLY IF NOT EXISTS {} ON {} USING {} ({} vector_ip_ops) WITH ({})"
                    ).format(name, catalog.table, sql.SQL(method), catalog.other_column, options)
                )
                conn.execute("RESET maintenance_work_mem")
                conn.execute("RESET max_parallel_maintenance_workers")
        except psycopg.OperationalError as exc:
            raise unavailable(f"PostgreSQL failed: {str(exc).strip().splitlines()[0]}") from exc

    def _drop_lacking(self, conn: psycopg.Connection, catalog: _Catalog, column: sql.Identifier) -> int:
        """Delete the items with no vector in `column` (asked for with drop_unembeddable)."""
        rows = conn.execute(
            sql.SQL("DELETE FROM {} WHERE {} IS NULL RETURNING source_kind, source").format(
                catalog.table, column
            )
        ).fetchall()
        if rows:
            self._count_images(conn, catalog, ImageRefs(), released_images(rows))
        return len(rows)

    def _bind(
        self, conn: psycopg.Connection, catalog: _Catalog, binding: ModelBinding, other: OtherSpace | None
    ) -> None:
        """Flip the bound column to the other one, now holding `binding`; `other` is what the old one holds."""
        conn.execute(
            "UPDATE clipserve_collections SET model = %s, version = %s, content_hash = %s, dim = %s, "
            "bound_slot = %s, other = %s WHERE id = %s",
            (
                binding.model,
                binding.version,
                binding.content_hash,
                binding.dim,
                1 - catalog.bound_slot,
                None if other is None else other.json(),
                catalog.id,
            ),
        )

    def switch(self, job_id: str, owner: str, grace_s: float) -> bool:
        with self._pool.transaction() as conn:
            job, catalog = self._fenced(conn, job_id, owner, ("running", "waiting"))
            space = self._target_space(job, catalog)
            blockers, _total = self._blockers(conn, job, catalog)
            if blockers.embeddable or (blockers.blocking and not job.drop_unembeddable):
                return False
            dropped = self._drop_lacking(conn, catalog, catalog.other_column)
            self._bind(
                conn, catalog, space.binding, OtherSpace(catalog.binding, "previous", job_id, tag=job.seq)
            )
            conn.execute(
                "UPDATE clipserve_jobs SET state = 'switched', switched_at = now(), "
                "keep_until = now() + make_interval(secs => %s), owner = NULL, done = total, unembeddable = 0, "
                "unembeddable_ids = '[]', message = %s WHERE seq = %s",
                (grace_s, dropped_message(dropped), job.seq),
            )
        with self._pool.transaction() as conn:
            catalog = self._catalog(conn, job.collection)
        self._ensure_ann_index(catalog)  # when the collection grew past its threshold during the job
        return True

    def finish_job(self, job_id: str, owner: str) -> None:
        with self._pool.transaction() as conn:
            job, catalog = self._fenced(conn, job_id, owner, ("switched",))
            if catalog.other is not None and catalog.other.job == job_id and catalog.other.role == "previous":
                conn.execute("UPDATE clipserve_collections SET other = NULL WHERE id = %s", (catalog.id,))
            conn.execute(
                "UPDATE clipserve_jobs SET state = 'completed', owner = NULL, finished_at = now() WHERE seq = %s",
                (job.seq,),
            )
        self._drop_unused_column(catalog)

    def _drop_unused_column(self, catalog: _Catalog) -> None:
        """Give the disk of a space nobody needs back now, if no search holds the table for long; else
        the next job's new column replaces it."""
        try:
            with self._pool.transaction() as conn:
                conn.execute("SELECT set_config('lock_timeout', %s, true)", (_DDL_LOCK_TIMEOUT,))
                current = self._catalog_by_id(conn, catalog.id, lock="FOR UPDATE")
                if current.other is None and current.bound_slot == catalog.bound_slot:
                    conn.execute(
                        sql.SQL("ALTER TABLE {} DROP COLUMN IF EXISTS {}").format(
                            current.table, current.other_column
                        )
                    )
        except (BackendUnavailableError, psycopg.errors.LockNotAvailable):
            pass

    def fail_job(self, job_id: str, owner: str, message: str) -> None:
        with self._pool.transaction() as conn:
            job, catalog = self._fenced(conn, job_id, owner, ACTIVE_STATES)
            conn.execute(
                "UPDATE clipserve_jobs SET state = 'failed', owner = NULL, finished_at = now(), message = %s "
                "WHERE seq = %s",
                (message, job.seq),
            )
            if catalog.other is not None and catalog.other.job == job_id:
                self._end_other_space(conn, catalog, message)

    def rollback(self, name: str, drop_unembeddable: bool) -> JobRecord:
        with self._pool.transaction() as conn:
            collection_id = self._catalog(conn, name).id
            catalog = self._catalog_by_id(conn, collection_id)
            previous = catalog.other
            if previous is None or previous.role != "previous":
                raise JobStateError(nothing_to_roll_back(name))
            self._job_row(conn, previous.job, lock="FOR UPDATE OF j")
            catalog = self._catalog_by_id(conn, collection_id, lock="FOR UPDATE")
            if catalog.other != previous:
                raise JobStateError(nothing_to_roll_back(name))
            lacking = conn.execute(
                sql.SQL("SELECT item_id FROM {} WHERE {} IS NULL ORDER BY item_id").format(
                    catalog.table, catalog.other_column
                )
            ).fetchall()
            if lacking and not drop_unembeddable:
                raise JobStateError(rollback_blocked(name, previous.binding, [r[0] for r in lacking]))
            dropped = self._drop_lacking(conn, catalog, catalog.other_column)
            # the previous column kept its ANN index all along: nothing to build
            self._bind(conn, catalog, previous.binding, None)
            conn.execute(
                "UPDATE clipserve_jobs SET state = 'rolled_back', owner = NULL, finished_at = now(), message = %s "
                "WHERE id = %s",
                (rolled_back(previous.binding, dropped), previous.job),
            )
            record = _job_record(self._job_row(conn, previous.job))
        with self._pool.transaction() as conn:
            self._drop_unused_column(self._catalog(conn, name))
        return record

    def _forget_item_errors(self, conn: psycopg.Connection, catalog: _Catalog, ids: Sequence[str]) -> None:
        """Items written again are tried again by the collection's running job."""
        if catalog.other is not None and catalog.other.role == "target":
            conn.execute(
                "DELETE FROM clipserve_job_errors WHERE job_seq = %s AND item_id = ANY(%s)",
                (catalog.other.tag, list(ids)),
            )

    def close(self) -> None:
        self._pool.close()


def _keep_vectors_inline(
    conn: psycopg.Connection, table: sql.Identifier, column: sql.Identifier, dim: int
) -> None:
    """Store vectors in the row, not TOASTed: a 512-d vector (2 KB) is just over the TOAST threshold,
    and fetching every vector out of line made exact scans several times slower. `dim`: the
    dimensions of every vector column kept in line, which must fit in a page together."""
    if dim <= _MAX_INLINE_DIM:
        conn.execute(sql.SQL("ALTER TABLE {} ALTER COLUMN {} SET STORAGE PLAIN").format(table, column))


def _index_method(params: IndexParams) -> tuple[str, sql.Composable]:
    """pgvector's index method and its WITH options for the collection's index parameters."""
    if params.kind == "hnsw":
        return "hnsw", sql.SQL("m = {}, ef_construction = {}").format(
            sql.Literal(params.m), sql.Literal(params.ef_construction)
        )
    return "ivfflat", sql.SQL("lists = {}").format(sql.Literal(params.nlist))
