"""/v1/collections: persistent collections searchable by text, image or vector.

A collection is bound to the embedding space (bundle content hash) of the model it was created with.
Writes and searches use the model now served under that name; when it is a different space, they are
refused with 409 `model_mismatch` until `POST /v1/collections/{name}/reembed` re-embeds the items
from their stored sources. Texts are always kept; an image is kept when given as a URL (inline base64
images are not stored, so items added that way, or as raw vectors, cannot be re-embedded).

Conventions: upsert by id, the last of duplicate ids in one call wins; a filter is an equality test on
top-level metadata fields, and a field no item has matches nothing (empty results, not an error).
The store (embedded FAISS + SQLite, or pgvector) is opened on first use and closed in this router's lifespan.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal, TypeVar

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.concurrency import run_in_threadpool

from service.api.common import check_images, get_fetcher, get_settings, unless_disconnected
from service.api.rank import ERRORS, Query, check_item_texts, check_top_k, embed_mixed, embed_query
from service.errors import ApiError
from service.index import (
    BackendUnavailableError,
    CollectionExistsError,
    CollectionInfo,
    CollectionNotFoundError,
    CollectionStore,
    IndexParams,
    IndexStoreError,
    InvalidInputError,
    ItemNotFoundError,
    ModelBinding,
    ModelMismatchError,
    Source,
    open_store,
)
from service.inputs import ImageFetcher
from service.registry import ModelRegistry, ServedModel, get_registry
from service.settings import Settings

log = logging.getLogger("clipserve.collections")
T = TypeVar("T")

_STORE_ERRORS: dict[type[IndexStoreError], tuple[int, str]] = {
    CollectionNotFoundError: (404, "collection_not_found"),
    ItemNotFoundError: (404, "item_not_found"),
    CollectionExistsError: (409, "collection_exists"),
    ModelMismatchError: (409, "model_mismatch"),
    InvalidInputError: (422, "invalid_request"),
    BackendUnavailableError: (503, "collections_unavailable"),
}


class StoreHolder:
    """Opens the configured store on first use, so an app that never touches collections creates no
    files and needs no PostgreSQL; a store that failed to open is tried again on the next request."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.store: CollectionStore | None = None
        self._opening = asyncio.Lock()

    async def get(self) -> CollectionStore:
        if self.store is None:
            async with self._opening:
                if self.store is None:
                    self.store = await self._open()
        return self.store

    async def _open(self) -> CollectionStore:
        s = self.settings
        try:
            return await run_in_threadpool(
                open_store, s.collections_backend, data_dir=s.data_dir, dsn=s.postgres_dsn
            )
        except IndexStoreError as exc:
            log.error("collections are unavailable: %s", exc.message)
            raise ApiError(503, "collections_unavailable", exc.message) from exc

    async def close(self) -> None:
        if self.store is not None:
            await run_in_threadpool(self.store.close)
            self.store = None


@contextlib.asynccontextmanager
async def collections_lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.collections = StoreHolder(app.state.settings)
    try:
        yield
    finally:
        await app.state.collections.close()


router = APIRouter(tags=["retrieval"], lifespan=collections_lifespan)


async def get_store(request: Request) -> CollectionStore:
    holder: StoreHolder | None = getattr(request.app.state, "collections", None)
    if holder is None:
        raise ApiError(503, "collections_unavailable", "the app was started without its lifespan")
    return await holder.get()


