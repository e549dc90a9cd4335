"""Label-set definitions are data: a durable home beside the collections, and build leases.

Two backends behind one small interface (`LabelSetStore`), chosen with the collections backend:

- `SqliteLabelSets`: one SQLite file under the data dir (WAL, `synchronous=FULL`): a definition is
  acknowledged only once committed. Several processes on one host may share the file.
- `PostgresLabelSets`: a table in the collections' PostgreSQL (`clipserve_labelsets`), so every
  replica sees the same sets.

Besides the definitions, the store holds the **build leases** of large sets: a replica that builds a
class matrix in the background records itself as the owner with a heartbeat; the others report the
build's progress instead of starting their own, and take it over once the heartbeat is older than
the lease (the owner died). Times come from the database's clock, so replicas' clocks never disagree.

A store that cannot be reached raises `BackendUnavailableError` with code `labelsets_unavailable`:
the API answers 503 with Retry-After, never a 404 for a set that may exist.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import psycopg

from .collection_store import BackendUnavailableError, check_storable
from .postgres import ConnectionPool

UNAVAILABLE = "labelsets_unavailable"


def unavailable(detail: str) -> BackendUnavailableError:
    return BackendUnavailableError(f"label sets are unavailable: {detail}; retry shortly", code=UNAVAILABLE)


@dataclass(frozen=True)
class LabelSetRecord:
    name: str
    model: str
    labels: list[str]
    templates: tuple[str, ...]
    digest: str
    created_at: str
    updated_at: str


@dataclass(frozen=True)
class BuildLease:
    """Who builds a set's matrix for one embedding space, how far it got, and how fresh that is."""

    space: str
    digest: str
    owner: str
    done: int
    total: int
    age_s: float


class LabelSetStore(Protocol):
    def head(self, name: str) -> tuple[str, str] | None:
        """(digest, model) of a set: what a classify reads when it already knows the labels."""
        ...

    def get(self, name: str) -> LabelSetRecord | None: ...

    def put(self, record: LabelSetRecord) -> LabelSetRecord:
        """Create or replace in one commit; a replaced set keeps its `created_at`."""
        ...

    def put_missing(self, records: Sequence[LabelSetRecord]) -> int:
        """Insert the sets not stored yet (a migration); returns how many were added."""
        ...

    def delete(self, name: str) -> bool: ...

    def names(self) -> list[str]: ...

    def claim_build(self, space: str, digest: str, owner: str, total: int, lease_s: float) -> BuildLease:
        """Take the build lease when it is free, ours, or expired; returns whoever holds it now."""
        ...

    def heartbeat(self, space: str, digest: str, owner: str, done: int) -> bool:
        """Refresh our lease with our progress; False when another replica has taken it over."""
        ...

    def release_build(self, space: str, digest: str, owner: str) -> None: ...

    def build(self, space: str, digest: str) -> BuildLease | None: ...

    def close(self) -> None: ...


def check_definition(labels: Sequence[str], templates: Sequence[str]) -> None:
    """Refuse what no backend can store (a NUL, a lone surrogate) naming the label or template;
    the API asks before anything is computed from them, each store again before it writes."""
    for field, values in (("labels", labels), ("templates", templates)):
        for position, value in enumerate(values):
            check_storable(value, f"{field}[{position}]", index=position)


def _stamp(value: object) -> str:
    return value if isinstance(value, str) else value.isoformat(timespec="seconds")  # type: ignore[attr-defined]


def _record(row: Sequence) -> LabelSetRecord:
    name, model, labels, templates, digest, created, updated = row
    labels = json.loads(labels) if isinstance(labels, str) else labels
    templates = json.loads(templates) if isinstance(templates, str) else templates
    return LabelSetRecord(
        name, model, list(labels), tuple(templates), digest, _stamp(created), _stamp(updated)
    )


_COLUMNS = "name, model, labels, templates, digest, created_at, updated_at"
# Seconds since the epoch with a fraction, in SQLite before 3.42 (which adds unixepoch('subsec')).
_SQLITE_NOW = "((julianday('now') - 2440587.5) * 86400.0)"


