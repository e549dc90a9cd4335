"""Persistent collections searchable by text, image or vector: the operations behind /v1/collections.

A collection is bound to the embedding space (bundle content hash) of the model it was created with.
Writes and searches use the model now served under that name; when it is a different space, they are
refused with `model_mismatch` until `reembed` re-embeds the items from their stored sources. Every
item keeps its source: its text, its image URL, or its inline image's original bytes (in the store,
by sha256, each once per collection, up to `max_collection_image_bytes`); only items given as bare
vectors cannot be re-embedded. An item may bring its vector together with its text or image (bulk
indexers compute vectors themselves) when the request names the bundle that made it (`content_hash`,
which must be the collection's); the source is kept as for any item.

Conventions: upsert by id, the last of duplicate ids in one call wins; a filter is an equality test on
top-level metadata fields, and a field no item has matches nothing (empty results, not an error).
The store (embedded FAISS + SQLite, or pgvector) is opened on first use, so an app that never
touches collections creates no files and needs no PostgreSQL; a store that failed to open is tried
again on the next call. Store calls block, so they run in worker threads.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import anyio.to_thread
import numpy as np
from pydantic import ValidationError

from clipserve.service.api.schemas import (
    CollectionDescription,
    CreateCollection,
    Hit,
    Item,
    ItemView,
    SearchRequest,
    StoredSource,
    UpsertItems,
)
from clipserve.service.embedding import Embedder
from clipserve.service.errors import Conflict, InvalidInput, NotFound, TooLarge
from clipserve.service.inference.engine import ModelEngine
from clipserve.service.inference.inputs import is_url
from clipserve.service.inference.registry import ModelRegistry
from clipserve.service.limits import check_images, check_item_texts, check_top_k
from clipserve.service.metrics import Metrics
from clipserve.service.settings import Settings
from clipserve.service.stores import (
    BackendUnavailableError,
    CollectionInfo,
    CollectionStore,
    IndexParams,
    ModelBinding,
    Source,
    open_store,
)

log = logging.getLogger("clipserve.collections")
T = TypeVar("T")


class Collections:
    def __init__(self, registry: ModelRegistry, embedder: Embedder, settings: Settings, metrics: Metrics):
        self.registry, self.embedder, self.settings, self.metrics = registry, embedder, settings, metrics
        self._store: CollectionStore | None = None
        self._opening = asyncio.Lock()

    async def store(self) -> CollectionStore:
        if self._store is None:
            async with self._opening:
                if self._store is None:
                    s = self.settings
                    self._store = await self._blocking(
                        lambda: open_store(
                            s.collections_backend,
                            data_dir=s.data_dir,
                            dsn=s.postgres_dsn,
                            max_image_bytes=s.max_collection_image_bytes,
                        )
                    )
        return self._store

    async def _blocking(self, function: Callable[[], T]) -> T:
        try:
            return await anyio.to_thread.run_sync(function)
        except BackendUnavailableError as exc:
            self.metrics.store_errors.labels(store="collections").inc()
            log.error("%s", exc.message)
            raise

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        store = await self.store()
        return await self._blocking(lambda: getattr(store, method)(*args, **kwargs))

    async def close(self) -> None:
        if self._store is not None:
            await anyio.to_thread.run_sync(self._store.close)
            self._store = None

    # Operations -------------------------------------------------------------------------------------

    async def create(self, request: CreateCollection) -> CollectionDescription:
        """Bind a new collection to a served model's embedding space, with a flat, HNSW or IVF index."""
        params = _index_params(request)
        engine = self.registry.resolve(request.model)
        dim = engine.output_dim(request.dimensions)
        binding = ModelBinding(engine.name, engine.version, engine.content_hash, dim)
        return self._describe(await self._call("create_collection", request.name, binding, params))

    async def list_all(self) -> list[CollectionDescription]:
        return [self._describe(info) for info in await self._call("list_collections")]

    async def describe(self, name: str) -> CollectionDescription:
        return self._describe(await self._call("describe", name))

    async def drop(self, name: str) -> None:
        await self._call("drop_collection", name)

    async def upsert(self, name: str, request: UpsertItems) -> int:
        """Upsert by id (the last of duplicate ids wins). Texts and images are embedded through the
        batchers, except where an item brings its vector with its source; every item keeps its source."""
        binding = await self._call("binding", name)
        items = request.items
        _check_precomputed(name, request, binding)
        texts = {i: item.text for i, item in enumerate(items) if item.text is not None}
        images = {i: item.image for i, item in enumerate(items) if item.image is not None}
        check_item_texts(texts, self.settings, field="items")
        check_images(len(images), self.settings, field="items (images)")
        check_metadata(items, self.settings.max_metadata_bytes)
        for position, item in enumerate(items):
            if item.vector is not None and len(item.vector) != binding.dim:
                raise InvalidInput(
                    f"items[{position}].vector has {len(item.vector)} dimensions, "
                    f"the collection's space has {binding.dim}",
                    code="invalid_vector",
                    index=position,
                )
        # the bytes of every image to embed, and of every inline image (kept as its item's source)
        data = await self.embedder.load_images(
            {i: image for i, image in images.items() if items[i].vector is None or not is_url(image)}, "items"
        )
        to_embed = [i for i, item in enumerate(items) if item.vector is None]
        content_hash = request.content_hash
        vectors = np.zeros((len(items), binding.dim), dtype=np.float32)
        if content_hash is None or to_embed:
            engine = self._engine_for(name, binding)
            content_hash = engine.content_hash
            embedded = await self.embedder.encode_items(
                engine,
                {i: texts[i] for i in to_embed if i in texts},
                {i: data[i] for i in to_embed if i in data},
                len(items),
                "items",
            )
            vectors = engine.reduce(embedded, binding.dim)
        for position, item in enumerate(items):
            if item.vector is not None:
                vectors[position] = np.asarray(item.vector, dtype=np.float32)
        return await self._call(
            "upsert",
            name,
            [str(item.id) for item in items],
            vectors,
            content_hash=content_hash,
            metadata=[item.metadata for item in items],
            sources=[_source(item, data.get(position)) for position, item in enumerate(items)],
        )

    async def get_item(self, name: str, item_id: str) -> ItemView:
        item = await self._call("get", name, item_id)
        source = None if item.source is None else StoredSource(kind=item.source.kind, value=item.source.value)
        return ItemView(id=item.id, metadata=item.metadata, source=source, vector=item.vector.tolist())

    async def delete_item(self, name: str, item_id: str) -> None:
        await self._call("delete", name, item_id)

    async def search(self, name: str, request: SearchRequest) -> tuple[ModelEngine, list[Hit]]:
        """Nearest items by cosine to a text, an image or a vector, optionally filtered on metadata."""
        check_top_k(request.top_k, self.settings)
        binding = await self._call("binding", name)
        engine = self._engine_for(name, binding)
        query = await self.embedder.query(engine, request, binding.dim)
        hits = await self._call(
            "search",
            name,
            query,
            content_hash=engine.content_hash,
            top_k=request.top_k,
            filter=request.filter,
        )
        floor = request.min_score
        return engine, [
            Hit(id=hit.id, score=hit.score, metadata=hit.metadata)
            for hit in hits
            if floor is None or hit.score >= floor
        ]

    async def reembed(self, name: str, model: str | None) -> tuple[ModelEngine, int]:
        """Move the collection to the served model's space, embedding every item again from its source."""
        info = await self._call("describe", name)
        engine = self.registry.resolve(model or info.binding.model)
        if engine.content_hash == info.binding.content_hash:
            return engine, 0
        store = await self.store()
        pairs = await self._blocking(lambda: [pair for page in store.iter_sources(name) for pair in page])
        missing = [item_id for item_id, source in pairs if source is None]
        if missing:
            raise Conflict(
                f"{len(missing)} of {len(pairs)} items of {name!r} have no stored source "
                f"(e.g. {missing[0]!r}: added as a bare vector); re-add them or recreate the collection",
                code="cannot_reembed",
            )
        dim = min(info.binding.dim, engine.dim)  # a collection keeps the dimensions it was made with
        vectors = engine.reduce(await self._embed_sources(name, engine, [s for _, s in pairs]), dim)
        binding = ModelBinding(engine.name, engine.version, engine.content_hash, dim)
        await self._call("rebind", name, binding, [item_id for item_id, _ in pairs], vectors)
        return engine, len(pairs)

    # Helpers ----------------------------------------------------------------------------------------

    async def _embed_sources(
        self, name: str, engine: ModelEngine, sources: list[Source | None]
    ) -> np.ndarray:
        """Every source embedded in chunks the size of one request, through the same batchers; inline
        images are read back from the store."""
        out = np.zeros((len(sources), engine.dim), dtype=np.float32)
        chunk = min(self.settings.max_texts_per_request, self.settings.max_images_per_request)
        for start in range(0, len(sources), chunk):
            part = sources[start : start + chunk]
            texts = {i: s.value for i, s in enumerate(part) if s is not None and s.kind == "text"}
            digests = [s.stored_image for s in part if s is not None and s.stored_image is not None]
            stored = await self._call("images", name, digests) if digests else {}
            images: dict[int, str | bytes] = {}
            for i, s in enumerate(part):
                if s is not None and s.kind == "image":
                    images[i] = s.value if s.stored_image is None else stored.get(s.stored_image, b"")
            out[start : start + len(part)] = await self.embedder.items(
                engine, texts, images, len(part), "stored sources"
            )
        return out

    def _describe(self, info: CollectionInfo) -> CollectionDescription:
        return CollectionDescription(
            name=info.name,
            count=info.count,
            model=info.binding.model,
            version=info.binding.version,
            content_hash=info.binding.content_hash,
            dim=info.binding.dim,
            index=info.index,
            created_at=info.created_at,
            model_status=self._model_status(info),
        )

    def _model_status(self, info: CollectionInfo) -> Literal["current", "stale", "not_served"]:
        served = next((m for m in self.registry.models() if m.name == info.binding.model), None)
        if served is None:
            return "not_served"
        return "current" if served.content_hash == info.binding.content_hash else "stale"

    def _engine_for(self, name: str, binding: ModelBinding) -> ModelEngine:
        """The engine serving this collection's space, or a conflict saying how to get back to it."""
        try:
            engine = self.registry.resolve(binding.model)
        except NotFound as exc:
            raise Conflict(
                f"collection {name!r} was built with {binding.model}@{binding.version}, "
                "which is not served here",
                code="model_not_served",
            ) from exc
        if engine.content_hash != binding.content_hash:
            raise Conflict(
                f"collection {name!r} holds vectors of {binding.model}@{binding.version}, but "
                f"{engine.ref} is served now, a different embedding space; POST "
                f"/v1/collections/{name}/reembed re-embeds it from its stored texts and image URLs",
                code="model_mismatch",
            )
        return engine


