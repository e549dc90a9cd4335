"""Background work on collections: re-embed jobs, and the loop that runs them on every replica.

The operations behind /v1/jobs and /v1/collections/{name}/reembed and /rollback: plain values in,
job records (clipserve.service.stores.jobs) out. A job is data, kept in the collection's store, so
any replica answers for it.

Every replica runs one loop (every `reembed_poll_s`, and at once when a job is asked for):
1. keeps loaded the model versions the collections and jobs need (`ModelRegistry.keep_needed`);
2. applies each collection's policy: `reembed` (the default) starts a job when a newer version of its
   model is served here; the store makes sure one job per collection and target exists, whichever
   replica gets there first, and that a target once cancelled or rolled back is not tried again;
3. takes up to `reembed_concurrency` jobs that need an owner (new ones, ones whose replica died,
   switched ones whose grace period is over) and runs each (clipserve.service.reembed.JobRun).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid

import anyio.to_thread

from clipserve.contract.bundle import BundleError, parse_model_ref
from clipserve.service.collections import Collections
from clipserve.service.errors import InvalidInput, ServiceError
from clipserve.service.inference.engine import ModelEngine
from clipserve.service.inference.inputs import ImageFetcher
from clipserve.service.inference.registry import ModelRegistry
from clipserve.service.metrics import Metrics
from clipserve.service.reembed import JobRun
from clipserve.service.settings import Settings
from clipserve.service.stores import ModelBinding
from clipserve.service.stores.collection_store import CollectionSpaces
from clipserve.service.stores.jobs import ItemError, JobRecord

log = logging.getLogger("clipserve.jobs")
ERROR_SAMPLES = 10


class Jobs:
    def __init__(
        self,
        registry: ModelRegistry,
        collections: Collections,
        fetcher: ImageFetcher,
        settings: Settings,
        metrics: Metrics,
    ):
        self.registry, self.collections, self.fetcher = registry, collections, fetcher
        self.settings, self.metrics = settings, metrics
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._runs: dict[str, asyncio.Task] = {}
        self._loop: asyncio.Task | None = None
        self._wake = asyncio.Event()

    # Operations -------------------------------------------------------------------------------------

    async def reembed(self, name: str, model: str | None, drop_unembeddable: bool) -> JobRecord:
        """Start moving a collection to `model` (default: the served version of the model it is bound
        to), or update the job already moving it there."""
        spaces = await self.collections.spaces(name)
        engine = await self._target_engine(spaces, model)
        target = await self._target(spaces, engine)
        job = await self.collections.call(
            "create_job", name, target, auto=False, drop_unembeddable=drop_unembeddable
        )
        self._wake.set()
        return job

    async def get(self, job_id: str) -> tuple[JobRecord, list[ItemError]]:
        job = await self.collections.call("get_job", job_id)
        return job, await self.collections.call("job_errors", job_id, ERROR_SAMPLES)

    async def list_all(self, collection: str | None, limit: int) -> list[JobRecord]:
        return await self.collections.call("list_jobs", collection, limit)

    async def cancel(self, job_id: str) -> JobRecord:
        job = await self.collections.call("cancel_job", job_id)
        run = self._runs.get(job_id)
        if run is not None:
            run.cancel()
        return job

    async def rollback(self, name: str, drop_unembeddable: bool) -> JobRecord:
        job = await self.collections.call("rollback", name, drop_unembeddable)
        log.info("collection %r rolled back to %s (job %s)", name, job.origin.ref, job.id)
        self._wake.set()
        return job

    async def _target_engine(self, spaces: CollectionSpaces, model: str | None) -> ModelEngine:
        if model is None:
            return self.registry.resolve(spaces.bound.model)
        try:
            name, version = parse_model_ref(model)
        except BundleError as exc:
            raise InvalidInput(f"model: {exc}") from exc
        return self.registry.resolve(name) if version is None else await self.registry.version(name, version)

    async def _target(self, spaces: CollectionSpaces, engine: ModelEngine) -> ModelBinding:
        """The space a collection moves to. It keeps the dimensions it was made with when they were fewer
        than its model gives (`dimensions` at creation), else takes all of the new version's."""
        bound = spaces.bound
        try:
            manifest = await anyio.to_thread.run_sync(
                lambda: self.registry.repository.load(bound.model, bound.version, verify=False).manifest
            )
            reduced = bound.dim < manifest.embed_dim
        except BundleError:  # the old version is gone from the repository: keep its dimensions if it can
            reduced = bound.dim < engine.dim
        dim = min(bound.dim, engine.dim) if reduced else engine.dim
        return ModelBinding(engine.name, engine.version, engine.content_hash, dim)

    # The loop ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop().create_task(self._forever(), name="reembed-jobs")

    async def _forever(self) -> None:
        while True:
            try:
                await self.tick()
            except ServiceError as exc:  # a store that is down: the next tick tries again
                log.warning("re-embed jobs: %s", exc.message)
            except Exception:  # the loop must survive anything; the next tick tries again
                log.exception("re-embed jobs: the loop failed")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.reembed_poll_s)

    async def tick(self) -> None:
        """One look: versions to keep loaded, policies to apply, jobs to take."""
        if not self.collections.store_exists():
            return
        await self.registry.keep_needed()
        await self._apply_policies()
        while len(self._runs) < self.settings.reembed_concurrency:
            job = await self.collections.call("claim_job", self.owner, self.settings.reembed_lease_s)
            if job is None:
                break
            self._run(job)

    async def _apply_policies(self) -> None:
        for name, spaces in (await self.collections.call("all_spaces")).items():
            if spaces.policy != "reembed":
                continue
            try:
                served = self.registry.resolve(spaces.bound.model)
            except ServiceError:
                continue
            if served.version <= spaces.bound.version or served.content_hash == spaces.bound.content_hash:
                continue
            if spaces.other is not None and spaces.other.binding.content_hash == served.content_hash:
                continue  # already on its way there
            target = await self._target(spaces, served)
            job = await self.collections.call("create_job", name, target, auto=True, drop_unembeddable=False)
            if job is not None:
                log.info(
                    "collection %r: %s is served, re-embedding it from %s (job %s)",
                    name,
                    served.ref,
                    spaces.bound.ref,
                    job.id,
                )

    def _run(self, job: JobRecord) -> None:
        run = JobRun(job, self.collections.call, self.fetcher, self.settings, self.metrics, self.owner)

        async def go() -> None:
            self.metrics.jobs.labels(state="running").inc()
            try:
                await run.run()
            finally:
                self.metrics.jobs.labels(state="running").dec()
                self._runs.pop(job.id, None)
                self._wake.set()  # the versions it needed, the next job

        self._runs[job.id] = asyncio.get_running_loop().create_task(go(), name=f"reembed-{job.id}")

    async def close(self) -> None:
        """Stop the loop and the runs, and hand their leases back so that another replica goes on at once."""
        if self._loop is not None:
            self._loop.cancel()
        runs = dict(self._runs)
        for task in runs.values():
            task.cancel()
        await asyncio.gather(*runs.values(), return_exceptions=True)
        for job_id in runs:
            with contextlib.suppress(ServiceError):
                await self.collections.call("release_job", job_id, self.owner)