class SqliteLabelSets:
    """Definitions and leases in one SQLite file; one connection, serialized by a lock."""

    def __init__(self, path: Path | str, busy_timeout_s: float = 10.0):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                self.path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(
                """
                CREATE TABLE IF NOT EXISTS labelsets (
                    name TEXT PRIMARY KEY, model TEXT NOT NULL, labels TEXT NOT NULL,
                    templates TEXT NOT NULL, digest TEXT NOT NULL,
                    created_at TEXT NOT NULL, updated_at TEXT NOT NULL);
                CREATE TABLE IF NOT EXISTS labelset_builds (
                    space TEXT NOT NULL, digest TEXT NOT NULL, owner TEXT NOT NULL,
                    done INTEGER NOT NULL, total INTEGER NOT NULL, heartbeat REAL NOT NULL,
                    PRIMARY KEY (space, digest));
                """
            )
        except (OSError, sqlite3.Error) as exc:
            raise unavailable(f"cannot open {self.path}: {exc}") from exc
        self._lock = threading.Lock()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                    self._db.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:  # a failed COMMIT leaves it open; a full disk does not
                        self._db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise unavailable(f"{self.path}: {exc}") from exc

    def head(self, name: str) -> tuple[str, str] | None:
        with self._transaction() as db:
            row = db.execute("SELECT digest, model FROM labelsets WHERE name = ?", (name,)).fetchone()
        return None if row is None else (row[0], row[1])

    def get(self, name: str) -> LabelSetRecord | None:
        with self._transaction() as db:
            row = db.execute(f"SELECT {_COLUMNS} FROM labelsets WHERE name = ?", (name,)).fetchone()
        return None if row is None else _record(row)

    def put(self, record: LabelSetRecord) -> LabelSetRecord:
        check_definition(record.labels, record.templates)
        with self._transaction() as db:
            row = db.execute(
                f"INSERT INTO labelsets ({_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, strftime('%Y-%m-%dT%H:%M:%S+00:00', 'now'), "
                "strftime('%Y-%m-%dT%H:%M:%S+00:00', 'now')) "
                "ON CONFLICT (name) DO UPDATE SET model = excluded.model, labels = excluded.labels, "
                "templates = excluded.templates, digest = excluded.digest, updated_at = excluded.updated_at "
                f"RETURNING {_COLUMNS}",
                (
                    record.name,
                    record.model,
                    json.dumps(record.labels),
                    json.dumps(record.templates),
                    record.digest,
                ),
            ).fetchone()
        return _record(row)

    def put_missing(self, records: Sequence[LabelSetRecord]) -> int:
        with self._transaction() as db:
            before = db.total_changes
            db.executemany(
                f"INSERT INTO labelsets ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO NOTHING",
                [
                    (
                        r.name,
                        r.model,
                        json.dumps(r.labels),
                        json.dumps(r.templates),
                        r.digest,
                        r.created_at,
                        r.updated_at,
                    )
                    for r in records
                ],
            )
            return db.total_changes - before

    def delete(self, name: str) -> bool:
        with self._transaction() as db:
            return db.execute("DELETE FROM labelsets WHERE name = ?", (name,)).rowcount > 0

    def names(self) -> list[str]:
        with self._transaction() as db:
            return [row[0] for row in db.execute("SELECT name FROM labelsets ORDER BY name")]

    def claim_build(self, space: str, digest: str, owner: str, total: int, lease_s: float) -> BuildLease:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO labelset_builds (space, digest, owner, done, total, heartbeat) "
                f"VALUES (?, ?, ?, 0, ?, {_SQLITE_NOW}) "
                "ON CONFLICT (space, digest) DO UPDATE SET owner = excluded.owner, done = 0, "
                "total = excluded.total, heartbeat = excluded.heartbeat "
                f"WHERE labelset_builds.owner = excluded.owner OR labelset_builds.heartbeat < {_SQLITE_NOW} - ?",
                (space, digest, owner, total, lease_s),
            )
            return self._lease(db, space, digest)  # type: ignore[return-value]

    def heartbeat(self, space: str, digest: str, owner: str, done: int) -> bool:
        with self._transaction() as db:
            return (
                db.execute(
                    f"UPDATE labelset_builds SET done = ?, heartbeat = {_SQLITE_NOW} "
                    "WHERE space = ? AND digest = ? AND owner = ?",
                    (done, space, digest, owner),
                ).rowcount
                > 0
            )

    def release_build(self, space: str, digest: str, owner: str) -> None:
        with self._transaction() as db:
            db.execute(
                "DELETE FROM labelset_builds WHERE space = ? AND digest = ? AND owner = ?",
                (space, digest, owner),
            )

    def build(self, space: str, digest: str) -> BuildLease | None:
        with self._transaction() as db:
            return self._lease(db, space, digest)

    @staticmethod
    def _lease(db: sqlite3.Connection, space: str, digest: str) -> BuildLease | None:
        row = db.execute(
            f"SELECT space, digest, owner, done, total, {_SQLITE_NOW} - heartbeat "
            "FROM labelset_builds WHERE space = ? AND digest = ?",
            (space, digest),
        ).fetchone()
        return None if row is None else BuildLease(*row)

    def close(self) -> None:
        with self._lock:
            self._db.close()


_PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS clipserve_labelsets (
    name TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    labels JSONB NOT NULL,
    templates JSONB NOT NULL,
    digest TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS clipserve_labelset_builds (
    space TEXT NOT NULL,
    digest TEXT NOT NULL,
    owner TEXT NOT NULL,
    done INTEGER NOT NULL,
    total INTEGER NOT NULL,
    heartbeat TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (space, digest)
);
"""
_SCHEMA_LOCK_KEY = 0x6C61626C  # any constant shared by every replica


class PostgresLabelSets:
    """Definitions and leases in PostgreSQL, shared by every replica."""

    def __init__(self, dsn: str, pool_size: int = 4):
        self._pool = ConnectionPool(dsn, pool_size, unavailable)
        with self._transaction() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_KEY,))
            conn.execute(_PG_SCHEMA)

    def _transaction(self) -> AbstractContextManager[psycopg.Connection]:
        return self._pool.transaction()

    def head(self, name: str) -> tuple[str, str] | None:
        with self._transaction() as conn:
            row = conn.execute(
                "SELECT digest, model FROM clipserve_labelsets WHERE name = %s", (name,)
            ).fetchone()
        return None if row is None else (row[0], row[1])

    def get(self, name: str) -> LabelSetRecord | None:
        with self._transaction() as conn:
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM clipserve_labelsets WHERE name = %s", (name,)
            ).fetchone()
        return None if row is None else _record(row)

    def put(self, record: LabelSetRecord) -> LabelSetRecord:
        check_definition(record.labels, record.templates)
        with self._transaction() as conn:
            row = conn.execute(
                f"INSERT INTO clipserve_labelsets ({_COLUMNS}) VALUES (%s, %s, %s, %s, %s, now(), now()) "
                "ON CONFLICT (name) DO UPDATE SET model = excluded.model, labels = excluded.labels, "
                "templates = excluded.templates, digest = excluded.digest, updated_at = now() "
                f"RETURNING {_COLUMNS}",
                (
                    record.name,
                    record.model,
                    json.dumps(record.labels),
                    json.dumps(record.templates),
                    record.digest,
                ),
            ).fetchone()
        return _record(row)

    def put_missing(self, records: Sequence[LabelSetRecord]) -> int:
        added = 0
        with self._transaction() as conn:
            for r in records:
                cursor = conn.execute(
                    f"INSERT INTO clipserve_labelsets ({_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s) "
                    "ON CONFLICT (name) DO NOTHING",
                    (
                        r.name,
                        r.model,
                        json.dumps(r.labels),
                        json.dumps(r.templates),
                        r.digest,
                        r.created_at,
                        r.updated_at,
                    ),
                )
                added += cursor.rowcount
        return added

    def delete(self, name: str) -> bool:
        with self._transaction() as conn:
            return conn.execute("DELETE FROM clipserve_labelsets WHERE name = %s", (name,)).rowcount > 0

    def names(self) -> list[str]:
        with self._transaction() as conn:
            return [row[0] for row in conn.execute("SELECT name FROM clipserve_labelsets ORDER BY name")]

    def claim_build(self, space: str, digest: str, owner: str, total: int, lease_s: float) -> BuildLease:
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO clipserve_labelset_builds (space, digest, owner, done, total) "
                "VALUES (%s, %s, %s, 0, %s) "
                "ON CONFLICT (space, digest) DO UPDATE SET owner = excluded.owner, done = 0, "
                "total = excluded.total, heartbeat = now() "
                "WHERE clipserve_labelset_builds.owner = excluded.owner "
                "OR clipserve_labelset_builds.heartbeat < now() - make_interval(secs => %s)",
                (space, digest, owner, total, lease_s),
            )
            return self._lease(conn, space, digest)  # type: ignore[return-value]

    def heartbeat(self, space: str, digest: str, owner: str, done: int) -> bool:
        with self._transaction() as conn:
            cursor = conn.execute(
                "UPDATE clipserve_labelset_builds SET done = %s, heartbeat = now() "
                "WHERE space = %s AND digest = %s AND owner = %s",
                (done, space, digest, owner),
            )
            return cursor.rowcount > 0

    def release_build(self, space: str, digest: str, owner: str) -> None:
        with self._transaction() as conn:
            conn.execute(
                "DELETE FROM clipserve_labelset_builds WHERE space = %s AND digest = %s AND owner = %s",
                (space, digest, owner),
            )

    def build(self, space: str, digest: str) -> BuildLease | None:
        with self._transaction() as conn:
            return self._lease(conn, space, digest)

    @staticmethod
    def _lease(conn: psycopg.Connection, space: str, digest: str) -> BuildLease | None:
        row = conn.execute(
            "SELECT space, digest, owner, done, total, extract(epoch FROM now() - heartbeat)::float8 "
            "FROM clipserve_labelset_builds WHERE space = %s AND digest = %s",
            (space, digest),
        ).fetchone()
        return None if row is None else BuildLease(*row)

    def close(self) -> None:
        self._pool.close()


def open_labelsets(
    backend: str, *, data_dir: Path | str | None = None, dsn: str | None = None
) -> LabelSetStore:
    """The label-set store beside the configured collections backend."""
    if backend == "embedded":
        if data_dir is None:
            raise unavailable("the embedded backend needs a data dir")
        return SqliteLabelSets(Path(data_dir) / "labelsets.sqlite3")
    if backend == "pgvector":
        if not dsn:
            raise unavailable("the pgvector backend needs a PostgreSQL DSN (postgres_dsn)")
        return PostgresLabelSets(dsn)
    raise unavailable(f"unknown backend {backend!r}: use 'embedded' or 'pgvector'")