def check_metadata(items: list[Item], limit: int) -> None:
    """Each item's metadata at most `limit` bytes as compact JSON: a search answers up to top_k
    items with their metadata, so this bounds what one answer can weigh."""
    for position, item in enumerate(items):
        size = len(
            json.dumps(item.metadata, separators=(",", ":"), ensure_ascii=False).encode(
                errors="surrogatepass"
            )
        )
        if size > limit:
            raise TooLarge(
                f"items[{position}].metadata has {size} bytes as JSON, at most {limit} allowed "
                "(CLIPSERVE_MAX_METADATA_BYTES)",
                code="metadata_too_large",
                index=position,
            )


def _source(item: Item, image_bytes: bytes | None) -> Source | None:
    """What the item keeps to be re-embedded: its text, its image URL, or its inline image's bytes."""
    if item.text is not None:
        return Source("text", item.text)
    if isinstance(item.image, str) and is_url(item.image):
        return Source("image", item.image.strip())
    if image_bytes is not None:
        return Source.inline_image(image_bytes)
    return None


def _check_precomputed(name: str, request: UpsertItems, binding: ModelBinding) -> None:
    """Vectors given with their sources must say which embedding space they are in: the collection's."""
    if request.content_hash is not None and request.content_hash != binding.content_hash:
        raise Conflict(
            f"content_hash {request.content_hash[:12]} names another embedding space than collection "
            f"{name!r}'s, {binding.model}@{binding.version} (bundle {binding.content_hash[:12]}); "
            "embed the items with that model",
            code="model_mismatch",
        )
    position = next((i for i, item in enumerate(request.items) if item.precomputed), None)
    if position is not None and request.content_hash is None:
        given = "text" if request.items[position].text is not None else "image"
        raise InvalidInput(
            f"items[{position}] gives a vector with its {given}: name the bundle that made the vector "
            "with content_hash (GET /v1/models lists each model's)",
            index=position,
        )


def _index_params(request: CreateCollection) -> IndexParams:
    try:
        return IndexParams(kind=request.index, **request.index_params.model_dump(exclude_none=True))
    except ValidationError as exc:
        problems = "; ".join(
            f"index_params.{'.'.join(map(str, e['loc'])) or 'index'}: {e['msg']}" for e in exc.errors()
        )
        raise InvalidInput(problems) from exc
