"""The durable label-set store: one implementation, run over both dialects (a SQLite file under a data
dir, and a real PostgreSQL)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from clipserve.service.inference.engine import classes_digest
from clipserve.service.stores import BackendUnavailableError, InvalidInputError
from clipserve.service.stores.labelset_store import LabelSet, open_labelsets
from tests.fixtures.service import free_port


def record(name: str, labels: list[str], templates: tuple[str, ...] = ("a photo of a {}.",)) -> LabelSet:
    return LabelSet(name, "tiny", labels, templates, classes_digest(labels, templates))


@pytest.fixture(params=["sqlite", "postgres"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator:
    opened = []

    def make():
        if request.param == "sqlite":
            store = open_labelsets("embedded", data_dir=tmp_path / "data")
        else:
            store = open_labelsets("pgvector", dsn=request.getfixturevalue("plain_postgres_schema_dsn"))
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


def test_two_stores_on_one_database_share_definitions_and_leases(open_store) -> None:
    """Two replicas (or processes on one host) see each other's sets and build leases."""
    first, second = open_store(), open_store()
    stored = first.put(record("shared", ["x", "y"], ("{}", "a {}")))
    assert second.get("shared") == stored and stored.prompts == 4
    assert first.claim_build("space", stored.digest, "replica-a", 2, lease_s=30).owner == "replica-a"
    held = second.claim_build("space", stored.digest, "replica-b", 2, lease_s=30)
    assert held.owner == "replica-a" and 0 <= held.age_s < 5  # the database's clock, not the replicas'
    assert second.delete("shared") and first.head("shared") is None


def test_a_definition_no_database_can_store_is_refused_naming_the_value(open_store) -> None:
    store = open_store()
    with pytest.raises(InvalidInputError, match=r"labels\[1\]"):
        store.put(record("bad", ["fine", "with a NUL\x00"]))
    with pytest.raises(InvalidInputError, match=r"templates\[0\]"):
        store.put(LabelSet("bad", "tiny", ["fine"], ("lone \ud800 {}",), "0" * 64))
    assert store.names() == []


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
        open_labelsets(
            "pgvector", dsn=f"postgresql://postgres@127.0.0.1:{free_port()}/none?connect_timeout=2"
        )
    assert err.value.code == "labelsets_unavailable" and "cannot connect to PostgreSQL" in err.value.message


def test_the_store_follows_the_collections_backend(tmp_path: Path) -> None:
    store = open_labelsets("embedded", data_dir=tmp_path)
    store.put(record("one", ["a"]))
    assert (tmp_path / "labelsets.sqlite3").is_file()
    store.close()
    with pytest.raises(BackendUnavailableError, match="needs a PostgreSQL DSN"):
        open_labelsets("pgvector", dsn=None)
    (tmp_path / "taken").write_text("a file where the data dir should be")
    with pytest.raises(BackendUnavailableError, match="cannot open") as err:
        open_labelsets("embedded", data_dir=tmp_path / "taken")
    assert err.value.code == "labelsets_unavailable"
