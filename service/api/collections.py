"""/v1/collections: persistent collections searchable by text, image or vector (`clipserve.service.collections`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Request

from clipserve.service.api.bodies import body_of, documented
from clipserve.service.api.common import as_input, error_responses, model_header, unless_disconnected
from clipserve.service.api.deps import CollectionsDep
from clipserve.service.api.schemas import (
    CollectionDeleted,
    CollectionDescription,
    CollectionList,
    CreateCollection,
    Hit,
    Item,
    ItemDeleted,
    ItemView,
    JobSummary,
    PreviousSpace,
    SearchRequest,
    SearchResponse,
    StoredSource,
    Upserted,
    UpsertItems,
)
from clipserve.service.collections import CollectionView, NewItem
from clipserve.service.stores.jobs import JobRecord

router = APIRouter(tags=["retrieval"])
_ERRORS = error_responses(400, 401, 404, 409, 413, 422, 429, 503)


def job_summary(job: JobRecord) -> JobSummary:
    return JobSummary(
        id=job.id,
        state=job.state,
        model=job.target.model,
        version=job.target.version,
        done=min(job.done, job.total),
        total=job.total,
    )


def description(view: CollectionView) -> CollectionDescription:
    info, job, previous = view.info, view.job, view.previous
    return CollectionDescription(
        name=info.name,
        count=info.count,
        model=info.binding.model,
        version=info.binding.version,
        content_hash=info.binding.content_hash,
        dim=info.binding.dim,
        index=info.index,
        created_at=info.created_at,
        model_status=view.model_status,
        on_model_update=info.policy,
        job=None if job is None else job_summary(job),
        previous=None
        if previous is None or job is None
        else PreviousSpace(model=previous.model, version=previous.version, until=job.keep_until),
    )


def _new_item(item: Item) -> NewItem:
    return NewItem(str(item.id), item.text, item.image, item.vector, item.metadata)


@router.post("/v1/collections", status_code=201, responses=_ERRORS, summary="Create a collection")
async def create_collection(body: CreateCollection, collections: CollectionsDep) -> CollectionDescription:
    """Bind a new collection to a served model's embedding space, with a flat, HNSW or IVF index."""
    view = await collections.create(
        body.name,
        model=body.model,
        dimensions=body.dimensions,
        index=body.index,
        index_params=body.index_params.model_dump(exclude_none=True),
        on_model_update=body.on_model_update,
    )
    return description(view)


@router.get("/v1/collections", responses=_ERRORS, summary="List collections")
async def list_collections(collections: CollectionsDep) -> CollectionList:
    """Every collection with its count, model, index and whether the served model still matches."""
    return CollectionList(collections=[description(view) for view in await collections.list_all()])


@router.get("/v1/collections/{name}", responses=_ERRORS, summary="Describe a collection")
async def describe_collection(name: str, collections: CollectionsDep) -> CollectionDescription:
    """Count, model, version, bundle hash, index kind and parameters, and whether the served model matches."""
    return description(await collections.describe(name))


@router.delete("/v1/collections/{name}", responses=_ERRORS, summary="Delete a collection")
async def drop_collection(name: str, collections: CollectionsDep) -> CollectionDeleted:
    """Delete the collection and all its items."""
    await collections.drop(name)
    return CollectionDeleted(name=name)


@router.post(
    "/v1/collections/{name}/items",
    responses=_ERRORS,
    summary="Add or replace items",
    openapi_extra=documented(UpsertItems, {"items": "image files; each file's name is its item's id"}),
)
async def upsert_items(
    name: str,
    request: Request,
    collections: CollectionsDep,
    body: Annotated[UpsertItems, body_of(UpsertItems)],
) -> Upserted:
    """Upsert by id (the last of duplicate ids wins); texts and images go through the /v1/embed batchers.
    A plain string is a text item whose id is the text; a multipart form takes image files under
    `items` (id and `metadata.file`: the file's name)."""
    work = collections.upsert(name, [_new_item(item) for item in body.items], body.content_hash)
    return Upserted(upserted=await unless_disconnected(request, work))


@router.get("/v1/collections/{name}/items/{item_id:path}", responses=_ERRORS, summary="Get an item")
async def get_item(name: str, item_id: str, collections: CollectionsDep) -> ItemView:
    """One item: its metadata, what it was embedded from (when kept) and its vector."""
    item = await collections.get_item(name, item_id)
    source = None if item.source is None else StoredSource(kind=item.source.kind, value=item.source.value)
    return ItemView(id=item.id, metadata=item.metadata, source=source, vector=item.vector.tolist())


@router.delete("/v1/collections/{name}/items/{item_id:path}", responses=_ERRORS, summary="Delete an item")
async def delete_item(name: str, item_id: str, collections: CollectionsDep) -> ItemDeleted:
    """Delete one item by id."""
    await collections.delete_item(name, item_id)
    return ItemDeleted(id=item_id)


@router.post(
    "/v1/collections/{name}/search",
    responses=_ERRORS,
    summary="Search a collection",
    openapi_extra=documented(SearchRequest, {"image": "the query image, as a file"}),
)
async def search(
    name: str,
    request: Request,
    collections: CollectionsDep,
    body: Annotated[SearchRequest, body_of(SearchRequest)],
) -> SearchResponse:
    """Nearest items by cosine similarity to a text, an image or a vector, optionally filtered on
    metadata; `top_k` of them, or fewer with `min_score`. JSON, or a form with the image as a file."""
    work = collections.search(
        name, as_input(body), top_k=body.top_k, filter=body.filter, min_score=body.min_score
    )
    engine, hits = await unless_disconnected(request, work)
    return SearchResponse(
        **model_header(engine), results=[Hit(id=h.id, score=h.score, metadata=h.metadata) for h in hits]
    )
