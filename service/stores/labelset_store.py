"""Label-set definitions are data: a durable home beside the collections, and build leases.

One store (`LabelSetStore`) holds the SQL and the logic, over a `Dialect` (what each database spells
its own way: placeholders, the clock, the schema) and a connection that gives it transactions. Both
follow the collections backend:

- SQLite (`SQLITE`, `SqliteFile`): one file under the data dir (WAL, `synchronous=FULL`): a
  definition is acknowledged only once committed. Several processes on one host may share the file.
- PostgreSQL (`POSTGRES`, the stores' `ConnectionPool`): tables in the collections' PostgreSQL
  (`clipserve_labelsets`), so every replica sees the same sets.

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
from typing import Any, Protocol

from .collection_store import BackendUnavailableError, check_storable
from .postgres import ConnectionPool

UNAVAILABLE = "labelsets_unavailable"


def unavailable(detail: str) -> BackendUnavailableError:
    return BackendUnavailableError(f"label sets are unavailable: {detail}; retry shortly", code=UNAVAILABLE)


@dataclass(frozen=True)
class LabelSet:
    """A label set's definition: a name, its labels and templates, the model it is bound to, and the
    digest of its labels and templates (what its class matrices are keyed by). The store stamps
    `created_at` and `updated_at` when it commits one."""

    name: str
    model: str
    labels: list[str]
    templates: tuple[str, ...]
    digest: str
    created_at: str = ""
    updated_at: str = ""

    @property
    def prompts(self) -> int:
        return len(self.labels) * len(self.templates)


@dataclass(frozen=True)
class BuildLease:
    """Who builds a set's matrix for one embedding space, how far it got, and how fresh that is."""

    space: str
    digest: str
    owner: str
    done: int
    total: int
    age_s: float


def check_definition(labels: Sequence[str], templates: Sequence[str]) -> None:
    """Refuse what no backend can store (a NUL, a lone surrogate) naming the label or template;
    the API asks before anything is computed from them, each store again before it writes."""
    for field, values in (("labels", labels), ("templates", templates)):
        for position, value in enumerate(values):
            check_storable(value, f"{field}[{position}]", index=position)


@dataclass(frozen=True)
class Dialect:
    """What one database spells its own way. The store's SQL is written once, with `?` placeholders
    and `{slot}` names that `sql()` fills from these fields."""

    placeholder: str
    sets: str  # the definitions' table
    builds: str  # the build leases' table
    stamp: str  # now, as the definitions' created_at / updated_at hold it
    clock: str  # now, as a lease's heartbeat holds it
    age: str  # seconds since a lease's heartbeat
    since: str  # the clock `?` seconds ago
    schema: tuple[str, ...]  # run in one transaction when the store opens

    def sql(self, statement: str) -> str:
        slots = {
            "sets": self.sets,
            "builds": self.builds,
            "stamp": self.stamp,
            "clock": self.clock,
            "age": self.age,
            "since": self.since,
        }
        return statement.format(**slots).replace("?", self.placeholder)


# Seconds since the epoch with a fraction, in SQLite before 3.42 (which adds unixepoch('subsec')).
_SQLITE_NOW = "((julianday('now') - 2440587.5) * 86400.0)"

SQLITE = Dialect(
    placeholder="?",
    sets="labelsets",
    builds="labelset_builds",
    stamp="strftime('%Y-%m-%dT%H:%M:%S+00:00', 'now')",
    clock=_SQLITE_NOW,
    age=f"{_SQLITE_NOW} - heartbeat",
    since=f"{_SQLITE_NOW} - ?",
    schema=(
        "CREATE TABLE IF NOT EXISTS labelsets ("
        " name TEXT PRIMARY KEY, model TEXT NOT NULL, labels TEXT NOT NULL,"
        " templates TEXT NOT NULL, digest TEXT NOT NULL,"
        " created_at TEXT NOT NULL, updated_at TEXT NOT NULL)",
        "CREATE TABLE IF NOT EXISTS labelset_builds ("
        " space TEXT NOT NULL, digest TEXT NOT NULL, owner TEXT NOT NULL,"
        " done INTEGER NOT NULL, total INTEGER NOT NULL, heartbeat REAL NOT NULL,"
        " PRIMARY KEY (space, digest))",
    ),
)

