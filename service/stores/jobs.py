"""Re-embed jobs as data: the records both collection stores keep beside the items they move.

A job moves one collection to another embedding space (a model version). Its record lives in the
collection's own store (SQLite under the data dir, or PostgreSQL), so that its progress is committed
in the same transaction as the vectors it wrote, and any replica can read it, take it over, or
cancel it. Its life:

    pending --claim--> running --all items moved--> (switch) --> switched --grace over--> completed
                         |  ^                                       |
                         v  |  (items re-added, drop_unembeddable)  +--rollback--> rolled_back
                       waiting
    pending, running, waiting --DELETE--> cancelled          an active job --error--> failed

- `running`: a replica holds the lease (owner + heartbeat) and embeds the items that lack a vector of
  the target space, chunk by chunk, after a cursor in a stable item order.
- `waiting`: every item that can move has moved; some cannot (added as bare vectors, or their source
  no longer embeds): the switch waits for `drop_unembeddable` or for the items to be re-added.
- `switched`: the collection is bound to the target; the previous space is kept, and still written,
  until `keep_until`, so that a rollback finds it whole.

At most one job per collection is active (pending, running or waiting); a job started by a
collection's policy (`auto`) is made at most once per collection and target, so every replica may
try and exactly one job exists.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

from clipserve.service.errors import Conflict, NotFound

from .collection_store import CollectionStore, IndexStoreError, ModelBinding, OtherSpace, Source

JobState = Literal[
    "pending", "running", "waiting", "switched", "completed", "cancelled", "rolled_back", "failed"
]
ACTIVE_STATES: tuple[JobState, ...] = ("pending", "running", "waiting")
TERMINAL_STATES: tuple[JobState, ...] = ("completed", "cancelled", "rolled_back", "failed")

MAX_STORED_ERRORS = 1000
"""Item errors kept per job (the count is exact beyond it)."""
FIRST_IDS = 10
"""Ids of unembeddable items a job reports."""


class JobNotFoundError(IndexStoreError, NotFound):
    code = "job_not_found"


class AlreadyCurrentError(IndexStoreError, Conflict):
    """The collection already lives in the space asked for."""

    code = "already_current"


class JobStateError(IndexStoreError, Conflict):
    """The job (or the collection's refresh) is in a state that refuses the request."""

    code = "job_state"


class LeaseLostError(IndexStoreError):
    """This replica no longer runs the job: another took its lease over, or it was cancelled."""

    code = "job_lease_lost"


def new_job_id() -> str:
    return "reembed-" + secrets.token_hex(8)


@dataclass
class JobRecord:
    id: str
    collection: str
    state: JobState
    target: ModelBinding
    origin: ModelBinding
    auto: bool
    drop_unembeddable: bool
    done: int
    total: int
    errors: int
    unembeddable: int
    unembeddable_ids: list[str]
    rate: float | None
    owner: str | None
    heartbeat_age_s: float | None
    created_at: str
    started_at: str | None = None
    switched_at: str | None = None
    finished_at: str | None = None
    keep_until: str | None = None
    message: str | None = None
    cursor: str = ""
    seq: int = 0

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES


@dataclass(frozen=True)
class ChunkItem:
    """An item a job still has to move: `key` orders the scan (the cursor), `source` is what to embed."""

    key: str
    item_id: str
    source: Source


@dataclass(frozen=True)
class ItemError:
    item_id: str
    code: str
    message: str


@dataclass
class Blockers:
    """Items without a vector of the job's target space: those it can still embed, those added as bare
    vectors (`unembeddable`, with the first ids), and those whose source failed (`errored`)."""

    embeddable: int
    unembeddable: int
    errored: int
    first_ids: list[str] = field(default_factory=list)

    @property
    def blocking(self) -> int:
        return self.unembeddable + self.errored


class JobStore(CollectionStore, Protocol):
    """A collection store with its re-embed jobs: what both backends implement, and what the service
    opens. The jobs' records are the types above; the collection half is `CollectionStore`."""

    def create_job(
        self, name: str, target: ModelBinding, *, auto: bool, drop_unembeddable: bool
    ) -> JobRecord | None:
        """Start moving `name` to `target` (one transaction): the active job for the same target is
        updated instead (`drop_unembeddable`, failed items retried); one for another target is
        superseded; a previous space kept for rollback is given up. `auto`: only if no job for this
        collection and target ever existed (None otherwise)."""
        ...

    def get_job(self, job_id: str) -> JobRecord: ...

    def list_jobs(self, collection: str | None = None, limit: int = 100) -> list[JobRecord]: ...

    def job_errors(self, job_id: str, limit: int) -> list[ItemError]: ...

    def cancel_job(self, job_id: str) -> JobRecord: ...

    def claim_job(self, owner: str, lease_s: float) -> JobRecord | None:
        """Take the lease of one job needing an owner (active without a live one, or switched with
        its grace over), or None."""
        ...

    def heartbeat_job(self, job_id: str, owner: str) -> JobRecord | None:
        """Refresh our lease; the job as it stands, or None once it is no longer ours to run."""
        ...

    def release_job(self, job_id: str, owner: str) -> None: ...

    def begin_space(self, job_id: str, owner: str) -> None:
        """Make the job's target the collection's other space (writes fill it from now on)."""
        ...

    def job_chunk(self, job_id: str, after: str, limit: int) -> list[ChunkItem]:
        """Items after the cursor, in a stable order, that lack a vector of the job's target and have a
        source not failed in this job."""
        ...

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
        """The target's vectors of `items` (those not changed since they were read) and the chunk's
        errors, with the job's progress, in one transaction (`LeaseLostError` if not ours)."""
        ...

    def job_blockers(self, job_id: str) -> tuple[Blockers, int]:
        """What still lacks a vector of the target, and the collection's item count."""
        ...

    def set_job_state(
        self, job_id: str, owner: str, state: JobState, blockers: Blockers, total: int
    ) -> None: ...

    def prepare_switch(self, job_id: str) -> None:
        """Build the target space's ANN index, before the switch (blocking, can be long)."""
        ...

    def switch(self, job_id: str, owner: str, grace_s: float) -> bool:
        """Bind the collection to the job's target in one transaction, keeping the previous space for
        `grace_s`; False when items still lack target vectors (and may not be dropped)."""
        ...

    def finish_job(self, job_id: str, owner: str) -> None:
        """The grace period is over: drop the previous space; the job is completed."""
        ...

    def fail_job(self, job_id: str, owner: str, message: str) -> None: ...

    def rollback(self, name: str, drop_unembeddable: bool) -> JobRecord:
        """Bind the collection back to the previous space kept by its last switch."""
        ...


def reasons_add(needs: dict[str, list[str]], binding: ModelBinding, why: str) -> None:
    needs.setdefault(f"{binding.model}@{binding.version}", []).append(why)


def versions_in_use(
    catalog: list[tuple[str, ModelBinding, OtherSpace | None]], active: list[tuple[str, str, ModelBinding]]
) -> dict[str, list[str]]:
    """Which model versions the collections need loaded, and why: `{"tiny@1": ["collection photos"]}`.
    `catalog`: (name, bound, other) of every collection; `active`: (job id, collection, target)."""
    needs: dict[str, list[str]] = {}
    for name, bound, other in catalog:
        reasons_add(needs, bound, f"collection {name}")
        if other is not None and other.role == "previous":
            reasons_add(needs, other.binding, f"collection {name} (previous space, for rollback)")
    for job_id, name, target in active:
        reasons_add(needs, target, f"job {job_id} (re-embedding {name})")
    return needs


# What a job or a refusal says, in the same words from either store.


def already_current(name: str, bound: ModelBinding) -> str:
    return f"collection {name!r} is already bound to {bound.ref}"


def superseded(job_id: str, target: ModelBinding) -> str:
    return f"superseded by job {job_id} (to {target.ref})"


def cannot_cancel_switched(job: JobRecord) -> str:
    return (
        f"job {job.id} has switched collection {job.collection!r} to {job.target.ref} already; "
        f"POST /v1/collections/{job.collection}/rollback goes back to {job.origin.ref} (until {job.keep_until})"
    )


def dropped_message(count: int) -> str | None:
    return f"{count} items that could not move were deleted (drop_unembeddable)" if count else None


def nothing_to_roll_back(name: str) -> str:
    return (
        f"collection {name!r} keeps no previous space: it was not switched by a re-embed, or the grace "
        "period of its last switch is over"
    )


def rollback_blocked(name: str, previous: ModelBinding, ids: list[str]) -> str:
    shown = ", ".join(repr(i) for i in ids[:FIRST_IDS])
    return (
        f"{len(ids)} items of {name!r} have no vector of {previous.ref} (added as bare vectors since the "
        f"switch: {shown}); re-add them with their text or image, or roll back with drop_unembeddable: true"
    )


def rolled_back(target: ModelBinding, dropped: int) -> str:
    return f"rolled back to {target.ref}" + (
        f"; {dropped} items without its vectors deleted" if dropped else ""
    )
