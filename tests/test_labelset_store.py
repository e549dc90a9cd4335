"""The durable label-set store, on both backends: SQLite under a data dir, and a real PostgreSQL."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from clipserve.service.inference.engine import classes_digest
from clipserve.service.stores import BackendUnavailableError
from clipserve.service.stores.labelset_store import (
    LabelSetRecord,
    PostgresLabelSets,
    SqliteLabelSets,
    open_labelsets,
)
from tests.fixtures.service import free_port


def record(
    name: str, labels: list[str], templates: tuple[str, ...] = ("a photo of a {}.",)
) -> LabelSetRecord:
    return LabelSetRecord(name, "tiny", labels, templates, classes_digest(labels, templates), "", "")


@pytest.fixture(params=["sqlite", "postgres"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator:
    opened = []

    def make():
        if request.param == "sqlite":
            store = SqliteLabelSets(tmp_path / "data" / "labelsets.sqlite3")
        else:
            store = PostgresLabelSets(request.getfixturevalue("plain_postgres_schema_dsn"))
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


def test_definitions_are_committed_replaced_in_place_and_deleted(open_store) -> None:
    store = open_store()
    first = store.put(record("animals", ["cat", "dog"]))
    assert store.get("animals") == first and first.labels == ["cat", "dog"]
    assert store.head("animals") == (first.digest, "tiny")
    time.sleep(1.1)  # timestamps have one-second resolution
    second = store.put(record("animals", ["cat", "dog", "bird"]))
    assert second.created_at == first.created_at and second.updated_at > first.updated_at
    assert store.get("animals").labels == ["cat", "dog", "bird"] and second.digest != first.digest
    store.put(record("cars", ["sedan"]))
    assert store.names() == ["animals", "cars"]
    assert store.delete("animals") and not store.delete("animals")
    assert store.get("animals") is None and store.head("animals") is None and store.names() == ["cars"]


def test_a_definition_survives_closing_the_store(open_store) -> None:
    store = open_store()
    store.put(record("kept", ["x", "y"], ("{}", "a {}")))
    store.close()
    again = open_store()
    assert again.get("kept").templates == ("{}", "a {}")


def test_migration_inserts_only_what_is_missing(open_store) -> None:
    store = open_store()
    store.put(record("present", ["new"]))
    legacy = [
        LabelSetRecord(
            "present",
            "tiny",
            ["old"],
            ("{}",),
            classes_digest(["old"], ("{}",)),
            "2026-01-01T00:00:00+00:00",
            "2026-01-01T00:00:00+00:00",
        ),
        LabelSetRecord(
            "absent",
            "tiny",
            ["a"],
            ("{}",),
            classes_digest(["a"], ("{}",)),
            "2026-01-01T00:00:00+00:00",
            "2026-01-01T00:00:00+00:00",
        ),
    ]
    assert store.put_missing(legacy) == 1
    assert store.get("present").labels == ["new"]
    assert store.get("absent").created_at.startswith("2026-01-01T00:00:00")


def test_a_build_lease_is_exclusive_until_its_heartbeat_is_older_than_the_lease(open_store) -> None:
    store = open_store()
    lease = store.claim_build("space", "digest", "replica-a", 100, lease_s=30)
    assert lease.owner == "replica-a" and lease.done == 0 and lease.total == 100
    assert store.claim_build("space", "digest", "replica-b", 100, lease_s=30).owner == "replica-a"
    assert store.heartbeat("space", "digest", "replica-a", 40)
    assert store.build("space", "digest").done == 40
    time.sleep(0.6)
    taken = store.claim_build("space", "digest", "replica-b", 100, lease_s=0.5)  # replica-a went quiet
    assert taken.owner == "replica-b" and taken.done == 0
    assert not store.heartbeat("space", "digest", "replica-a", 50)  # a's late heartbeat learns it lost
    store.release_build("space", "digest", "replica-a")  # not a's to release any more
    assert store.build("space", "digest").owner == "replica-b"
    store.release_build("space", "digest", "replica-b")
    assert store.build("space", "digest") is None


def test_an_unreachable_postgres_is_unavailable_never_missing() -> None:
    with pytest.raises(BackendUnavailableError) as err:
        PostgresLabelSets(f"postgresql://postgres@127.0.0.1:{free_port()}/none?connect_timeout=2")
    assert err.value.code == "labelsets_unavailable" and "cannot connect to PostgreSQL" in err.value.message


def test_the_store_follows_the_collections_backend(tmp_path: Path) -> None:
    store = open_labelsets("embedded", data_dir=tmp_path)
    store.put(record("one", ["a"]))
    assert (tmp_path / "labelsets.sqlite3").is_file()
    store.close()
    with pytest.raises(BackendUnavailableError, match="needs a PostgreSQL DSN"):
        open_labelsets("pgvector", dsn=None)
