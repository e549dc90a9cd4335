"""Re-embed jobs: POST /v1/collections/{name}/reembed and /rollback, GET and DELETE /v1/jobs
(`clipserve.service.jobs`)."""

from __future__ import annotations

from fastapi import APIRouter, Query, Response

from clipserve.service.api.common import error_responses
from clipserve.service.api.deps import JobsDep
from clipserve.service.api.schemas import Job, JobItemError, JobList, ReembedRequest, RollbackRequest
from clipserve.service.stores.jobs import ItemError, JobRecord

router = APIRouter(tags=["jobs"])
_ERRORS = error_responses(401, 404, 409, 422, 503)


def job_view(job: JobRecord, errors: list[ItemError] | None = None) -> Job:
    total = max(job.total, job.done)
    left = total - job.done
    eta = left / job.rate if job.rate and job.state in ("running", "pending") else None
    return Job(
        id=job.id,
        collection=job.collection,
        state=job.state,
        model=job.target.ref,
        from_model=job.origin.ref,
        auto=job.auto,
        drop_unembeddable=job.drop_unembeddable,
        done=job.done,
        total=total,
        rate=job.rate,
        eta_s=None if eta is None else round(eta, 1),
        errors=job.errors,
        error_samples=[JobItemError(id=e.item_id, type=e.code, message=e.message) for e in errors or []],
        unembeddable=job.unembeddable,
        unembeddable_ids=job.unembeddable_ids,
        owner=job.owner,
        created_at=job.created_at,
        started_at=job.started_at,
        switched_at=job.switched_at,
        finished_at=job.finished_at,
        keep_until=job.keep_until,
        message=job.message,
    )


@router.post(
    "/v1/collections/{name}/reembed",
    status_code=202,
    responses=_ERRORS,
    summary="Re-embed a collection in the background",
)
async def reembed(name: str, response: Response, jobs: JobsDep, body: ReembedRequest | None = None) -> Job:
    """Start a job that embeds every item again with another model version, beside the vectors that keep
    answering searches, then switches the collection at once; or update the job already doing it
    (`drop_unembeddable`). Its progress: GET /v1/jobs/{id} (the `Location`)."""
    body = body or ReembedRequest()
    job = await jobs.reembed(name, body.model, body.drop_unembeddable)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job_view(job)


@router.post("/v1/collections/{name}/rollback", responses=_ERRORS, summary="Roll a re-embed back")
async def rollback(name: str, jobs: JobsDep, body: RollbackRequest | None = None) -> Job:
    """Bind the collection back to the space its last switch moved it from, while that space is kept
    (the grace period; every write went to both)."""
    return job_view(await jobs.rollback(name, (body or RollbackRequest()).drop_unembeddable))


@router.get("/v1/jobs", responses=_ERRORS, summary="List jobs")
async def list_jobs(
    jobs: JobsDep,
    collection: str | None = Query(None, description="only this collection's"),
    limit: int = Query(100, ge=1, le=1000, description="the newest this many"),
) -> JobList:
    """Re-embed jobs, newest first."""
    return JobList(data=[job_view(job) for job in await jobs.list_all(collection, limit)])


@router.get("/v1/jobs/{job_id}", responses=_ERRORS, summary="A job's progress")
async def get_job(job_id: str, jobs: JobsDep) -> Job:
    """State, items done and total, rate, time to go, errors with their first items, unembeddable items."""
    job, errors = await jobs.get(job_id)
    return job_view(job, errors)


@router.delete("/v1/jobs/{job_id}", responses=_ERRORS, summary="Cancel a job")
async def cancel_job(job_id: str, jobs: JobsDep) -> Job:
    """Stop a job before its switch; the collection stays where it was. After the switch: 409, roll back."""
    return job_view(await jobs.cancel(job_id))