_SCHEMA_LOCK_KEY = 0x6C61626C  # any constant shared by every replica

POSTGRES = Dialect(
    placeholder="%s",
    sets="clipserve_labelsets",
    builds="clipserve_labelset_builds",
    stamp="now()",
    clock="now()",
    age="extract(epoch FROM now() - heartbeat)::float8",
    since="now() - make_interval(secs => ?)",
    schema=(
        f"SELECT pg_advisory_xact_lock({_SCHEMA_LOCK_KEY})",  # replicas starting together
        """CREATE TABLE IF NOT EXISTS clipserve_labelsets (
            name TEXT PRIMARY KEY,
            model TEXT NOT NULL,
            labels JSONB NOT NULL,
            templates JSONB NOT NULL,
            digest TEXT NOT NULL,
            created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
            updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
        )""",
        """CREATE TABLE IF NOT EXISTS clipserve_labelset_builds (
            space TEXT NOT NULL,
            digest TEXT NOT NULL,
            owner TEXT NOT NULL,
            done INTEGER NOT NULL,
            total INTEGER NOT NULL,
            heartbeat TIMESTAMPTZ NOT NULL DEFAULT now(),
            PRIMARY KEY (space, digest)
        )""",
    ),
)


class Connection(Protocol):
    """Where the store's transactions come from: `SqliteFile`, or PostgreSQL's `ConnectionPool`."""

    def transaction(self) -> AbstractContextManager[Any]:
        """A connection in a transaction: committed on leaving, rolled back on any error; an outage
        raises the store's "unavailable" error."""
        ...

    def close(self) -> None: ...


class SqliteFile:
    """One SQLite file; one connection, its transactions serialized by a lock."""

    def __init__(self, path: Path | str, busy_timeout_s: float = 10.0):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                self.path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
        except (OSError, sqlite3.Error) as exc:
            raise unavailable(f"cannot open {self.path}: {exc}") from exc
        self._lock = threading.Lock()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
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

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _stamp(value: object) -> str:
    return value if isinstance(value, str) else value.isoformat(timespec="seconds")  # type: ignore[attr-defined]


def _labelset(row: Sequence) -> LabelSet:
    name, model, labels, templates, digest, created, updated = row
    labels = json.loads(labels) if isinstance(labels, str) else labels  # SQLite: text; PostgreSQL: JSONB
    templates = json.loads(templates) if isinstance(templates, str) else templates
    return LabelSet(name, model, list(labels), tuple(templates), digest, _stamp(created), _stamp(updated))


_COLUMNS = "name, model, labels, templates, digest, created_at, updated_at"


