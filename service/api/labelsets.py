"""Named label sets: PUT computes the class matrix once and shares it with every replica."""

from __future__ import annotations

from fastapi import APIRouter, Response

from clipserve.service.api.common import error_responses
from clipserve.service.api.deps import LabelSetsDep
from clipserve.service.api.schemas import LabelSetInfo, LabelSetList, LabelSetRequest, LabelSetWarming
from clipserve.service.labelsets import LabelSetStatus
from clipserve.service.stores.labelset_store import check_definition

router = APIRouter(tags=["label sets"])
_ERRORS = error_responses(401, 404, 413, 422, 503)


def _info(state: LabelSetStatus) -> LabelSetInfo:
    """The same shape from every route: the labels as they were given, and their count."""
    labelset = state.labelset
    return LabelSetInfo(
        name=labelset.name,
        model=labelset.model,
        labels=list(labelset.labels),
        label_count=len(labelset.labels),
        templates=list(labelset.templates),
        status=state.status,
        progress=state.progress,
        queue_position=state.queue_position,
        error=state.error,
        serving=state.serving,
        warming=None
        if state.warming is None
        else LabelSetWarming(
            model=state.warming.version or "", status=state.warming.status, progress=state.warming.progress
        ),
        created_at=labelset.created_at,
    )


@router.put(
    "/v1/labelsets/{name}",
    response_model=LabelSetInfo,
    responses={202: {"model": LabelSetInfo}, **_ERRORS},
    summary="Create or replace a label set",
)
async def put_labelset(
    name: str, body: LabelSetRequest, response: Response, labelsets: LabelSetsDep
) -> LabelSetInfo:
    """200 when the class matrix is ready; 202 while a large set builds (or waits to) in the background.
    Replacing a set stops the build of its previous labels."""
    check_definition(body.labels, body.templates if isinstance(body.templates, list) else [])
    state = await labelsets.put(name, body.labels, body.templates, body.model)
    response.status_code = 200 if state.status == "ready" else 202
    return _info(state)


@router.get("/v1/labelsets", response_model=LabelSetList, responses=_ERRORS, summary="List label sets")
async def list_labelsets(labelsets: LabelSetsDep) -> LabelSetList:
    """Every stored label set, with its labels, templates and build status."""
    return LabelSetList(labelsets=[_info(state) for state in await labelsets.list_all()])


@router.get("/v1/labelsets/{name}", response_model=LabelSetInfo, responses=_ERRORS, summary="Get a label set")
async def get_labelset(name: str, labelsets: LabelSetsDep) -> LabelSetInfo:
    """One label set: its labels as they were given, templates, model and build status."""
    return _info(await labelsets.get(name))


@router.delete("/v1/labelsets/{name}", status_code=204, responses=_ERRORS, summary="Delete a label set")
async def delete_labelset(name: str, labelsets: LabelSetsDep) -> Response:
    """Delete the label set, stop its builds and remove its class matrices; 204 when done."""
    await labelsets.delete(name)
    return Response(status_code=204)
