"""/v1/collections: persistent collections searchable by text, image or vector (`clipserve.service.collections`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Request

from clipserve.service.api.bodies import body_of, documented
from clipserve.service.api.common import error_responses, unless_disconnected
from clipserve.service.api.deps import CollectionsDep
from clipserve.service.api.schemas import (
    CollectionDeleted,
    CollectionDescription,
    CollectionList,
    CreateCollection,
    ItemDeleted,
    ItemView,
    SearchRequest,
    SearchResponse,
    Upserted,
    UpsertItems,
)

router = APIRouter(tags=["retrieval"])
_ERRORS = error_responses(400, 401, 404, 409, 413, 422, 429, 503)


@router.post("/v1/collections", status_code=201, responses=_ERRORS, summary="Create a collection")
async def create_collection(body: CreateCollection, collections: CollectionsDep) -> CollectionDescription:
    """Bind a new collection to a served model's embedding space, with a flat, HNSW or IVF index."""
    return await collections.create(body)


@router.get("/v1/collections", responses=_ERRORS, summary="List collections")
async def list_collections(collections: CollectionsDep) -> CollectionList:
    """Every collection with its count, model, index and whether the served model still matches."""
    return CollectionList(collections=await collections.list_all())


@router.get("/v1/collections/{name}", responses=_ERRORS, summary="Describe a collection")
async def describe_collection(name: str, collections: CollectionsDep) -> CollectionDescription:
    """Count, model, version, bundle hash, index kind and parameters, and whether the served model matches."""
    return await collections.describe(name)


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
    return Upserted(upserted=await unless_disconnected(request, collections.upsert(name, body)))


@router.get("/v1/collections/{name}/items/{item_id:path}", responses=_ERRORS, summary="Get an item")
async def get_item(name: str, item_id: str, collections: CollectionsDep) -> ItemView:
    """One item: its metadata, what it was embedded from (when kept) and its vector."""
    return await collections.get_item(name, item_id)


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
    engine, hits = await unless_disconnected(request, collections.search(name, body))
    return SearchResponse(model=engine.name, version=engine.version, dim=engine.dim, results=hits)
