"""One re-embed job, run by the replica holding its lease: a collection's items embedded again by the
target model version, chunk by chunk, beside the vectors that keep answering searches, then the switch.

    run = JobRun(job, store, ...)        # a job this replica just claimed (clipserve.service.jobs)
    await run.run()                      # until switched, waiting on items that cannot move, or lost

The bulk path, at a bounded share of the replica: items go through `BulkEncoder` (the service's own
loading, preprocessing and tokenizer, its sessions opened for the job with `reembed_threads` threads)
on one thread of the job's own, never through the online batchers, at most `reembed_rate` items a
second. Sources: a text, an inline image's bytes read back from the store, or an image URL fetched
under the server's URL rules; a source that no longer embeds is an item error of the job, never a
failed job.

Each chunk's vectors are committed with the job's cursor and counts in one transaction, fenced by the
lease: a replica killed mid-job loses at most the chunk in hand, and the next owner goes on from the
cursor. A heartbeat keeps the lease and brings the job's record back (a new `drop_unembeddable`, a
cancel); when the job is no longer this replica's, the run stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from clipserve.contract.scoring import normalize
from clipserve.service.errors import InvalidImage, ServiceError, Unavailable
from clipserve.service.inference.bulk import BulkEncoder
from clipserve.service.inference.inputs import ImageFetcher
from clipserve.service.metrics import Metrics
from clipserve.service.settings import Settings
from clipserve.service.stores.jobs import ChunkItem, ItemError, JobRecord, LeaseLostError

log = logging.getLogger("clipserve.reembed")
StoreCall = Callable[..., Awaitable[Any]]
_PROGRESS_EVERY_S = 10.0
_FETCHES_AT_ONCE = 8
_BATCH = 32


class JobRun:
    def __init__(
        self,
        job: JobRecord,
        call: StoreCall,
        fetcher: ImageFetcher,
        settings: Settings,
        metrics: Metrics,
        owner: str,
    ):
        """`call(method, *args)`: a store method, run off the event loop."""
        self.job, self.call, self.fetcher, self.settings, self.metrics = job, call, fetcher, settings, metrics
        self.owner = owner
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"reembed-{job.id[-6:]}")
        self._encoder: BulkEncoder | None = None
        self._moved = 0
        self._started = time.monotonic()
        self._logged = time.monotonic()
        self._next_at = time.monotonic()

    @property
    def name(self) -> str:
        return f"re-embed {self.job.id} of {self.job.collection!r} ({self.job.origin.ref} -> {self.job.target.ref})"

    async def run(self) -> None:
        """Move the collection (or, for a switched job whose grace is over, drop the previous space)."""
        beat = asyncio.get_running_loop().create_task(self._heartbeat(asyncio.current_task()))
        try:
            if self.job.state == "switched":
                await self.call("finish_job", self.job.id, self.owner)
                log.info("%s: grace period over, %s given up", self.name, self.job.origin.ref)
                return
            await self._move()
        except LeaseLostError:
            log.info("%s: no longer run here (cancelled, or taken over)", self.name)
        except Unavailable as exc:  # the store, for a while: the job goes on from its cursor later
            log.warning("%s: paused: %s", self.name, exc.message)
            with contextlib.suppress(ServiceError):
                await self.call("release_job", self.job.id, self.owner)
        except ServiceError as exc:
            await self._fail(exc.message)
        except Exception as exc:  # a job must end in a state people can read, whatever broke
            log.exception("%s failed", self.name)
            await self._fail(f"{type(exc).__name__}: {exc}")
        finally:
            beat.cancel()
            if self._encoder is not None:
                await asyncio.get_running_loop().run_in_executor(self._executor, self._encoder.close)
            self._executor.shutdown(wait=False)

    async def _fail(self, message: str) -> None:
        log.error("%s failed: %s", self.name, message)
        try:
            await self.call("fail_job", self.job.id, self.owner, message)
        except (LeaseLostError, ServiceError) as exc:
            log.warning("%s: could not record the failure: %s", self.name, exc)

    async def _heartbeat(self, run: asyncio.Task | None) -> None:
        """Keep the lease; a job that is no longer ours stops the run. A store outage only delays it."""
        interval = max(0.1, self.settings.reembed_lease_s / 3)
        while True:
            await asyncio.sleep(interval)
            try:
                job = await self.call("heartbeat_job", self.job.id, self.owner)
            except ServiceError as exc:
                log.warning("%s: heartbeat failed: %s", self.name, exc.message)
                continue
            if job is None:
                log.info("%s: the job is no longer this replica's", self.name)
                if run is not None:
                    run.cancel()
                return
            self.job = job

    # Moving ----------------------------------------------------------------------------------------

    async def _move(self) -> None:
        self._encoder = await self._load_encoder()
        await self.call("begin_space", self.job.id, self.owner)
        self._started = time.monotonic()  # the rate: items moved over the time spent moving them
        log.info(
            "%s: started at %s (%d items)", self.name, self.job.cursor or "the first item", self.job.total
        )
        cursor = self.job.cursor if self.job.state == "running" else ""
        while True:
            await self._pass(cursor)
            blockers, total = await self.call("job_blockers", self.job.id)
            if blockers.embeddable:  # written since its pass began without this space's vectors
                cursor = ""
                continue
            if blockers.blocking and not self.job.drop_unembeddable:
                await self.call("set_job_state", self.job.id, self.owner, "waiting", blockers, total)
                log.info(
                    "%s: waiting: %d items added as bare vectors and %d whose source failed cannot move; "
                    "re-add them, or ask again with drop_unembeddable",
                    self.name,
                    blockers.unembeddable,
                    blockers.errored,
                )
                await asyncio.sleep(self.settings.reembed_poll_s)
                job = await self.call("heartbeat_job", self.job.id, self.owner)
                if job is None:
                    raise LeaseLostError(f"job {self.job.id} is no longer run by this replica")
                self.job, cursor = job, ""
                continue
            await self.call("prepare_switch", self.job.id, self.settings.reembed_threads)
            if await self.call("switch", self.job.id, self.owner, self.settings.reembed_grace_s):
                log.info(
                    "%s: switched, %d items in %.1f s; %s kept for rollback for %.0f s",
                    self.name,
                    total,
                    time.monotonic() - self._started,
                    self.job.origin.ref,
                    self.settings.reembed_grace_s,
                )
                return
            cursor = ""

    async def _load_encoder(self) -> BulkEncoder:
        target = self.job.target
        encoder = await asyncio.get_running_loop().run_in_executor(
            self._executor,
            lambda: BulkEncoder.load(
                self.settings.models_dir,
                target.ref,
                threads=self.settings.reembed_threads,
                batch_size=_BATCH,
                settings=self.settings,
            ),
        )
        if encoder.content_hash != target.content_hash:
            encoder.close()
            raise ServiceError(
                f"the bundle published as {target.ref} is not the one this job was started with "
                f"({encoder.content_hash[:12]}, not {target.content_hash[:12]})"
            )
        return encoder

    async def _pass(self, cursor: str) -> None:
        """Every item after the cursor that still lacks the target's vector, chunk by chunk. The store's
        work overlaps the encoding: the next chunk is read, and the last one committed, while this one
        is embedded on the job's thread (commits stay in order, so the cursor only moves forward)."""
        size = self.settings.reembed_chunk
        items = await self.call("job_chunk", self.job.id, cursor, size)
        embedding: asyncio.Future | None = None
        committing: asyncio.Future | None = None
        try:
            while items:
                await self._pace(len(items))
                embedding = asyncio.ensure_future(self._embed(items))
                following = await self.call("job_chunk", self.job.id, items[-1].key, size)
                embedded = await embedding
                if committing is not None:
                    await committing
                committing = asyncio.ensure_future(self._commit(items, *embedded))
                items = following
            if committing is not None:
                await committing
        finally:
            for pending in (embedding, committing):
                if pending is not None and not pending.done():
                    pending.cancel()

    async def _commit(
        self, items: list[ChunkItem], vectors: np.ndarray, ok: list[int], errors: list[ItemError]
    ) -> None:
        elapsed = max(1e-6, time.monotonic() - self._started)
        self._moved += len(items)
        rate = self._moved / elapsed
        await self.call(
            "write_job_chunk",
            self.job.id,
            self.owner,
            [items[i] for i in ok],
            vectors,
            errors,
            items[-1].key,
            rate,
        )
        self.metrics.reembedded.labels(result="moved").inc(len(ok))
        if errors:
            self.metrics.reembedded.labels(result="failed").inc(len(errors))
        self.job.done += len(items)
        self._log_progress(rate)

    async def _pace(self, count: int) -> None:
        """At most `reembed_rate` items a second, chunk by chunk."""
        rate = self.settings.reembed_rate
        if rate <= 0:
            return
        now = time.monotonic()
        if self._next_at > now:
            await asyncio.sleep(self._next_at - now)
        self._next_at = max(now, self._next_at) + count / rate

    def _log_progress(self, rate: float) -> None:
        now = time.monotonic()
        if now - self._logged < _PROGRESS_EVERY_S:
            return
        self._logged = now
        total = max(self.job.total, self.job.done)
        left = max(0, total - self.job.done)
        log.info(
            "%s: %d/%d items, %.1f items/s, about %.0f s to go",
            self.name,
            self.job.done,
            total,
            rate,
            left / rate if rate else float("nan"),
        )

    async def _embed(self, items: list[ChunkItem]) -> tuple[np.ndarray, list[int], list[ItemError]]:
        """The target's vectors of the items that embed (rows in `ok` order), and the errors of the rest."""
        images = await self._image_bytes(items)
        texts = {i: item.source.value for i, item in enumerate(items) if item.source.kind == "text"}
        assert self._encoder is not None
        encoder, dim = self._encoder, self.job.target.dim

        def encode() -> tuple[np.ndarray, list[int], list[ItemError]]:
            out = np.zeros((len(items), encoder.dim), dtype=np.float32)
            failed: dict[int, ItemError] = {}
            for positions, encoded in (
                (list(texts), encoder.encode_texts(list(texts.values()))),
                (list(images), encoder.encode_images(list(images.values()))),
            ):
                if not positions:
                    continue
                out[positions] = encoded.vectors
                for error in encoded.errors:
                    at = positions[error.index]
                    failed[at] = ItemError(items[at].item_id, error.code, error.message)
            ok = [i for i in range(len(items)) if i not in failed]
            vectors = out[ok]
            if dim < encoder.dim:  # a collection keeps the dimensions it was made with
                vectors = normalize(vectors[:, :dim])
            return vectors, ok, list(failed.values())

        return await asyncio.get_running_loop().run_in_executor(self._executor, encode)

    async def _image_bytes(self, items: list[ChunkItem]) -> dict[int, bytes | ServiceError]:
        """Each image item's bytes: read back from the store, or fetched; an error stands for one that
        cannot be had."""
        stored = {i: item.source.stored_image for i, item in enumerate(items) if item.source.stored_image}
        found = await self.call("images", self.job.collection, list(stored.values())) if stored else {}
        out: dict[int, bytes | ServiceError] = {}
        for i, digest in stored.items():
            data = found.get(digest)
            out[i] = (
                data
                if data is not None
                else InvalidImage(f"the stored bytes of image {digest[:12]} are gone")
            )
        urls = {
            i: item.source.value
            for i, item in enumerate(items)
            if item.source.kind == "image" and i not in stored
        }
        gate = asyncio.Semaphore(_FETCHES_AT_ONCE)

        async def fetch(url: str) -> bytes | ServiceError:
            async with gate:
                try:
                    return (await self.fetcher.load([url]))[0]
                except ServiceError as exc:
                    return exc

        fetched = await asyncio.gather(*(fetch(url) for url in urls.values()))
        out.update(zip(urls, fetched, strict=True))
        return dict(sorted(out.items()))
