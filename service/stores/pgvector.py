"""The PostgreSQL + pgvector backend: every API replica shares the same collections.

Schema (created on first use, in the DSN's first search_path schema):
    clipserve_collections        the catalog: name, model binding, index parameters
    clipserve_items_<id>         one table per collection: item_id, embedding vector(dim), metadata
                                 JSONB (GIN index for filters), source kind and value
    clipserve_images             inline images' bytes, by collection and sha256, with the number of
                                 items using each (freed at zero)

Writes are committed transactions, so an acknowledged write survives a crash of the API and of
PostgreSQL itself. The ANN index (HNSW or IVFFlat, on inner product) is built with CREATE INDEX once
the collection holds enough rows (IVFFlat needs data for its centroids); before that, and for "flat"
collections, searches scan exactly. PostgreSQL's MVCC keeps readers working during writes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
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
    FilterValue,
    ImageRefs,
    IndexParams,
    ItemNotFoundError,
    ModelBinding,
    ProgressCallback,
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
_STAGING_COLUMNS = ["text", "vector", "text", "text", "text"]


class _Catalog:
    def __init__(self, row: tuple[Any, ...]):
        self.id, self.name, model, version, content_hash, dim, params, created_at = row
        self.binding = ModelBinding(model, version, content_hash, dim)
        self.params = IndexParams.model_validate(params)
        self.created_at: str = created_at.isoformat(timespec="seconds")
        self.table = sql.Identifier(f"clipserve_items_{self.id}")
        self.index_name = f"clipserve_items_{self.id}_ann"

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
            conn.execute(_IMAGES)

    def _transaction(self) -> AbstractContextManager[psycopg.Connection]:
        return self._pool.transaction()

    def _catalog(self, conn: psycopg.Connection, name: str, lock: str = "") -> _Catalog:
        validate_collection_name(name)
        row = conn.execute(
            "SELECT id, name, model, version, content_hash, dim, index_params, created_at "
            f"FROM clipserve_collections WHERE name = %s {lock}",
            (name,),
        ).fetchone()
        if row is None:
            raise CollectionNotFoundError(f"no collection named {name!r}")
        return _Catalog(row)

    def _count(self, conn: psycopg.Connection, catalog: _Catalog) -> int:
        return conn.execute(sql.SQL("SELECT count(*) FROM {}").format(catalog.table)).fetchone()[0]

    def _info(self, conn: psycopg.Connection, catalog: _Catalog) -> CollectionInfo:
        return CollectionInfo(
            catalog.name, catalog.binding, catalog.params, self._count(conn, catalog), catalog.created_at
        )

    # collections

    def create_collection(self, name: str, binding: ModelBinding, index: IndexParams) -> CollectionInfo:
        validate_collection_name(name)
        try:
            with self._transaction() as conn:
                row = conn.execute(
                    "INSERT INTO clipserve_collections (name, model, version, content_hash, dim, index_params) "
                    "VALUES (%s, %s, %s, %s, %s, %s) "
                    "RETURNING id, name, model, version, content_hash, dim, index_params, created_at",
                    (
                        name,
                        binding.model,
                        binding.version,
                        binding.content_hash,
                        binding.dim,
                        psycopg.types.json.Jsonb(index.model_dump()),
                    ),
                ).fetchone()
                catalog = _Catalog(row)
                self._create_items_table(conn, catalog.table, binding.dim)
        except psycopg.errors.UniqueViolation as exc:
            raise CollectionExistsError(f"collection {name!r} already exists") from exc
        return CollectionInfo(name, binding, index, 0, catalog.created_at)

    @staticmethod
    def _create_items_table(conn: psycopg.Connection, table: sql.Identifier, dim: int) -> None:
        conn.execute(
            sql.SQL(
                "CREATE TABLE {} (item_id TEXT PRIMARY KEY, embedding vector({}) NOT NULL, "
                "metadata JSONB NOT NULL, source_kind TEXT, source TEXT)"
            ).format(table, sql.Literal(dim))
        )
        _keep_vectors_inline(conn, table, dim)
        conn.execute(sql.SQL("CREATE INDEX ON {} USING gin (metadata jsonb_path_ops)").format(table))

    def drop_collection(self, name: str) -> None:
        with self._transaction() as conn:
            catalog = self._catalog(conn, name, lock="FOR UPDATE")
            conn.execute(sql.SQL("DROP TABLE {}").format(catalog.table))
            conn.execute("DELETE FROM clipserve_collections WHERE id = %s", (catalog.id,))

    def list_collections(self) -> list[CollectionInfo]:
        with self._transaction() as conn:
            rows = conn.execute(
                "SELECT id, name, model, version, content_hash, dim, index_params, created_at "
                "FROM clipserve_collections ORDER BY name"
            ).fetchall()
            return [self._info(conn, _Catalog(row)) for row in rows]

    def describe(self, name: str) -> CollectionInfo:
        with self._transaction() as conn:
            return self._info(conn, self._catalog(conn, name))

    def binding(self, name: str) -> ModelBinding:
        with self._transaction() as conn:
            return self._catalog(conn, name).binding

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
    ) -> int:
        with self._transaction() as conn:
            catalog = self._catalog(conn, name)
        check_binding(name, catalog.binding, content_hash)
        ids, vectors, metadata, sources = prepare_upsert(ids, vectors, catalog.binding.dim, metadata, sources)
        encoded = [encode_metadata(entry, position) for position, entry in enumerate(metadata)]
        self._drop_hnsw_before_bulk(catalog, len(ids))
        for chunk in batches(len(ids), self.batch_size):
            self._write_batch(
                catalog, content_hash, ids[chunk], vectors[chunk], encoded[chunk], sources[chunk]
            )
            if progress is not None:
                progress(chunk.stop, len(ids))
        self._ensure_ann_index(catalog)
        return len(ids)

    def _write_batch(
        self,
        catalog: _Catalog,
        content_hash: str,
        ids: list[str],
        vectors: np.ndarray,
        metadata: list[str],
        sources: list[Source | None],
    ) -> None:
        with self._transaction() as conn:
            current = self._catalog(conn, catalog.name, lock="FOR SHARE")
            if current.id != catalog.id:
                raise CollectionNotFoundError(f"collection {catalog.name!r} was dropped during the write")
            check_binding(catalog.name, current.binding, content_hash)
            added = ImageRefs.of(sources)
            released: dict[str, int] = {}
            if added.uses or self._may_hold_images(conn, catalog):
                # the rows replaced, locked until the commit, so that each reference is released once
                released = released_images(
                    conn.execute(
                        sql.SQL(
                            "SELECT source_kind, source FROM {} WHERE item_id = ANY(%s) ORDER BY item_id FOR UPDATE"
                        ).format(catalog.table),
                        (ids,),
                    ).fetchall()
                )
            conn.execute(
                sql.SQL(
                    "CREATE TEMP TABLE clipserve_staging (item_id TEXT, embedding vector({}), metadata TEXT, "
                    "source_kind TEXT, source TEXT) ON COMMIT DROP"
                ).format(sql.Literal(catalog.binding.dim))
            )
            with conn.cursor().copy("COPY clipserve_staging FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(_STAGING_COLUMNS)
                for item_id, vector, meta, source in zip(ids, vectors, metadata, sources, strict=True):
                    copy.write_row(
                        (
                            item_id,
                            vector,
                            meta,
                            source.kind if source else None,
                            source.value if source else None,
                        )
                    )
            conn.execute(
                sql.SQL(
                    "INSERT INTO {} (item_id, embedding, metadata, source_kind, source) "
                    "SELECT item_id, embedding, metadata::jsonb, source_kind, source FROM clipserve_staging "
                    "ON CONFLICT (item_id) DO UPDATE SET embedding = excluded.embedding, "
                    "metadata = excluded.metadata, source_kind = excluded.source_kind, source = excluded.source"
                ).format(catalog.table)
            )
            self._count_images(conn, catalog, added, released)

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
        with self._transaction() as conn:
            catalog = self._catalog(conn, name)
            rows = conn.execute(
                "SELECT digest, data FROM clipserve_images WHERE collection_id = %s AND digest = ANY(%s)",
                (catalog.id, list(dict.fromkeys(digests))),
            ).fetchall()
        return {digest: bytes(data) for digest, data in rows}

    def _drop_hnsw_before_bulk(self, catalog: _Catalog, new_rows: int) -> None:
        if catalog.params.kind != "hnsw" or new_rows < self.reindex_min_rows:
            return
        with self._transaction() as conn:
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
        with self._transaction() as conn:
            if conn.execute("SELECT to_regclass(%s)", (catalog.index_name,)).fetchone()[0] is not None:
                return
            if self._count(conn, catalog) < threshold:
                return
            if not conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (catalog.id,)).fetchone()[0]:
                return
            conn.execute("SELECT set_config('maintenance_work_mem', %s, true)", (self.maintenance_work_mem,))
            params = catalog.params
            if params.kind == "hnsw":
                method, options = (
                    "hnsw",
                    sql.SQL("m = {}, ef_construction = {}").format(
                        sql.Literal(params.m), sql.Literal(params.ef_construction)
                    ),
                )
            else:
                method, options = "ivfflat", sql.SQL("lists = {}").format(sql.Literal(params.nlist))
            conn.execute(
                sql.SQL(
                    "CREATE INDEX IF NOT EXISTS {} ON {} USING {} (embedding vector_ip_ops) WITH ({})"
                ).format(sql.Identifier(catalog.index_name), catalog.table, sql.SQL(method), options)
            )

    def get(self, name: str, item_id: str) -> StoredItem:
        validate_item_id(item_id)
        with self._transaction() as conn:
            catalog = self._catalog(conn, name)
            row = conn.execute(
                sql.SQL(
                    "SELECT item_id, embedding, metadata, source_kind, source FROM {} WHERE item_id = %s"
                ).format(catalog.table),
                (item_id,),
            ).fetchone()
        if row is None:
            raise ItemNotFoundError(f"collection {name!r} has no item {item_id!r}")
        source = Source(row[3], row[4]) if row[3] else None
        return StoredItem(row[0], row[1].to_numpy().astype(np.float32), row[2], source)

    def delete(self, name: str, item_id: str) -> None:
        validate_item_id(item_id)
        with self._transaction() as conn:
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
        with self._transaction() as conn:
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
                    "SELECT item_id, metadata, embedding <#> %s AS distance FROM {} {} ORDER BY distance LIMIT %s"
                ).format(catalog.table, where),
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

    # re-embedding

    def iter_sources(self, name: str, batch_size: int = 1000) -> Iterator[list[tuple[str, Source | None]]]:
        with self._transaction() as conn:
            catalog = self._catalog(conn, name)
        last = ""
        while True:
            with self._transaction() as conn:
                rows = conn.execute(
                    sql.SQL(
                        "SELECT item_id, source_kind, source FROM {} WHERE item_id > %s ORDER BY item_id LIMIT %s"
                    ).format(catalog.table),
                    (last, batch_size),
                ).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            yield [(row[0], Source(row[1], row[2]) if row[1] else None) for row in rows]

    def rebind(self, name: str, binding: ModelBinding, ids: Sequence[str], vectors: np.ndarray) -> None:
        """Move the collection to another embedding space: new vectors for every item, in one transaction."""
        with self._transaction() as conn:
            catalog = self._catalog(conn, name, lock="FOR UPDATE")
            stored = {row[0] for row in conn.execute(sql.SQL("SELECT item_id FROM {}").format(catalog.table))}
            normalized = rebind_rows(name, stored, ids, vectors, binding.dim)
            conn.execute(
                sql.SQL(
                    "CREATE TEMP TABLE clipserve_rebind (item_id TEXT, embedding vector({})) ON COMMIT DROP"
                ).format(sql.Literal(binding.dim))
            )
            with conn.cursor().copy("COPY clipserve_rebind FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(["text", "vector"])
                for item_id, vector in zip(ids, normalized, strict=True):
                    copy.write_row((item_id, vector))
            table = catalog.table
            conn.execute(sql.SQL("ALTER TABLE {} DROP COLUMN embedding").format(table))
            conn.execute(
                sql.SQL("ALTER TABLE {} ADD COLUMN embedding vector({})").format(
                    table, sql.Literal(binding.dim)
                )
            )
            _keep_vectors_inline(conn, table, binding.dim)
            conn.execute(
                sql.SQL(
                    "UPDATE {} t SET embedding = r.embedding FROM clipserve_rebind r WHERE t.item_id = r.item_id"
                ).format(table)
            )
            conn.execute(sql.SQL("ALTER TABLE {} ALTER COLUMN embedding SET NOT NULL").format(table))
            conn.execute(
                "UPDATE clipserve_collections SET model = %s, version = %s, content_hash = %s, dim = %s WHERE id = %s",
                (binding.model, binding.version, binding.content_hash, binding.dim, catalog.id),
            )
        with self._transaction() as conn:
            catalog = self._catalog(conn, name)
        self._ensure_ann_index(catalog)

    def close(self) -> None:
        self._pool.close()


def _keep_vectors_inline(conn: psycopg.Connection, table: sql.Identifier, dim: int) -> None:
    """Store vectors in the row, not TOASTed: a 512-d vector (2 KB) is just over the TOAST threshold,
    and fetching every vector out of line made exact scans several times slower."""
    if dim <= _MAX_INLINE_DIM:
        conn.execute(sql.SQL("ALTER TABLE {} ALTER COLUMN embedding SET STORAGE PLAIN").format(table))