async def call_store(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a blocking store call off the event loop; its errors become API errors."""
    try:
        return await run_in_threadpool(function, *args, **kwargs)
    except IndexStoreError as exc:
        status, kind = next(code for cls, code in _STORE_ERRORS.items() if isinstance(exc, cls))
        raise ApiError(status, kind, exc.message, index=exc.index) from exc


# schemas


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class IndexOptions(_Strict):
    m: int | None = Field(None, description="HNSW links per node")
    ef_construction: int | None = Field(None, description="HNSW build candidate list")
    ef_search: int | None = Field(None, description="HNSW search candidate list")
    nlist: int | None = Field(None, description="IVF lists")
    nprobe: int | None = Field(None, description="IVF lists visited per search")


class CreateCollection(_Strict):
    name: str
    model: str | None = Field(None, description="name or name@version; the default model when absent")
    index: Literal["flat", "hnsw", "ivf"] = "flat"
    index_params: IndexOptions = Field(default_factory=IndexOptions)


class Item(_Strict):
    id: str | int
    text: str | None = None
    image: str | None = None
    vector: list[float] | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _exactly_one(self) -> Item:
        given = [name for name in ("text", "image", "vector") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of text, image or vector (got {', '.join(given) or 'none'})")
        return self


class UpsertItems(_Strict):
    items: list[Item] = Field(min_length=1)


class SearchRequest(Query):
    top_k: int = 10
    filter: dict[str, Any] | None = Field(None, description="field: value, all must be equal")


class ReembedRequest(_Strict):
    model: str | None = Field(
        None, description="model to move to; the one now served under the collection's name"
    )


class CollectionDescription(BaseModel):
    name: str
    count: int
    model: str
    version: int
    content_hash: str = Field(description="bundle content hash: the collection's embedding space")
    dim: int
    index: IndexParams
    created_at: str
    model_status: Literal["current", "stale", "not_served"] = Field(
        description="current: the served model shares the collection's space; stale: search is refused "
        "until re-embedded; not_served: no model of that name is served"
    )


class CollectionList(BaseModel):
    collections: list[CollectionDescription]


class CollectionDeleted(BaseModel):
    name: str
    deleted: bool = True


class Upserted(BaseModel):
    upserted: int = Field(description="distinct ids written (the last of duplicate ids wins)")


class StoredSource(BaseModel):
    kind: Literal["text", "image"]
    value: str


class ItemView(BaseModel):
    id: str
    metadata: dict[str, Any]
    source: StoredSource | None = Field(description="what the item was embedded from, if kept")
    vector: list[float]


class ItemDeleted(BaseModel):
    id: str
    deleted: bool = True


class Hit(BaseModel):
    id: str
    score: float = Field(description="cosine similarity")
    metadata: dict[str, Any]


class SearchResponse(BaseModel):
    model: str
    version: int
    dim: int
    results: list[Hit]


class Reembedded(BaseModel):
    name: str
    reembedded: int
    model: str
    version: int


# helpers


def _describe(info: CollectionInfo, registry: ModelRegistry) -> CollectionDescription:
    return CollectionDescription(
        name=info.name,
        count=info.count,
        model=info.binding.model,
        version=info.binding.version,
        content_hash=info.binding.content_hash,
        dim=info.binding.dim,
        index=info.index,
        created_at=info.created_at,
        model_status=_model_status(info, registry),
    )


def _model_status(info: CollectionInfo, registry: ModelRegistry) -> Literal["current", "stale", "not_served"]:
    """current: the served model shares the collection's space; stale: it does not; not_served."""
    served = next((m for m in registry.models() if m.name == info.binding.model), None)
    if served is None:
        return "not_served"
    return "current" if served.content_hash == info.binding.content_hash else "stale"


def _served_for(name: str, binding: ModelBinding, registry: ModelRegistry) -> ServedModel:
    """The model serving this collection's space, or a 409 saying how to get back to it."""
    try:
        served = registry.resolve(binding.model)
    except ApiError as exc:
        if exc.status_code != 404:
            raise
        raise ApiError(
            409,
            "model_not_served",
            f"collection {name!r} was built with {binding.model}@{binding.version}, which is not served here",
        ) from exc
    if served.content_hash != binding.content_hash:
        raise ApiError(
            409,
            "model_mismatch",
            f"collection {name!r} holds vectors of {binding.model}@{binding.version}, but "
            f"{served.ref} is served now, a different embedding space; POST /v1/collections/{name}/reembed "
            "re-embeds it from its stored texts and image URLs",
        )
    return served


def _source(item: Item) -> Source | None:
    if item.text is not None:
        return Source("text", item.text)
    if item.image is not None and item.image.strip()[:8].lower().startswith(("http://", "https://")):
        return Source("image", item.image.strip())
    return None


def _index_params(body: CreateCollection) -> IndexParams:
    try:
        return IndexParams(kind=body.index, **body.index_params.model_dump(exclude_none=True))
    except ValidationError as exc:
        problems = "; ".join(
            f"index_params.{'.'.join(map(str, e['loc'])) or 'index'}: {e['msg']}" for e in exc.errors()
        )
        raise ApiError(422, "invalid_request", problems) from exc


# routes


@router.post("/v1/collections", status_code=201, responses=ERRORS, summary="Create a collection")
async def create_collection(
    body: CreateCollection,
    registry: ModelRegistry = Depends(get_registry),
    store: CollectionStore = Depends(get_store),
) -> CollectionDescription:
    """Bind a new collection to a served model's embedding space, with a flat, HNSW or IVF index."""
    params = _index_params(body)
    model = registry.resolve(body.model)
    binding = ModelBinding(model.name, model.version, model.content_hash, model.dim)
    info = await call_store(store.create_collection, body.name, binding, params)
    return _describe(info, registry)


@router.get("/v1/collections", responses=ERRORS, summary="List collections")
async def list_collections(
    registry: ModelRegistry = Depends(get_registry), store: CollectionStore = Depends(get_store)
) -> CollectionList:
    return CollectionList(
        collections=[_describe(info, registry) for info in await call_store(store.list_collections)]
    )


@router.get("/v1/collections/{name}", responses=ERRORS, summary="Describe a collection")
async def describe_collection(
    name: str, registry: ModelRegistry = Depends(get_registry), store: CollectionStore = Depends(get_store)
) -> CollectionDescription:
    """Count, model, version, bundle hash, index kind and parameters, and whether the served model matches."""
    return _describe(await call_store(store.describe, name), registry)


@router.delete("/v1/collections/{name}", responses=ERRORS, summary="Delete a collection")
async def drop_collection(name: str, store: CollectionStore = Depends(get_store)) -> CollectionDeleted:
    await call_store(store.drop_collection, name)
    return CollectionDeleted(name=name)


@router.post("/v1/collections/{name}/items", responses=ERRORS, summary="Add or replace items")
async def upsert_items(
    name: str,
    body: UpsertItems,
    request: Request,
    registry: ModelRegistry = Depends(get_registry),
    fetcher: ImageFetcher = Depends(get_fetcher),
    settings: Settings = Depends(get_settings),
    store: CollectionStore = Depends(get_store),
) -> Upserted:
    """Upsert by id (the last of duplicate ids wins); texts and images go through the /v1/embed batchers."""
    model = _served_for(name, await call_store(store.binding, name), registry)
    texts = {i: item.text for i, item in enumerate(body.items) if item.text is not None}
    images = {i: item.image for i, item in enumerate(body.items) if item.image is not None}
    check_item_texts(texts, settings, field="items")
    check_images(len(images), settings, field="items (images)")
    for position, item in enumerate(body.items):
        if item.vector is not None and len(item.vector) != model.dim:
            raise ApiError(
                422,
                "invalid_vector",
                f"items[{position}].vector has {len(item.vector)} dimensions, the collection's space has {model.dim}",
                index=position,
            )
    vectors = await unless_disconnected(
        request, embed_mixed(model, texts, images, len(body.items), fetcher, "items")
    )
    for position, item in enumerate(body.items):
        if item.vector is not None:
            vectors[position] = np.asarray(item.vector, dtype=np.float32)
    upserted = await call_store(
        store.upsert,
        name,
        [str(item.id) for item in body.items],
        vectors,
        content_hash=model.content_hash,
        metadata=[item.metadata for item in body.items],
        sources=[_source(item) for item in body.items],
    )
    return Upserted(upserted=upserted)


@router.get("/v1/collections/{name}/items/{item_id:path}", responses=ERRORS, summary="Get an item")
async def get_item(name: str, item_id: str, store: CollectionStore = Depends(get_store)) -> ItemView:
    item = await call_store(store.get, name, item_id)
    source = None if item.source is None else StoredSource(kind=item.source.kind, value=item.source.value)
    return ItemView(id=item.id, metadata=item.metadata, source=source, vector=item.vector.tolist())


@router.delete("/v1/collections/{name}/items/{item_id:path}", responses=ERRORS, summary="Delete an item")
async def delete_item(name: str, item_id: str, store: CollectionStore = Depends(get_store)) -> ItemDeleted:
    await call_store(store.delete, name, item_id)
    return ItemDeleted(id=item_id)


@router.post("/v1/collections/{name}/search", responses=ERRORS, summary="Search a collection")
async def search(
    name: str,
    body: SearchRequest,
    request: Request,
    registry: ModelRegistry = Depends(get_registry),
    fetcher: ImageFetcher = Depends(get_fetcher),
    settings: Settings = Depends(get_settings),
    store: CollectionStore = Depends(get_store),
) -> SearchResponse:
    """Nearest items by cosine similarity to a text, an image or a vector, optionally filtered on metadata."""
    check_top_k(body.top_k, settings)
    model = _served_for(name, await call_store(store.binding, name), registry)
    query = await unless_disconnected(request, embed_query(model, body, fetcher, settings))
    hits = await call_store(
        store.search, name, query, content_hash=model.content_hash, top_k=body.top_k, filter=body.filter
    )
    return SearchResponse(
        model=model.name,
        version=model.version,
        dim=model.dim,
        results=[Hit(id=hit.id, score=hit.score, metadata=hit.metadata) for hit in hits],
    )


@router.post("/v1/collections/{name}/reembed", responses=ERRORS, summary="Re-embed a collection")
async def reembed(
    name: str,
    request: Request,
    body: ReembedRequest | None = None,
    registry: ModelRegistry = Depends(get_registry),
    fetcher: ImageFetcher = Depends(get_fetcher),
    settings: Settings = Depends(get_settings),
    store: CollectionStore = Depends(get_store),
) -> Reembedded:
    """Move the collection to the served model's space, embedding every item again from its stored source."""
    info = await call_store(store.describe, name)
    model = registry.resolve(body.model if body and body.model else info.binding.model)
    if model.content_hash == info.binding.content_hash:
        return Reembedded(name=name, reembedded=0, model=model.name, version=model.version)
    pairs = await call_store(lambda: [pair for page in store.iter_sources(name) for pair in page])
    missing = [item_id for item_id, source in pairs if source is None]
    if missing:
        raise ApiError(
            409,
            "cannot_reembed",
            f"{len(missing)} of {len(pairs)} items of {name!r} have no stored text or image URL "
            f"(e.g. {missing[0]!r}: added as a vector or an inline image); re-add them or recreate the collection",
        )
    vectors = await unless_disconnected(
        request, _embed_sources(model, [s for _, s in pairs], fetcher, settings)
    )
    binding = ModelBinding(model.name, model.version, model.content_hash, model.dim)
    await call_store(store.rebind, name, binding, [item_id for item_id, _ in pairs], vectors)
    return Reembedded(name=name, reembedded=len(pairs), model=model.name, version=model.version)


async def _embed_sources(
    model: ServedModel, sources: list[Source | None], fetcher: ImageFetcher, settings: Settings
) -> np.ndarray:
    """Every source embedded in chunks the size of one request, through the same batchers."""
    out = np.zeros((len(sources), model.dim), dtype=np.float32)
    chunk = min(settings.max_texts_per_request, settings.max_images_per_request)
    for start in range(0, len(sources), chunk):
        part = sources[start : start + chunk]
        texts = {i: s.value for i, s in enumerate(part) if s is not None and s.kind == "text"}
        images = {i: s.value for i, s in enumerate(part) if s is not None and s.kind == "image"}
        out[start : start + len(part)] = await embed_mixed(
            model, texts, images, len(part), fetcher, "stored sources"
        )
    return out