class LabelSetStore:
    """Label-set definitions and build leases: the one implementation, over either database."""

    def __init__(self, dialect: Dialect, connection: Connection):
        self.dialect, self.connection = dialect, connection
        sql = dialect.sql
        self._head = sql("SELECT digest, model FROM {sets} WHERE name = ?")
        self._get = sql(f"SELECT {_COLUMNS} FROM {{sets}} WHERE name = ?")
        self._put = sql(
            f"INSERT INTO {{sets}} ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, {{stamp}}, {{stamp}}) "
            "ON CONFLICT (name) DO UPDATE SET model = excluded.model, labels = excluded.labels, "
            "templates = excluded.templates, digest = excluded.digest, updated_at = excluded.updated_at "
            f"RETURNING {_COLUMNS}"
        )
        self._delete = sql("DELETE FROM {sets} WHERE name = ?")
        self._names = sql("SELECT name FROM {sets} ORDER BY name")
        self._claim = sql(
            "INSERT INTO {builds} (space, digest, owner, done, total, heartbeat) "
            "VALUES (?, ?, ?, 0, ?, {clock}) "
            "ON CONFLICT (space, digest) DO UPDATE SET owner = excluded.owner, done = 0, "
            "total = excluded.total, heartbeat = excluded.heartbeat "
            "WHERE {builds}.owner = excluded.owner OR {builds}.heartbeat < {since}"
        )
        self._heartbeat = sql(
            "UPDATE {builds} SET done = ?, heartbeat = {clock} WHERE space = ? AND digest = ? AND owner = ?"
        )
        self._release = sql("DELETE FROM {builds} WHERE space = ? AND digest = ? AND owner = ?")
        self._lease = sql(
            "SELECT space, digest, owner, done, total, {age} FROM {builds} WHERE space = ? AND digest = ?"
        )
        try:
            with connection.transaction() as db:
                for statement in dialect.schema:
                    db.execute(statement)
        except BaseException:
            connection.close()
            raise

    def head(self, name: str) -> tuple[str, str] | None:
        """(digest, model) of a set: what a classify reads when it already knows the labels."""
        with self.connection.transaction() as db:
            row = db.execute(self._head, (name,)).fetchone()
        return None if row is None else (row[0], row[1])

    def get(self, name: str) -> LabelSet | None:
        with self.connection.transaction() as db:
            row = db.execute(self._get, (name,)).fetchone()
        return None if row is None else _labelset(row)

    def put(self, labelset: LabelSet) -> LabelSet:
        """Create or replace in one commit; a replaced set keeps its `created_at`. Returns the set as
        committed (with its times)."""
        check_definition(labelset.labels, labelset.templates)
        values = (
            labelset.name,
            labelset.model,
            json.dumps(labelset.labels),
            json.dumps(labelset.templates),
            labelset.digest,
        )
        with self.connection.transaction() as db:
            row = db.execute(self._put, values).fetchone()
        return _labelset(row)

    def delete(self, name: str) -> bool:
        with self.connection.transaction() as db:
            return db.execute(self._delete, (name,)).rowcount > 0

    def names(self) -> list[str]:
        with self.connection.transaction() as db:
            return [row[0] for row in db.execute(self._names)]

    def claim_build(self, space: str, digest: str, owner: str, total: int, lease_s: float) -> BuildLease:
        """Take the build lease when it is free, ours, or expired; returns whoever holds it now."""
        with self.connection.transaction() as db:
            db.execute(self._claim, (space, digest, owner, total, lease_s))
            return BuildLease(*db.execute(self._lease, (space, digest)).fetchone())

    def heartbeat(self, space: str, digest: str, owner: str, done: int) -> bool:
        """Refresh our lease with our progress; False when another replica has taken it over."""
        with self.connection.transaction() as db:
            return db.execute(self._heartbeat, (done, space, digest, owner)).rowcount > 0

    def release_build(self, space: str, digest: str, owner: str) -> None:
        with self.connection.transaction() as db:
            db.execute(self._release, (space, digest, owner))

    def build(self, space: str, digest: str) -> BuildLease | None:
        with self.connection.transaction() as db:
            row = db.execute(self._lease, (space, digest)).fetchone()
        return None if row is None else BuildLease(*row)

    def close(self) -> None:
        self.connection.close()


def open_labelsets(
    backend: str, *, data_dir: Path | str | None = None, dsn: str | None = None
) -> LabelSetStore:
    """The label-set store beside the configured collections backend."""
    if backend == "embedded":
        if data_dir is None:
            raise unavailable("the embedded backend needs a data dir")
        return LabelSetStore(SQLITE, SqliteFile(Path(data_dir) / "labelsets.sqlite3"))
    if backend == "pgvector":
        if not dsn:
            raise unavailable("the pgvector backend needs a PostgreSQL DSN (postgres_dsn)")
        return LabelSetStore(POSTGRES, ConnectionPool(dsn, 4, unavailable))
    raise unavailable(f"unknown backend {backend!r}: use 'embedded' or 'pgvector'")
