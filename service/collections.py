"""Persistent collections searchable by text, image or vector: the operations behind /v1/collections.

A collection is bound to the embedding space (bundle content hash) of the model version it was made
with, and that version serves it, kept loaded beside newer ones (`ModelRegistry.version`), until a
re-embed job moves it (clipserve.service.jobs): a newer version never turns its searches into errors.
While a job moves it, and for the grace period after the switch, the collection holds a second space:
every write embeds its items with both versions and writes both in one transaction, so nothing
written meanwhile is lost or stale; searches answer from the bound space alone. The spaces are read
from the store on every request, so every replica follows a switch at once; a request that meets a
switch half-way reads them again and retries.

Every item keeps its source: its text, its image URL, or its inline image's original bytes (in the
store, by sha256, each once per collection, up to `max_collection_image_bytes`); only items given as
bare vectors cannot be re-embedded. An item may bring its vector together with its text or image
(bulk indexers compute vectors themselves) when the request names the bundle that made it
(`content_hash`, which must be one of the collection's spaces); the source is kept as for any item.

Conventions: upsert by id, the last of duplicate ids in one call wins; a filter is an equality test on
top-level metadata fields, and a field no item has matches nothing (empty results, not an error).
The store (embedded FAISS + SQLite, or pgvector) is opened on first use, so an app that never
touches collections creates no files and needs no PostgreSQL; a store that failed to open is tried
again on the next call. Store calls block, so they run in worker threads. The operations take plain
values (`NewItem`, `clipserve.service.embedding.Input`) and give plain results (`CollectionView`, the
store's items and hits); the API layer turns its models into calls and the results into answers.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import anyio.to_thread
import numpy as np
from pydantic import ValidationError

from clipserve.contract.bundle import BundleError, parse_model_ref
from clipserve.service.embedding import Embedder, Input
from clipserve.service.errors import Conflict, InvalidInput, NotFound, TooLarge
from clipserve.service.inference.engine import ModelEngine
from clipserve.service.inference.inputs import is_url
from clipserve.service.inference.registry import ModelRegistry, Needs
from clipserve.service.limits import check_images, check_item_texts, check_top_k
from clipserve.service.metrics import Metrics
from clipserve.service.settings import Settings
from clipserve.service.stores import (
    BackendUnavailableError,
    CollectionInfo,
    IndexParams,
    JobStore,
    ModelBinding,
    ModelMismatchError,
    SearchHit,
    Source,
    StoredItem,
    open_store,
)
from clipserve.service.stores.collection_store import CollectionSpaces, SpaceVectors
from clipserve.service.stores.jobs import JobRecord

log = logging.getLogger("clipserve.collections")
T = TypeVar("T")
# a request that meets a switch (or a job starting) between reading the spaces and writing reads
# them again; a few times is plenty, switches are rare
_ATTEMPTS = 3
ModelStatus = Literal["current", "stale", "not_served"]


@dataclass(frozen=True)
class NewItem:
    """An item to write: an id and exactly one of text, image (an API string, or bytes) or vector,
    or a vector made elsewhere together with the text or image it was made from."""

    id: str
    text: str | None = None
    image: str | bytes | None = None
    vector: Sequence[float] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def precomputed(self) -> bool:
        """A vector given together with its source: stored as it is, the source kept beside it."""
        return self.vector is not None and (self.text is not None or self.image is not None)


@dataclass(frozen=True)
class CollectionView:
    """A collection as described: the store's record, whether the served model still matches, the
    re-embed job moving it (if any) and, while that job keeps it, the space it moved from."""

    info: CollectionInfo
    model_status: ModelStatus
    job: JobRecord | None = None
    previous: ModelBinding | None = None


class Collections:
    def __init__(self, registry: ModelRegistry, embedder: Embedder, settings: Settings, metrics: Metrics):
        self.registry, self.embedder, self.settings, self.metrics = registry, embedder, settings, metrics
        self._store: JobStore | None = None
        self._opening = asyncio.Lock()

    async def store(self) -> JobStore:
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

    def store_exists(self) -> bool:
        """Whether there is a store to look into: PostgreSQL is configured, or the embedded one was made
        (an app that never touched collections creates no files for background work either)."""
        if self._store is not None or self.settings.collections_backend == "pgvector":
            return True
        return (self.settings.data_dir / "collections" / "collections.sqlite3").is_file()

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """A store method, off the event loop (the job runner's way in)."""
        return await self._call(method, *args, **kwargs)

    async def versions_in_use(self) -> Needs:
        """What the registry must keep loaded for the collections and their jobs (nothing, without a store)."""
        if not self.store_exists():
            return {}
        return await self._call("versions_in_use")

    # Operations -------------------------------------------------------------------------------------

    async def create(
        self,
        name: str,
        *,
        model: str | None = None,
        dimensions: int | None = None,
        index: str = "flat",
        index_params: Mapping[str, Any] | None = None,
        on_model_update: str | None = None,
    ) -> CollectionView:
        """Bind a new collection to a served model's embedding space, with a flat, HNSW or IVF index. A
        model named with its version (`tiny@2`) pins the collection to it unless `on_model_update` says."""
        params = _index_params(index, index_params or {})
        engine = await self._engine_named(model)
        dim = engine.output_dim(dimensions)
        binding = ModelBinding(engine.name, engine.version, engine.content_hash, dim)
        policy = on_model_update or ("pin" if model and "@" in model else "reembed")
        info = await self._call("create_collection", name, binding, params, policy)
        return await self._describe(info)

    async def _engine_named(self, model: str | None) -> ModelEngine:
        """The engine a request names: a served model, or an exact version (loaded if it must be)."""
        if model is None:
            return self.registry.resolve(None)
        try:
            name, version = parse_model_ref(model)
        except BundleError as exc:
            raise InvalidInput(f"model: {exc}") from exc
        return self.registry.resolve(name) if version is None else await self.registry.version(name, version)

    async def list_all(self) -> list[CollectionView]:
        return [await self._describe(info) for info in await self._call("list_collections")]

    async def describe(self, name: str) -> CollectionView:
        return await self._describe(await self._call("describe", name))

    async def spaces(self, name: str) -> CollectionSpaces:
        return await self._call("spaces", name)

    async def drop(self, name: str) -> None:
        await self._call("drop_collection", name)

    async def upsert(self, name: str, items: Sequence[NewItem], content_hash: str | None = None) -> int:
        """Upsert by id (the last of duplicate ids wins). Texts and images are embedded through the
        batchers by every space the collection holds, except where an item brings its vector with its
        source (made by the bundle `content_hash` names); every item keeps its source."""
        spaces = await self._call("spaces", name)
        _check_precomputed(name, items, content_hash, spaces)
        texts = {i: item.text for i, item in enumerate(items) if item.text is not None}
        images = {i: item.image for i, item in enumerate(items) if item.image is not None}
        check_item_texts(texts, self.settings, field="items")
        check_images(len(images), self.settings, field="items (images)")
        check_metadata(items, self.settings.max_metadata_bytes)
        given = content_hash or spaces.bound.content_hash
        given_dim = next(s.dim for s in spaces.written if s.content_hash == given)
        for position, item in enumerate(items):
            if item.vector is not None and len(item.vector) != given_dim:
                raise InvalidInput(
                    f"items[{position}].vector has {len(item.vector)} dimensions, "
                    f"the collection's space has {given_dim}",
                    code="invalid_vector",
                    index=position,
                )
        # the bytes of every image to embed (an item's vector given for one space is embedded for the
        # other), and of every inline image (kept as its item's source)
        every_image = len(spaces.written) > 1 or given != spaces.bound.content_hash
        data = await self.embedder.load_images(
            {
                i: image
                for i, image in images.items()
                if items[i].vector is None or not is_url(image) or every_image
            },
            "items",
        )
        sources = [_source(item, data.get(position)) for position, item in enumerate(items)]
        for attempt in range(_ATTEMPTS):
            written = await asyncio.gather(
                *(self._space_vectors(name, space, items, data, given) for space in spaces.written)
            )
            bound, *other = written
            try:
                return await self._call(
                    "upsert",
                    name,
                    [item.id for item in items],
                    bound.vectors,
                    content_hash=bound.content_hash,
                    metadata=[item.metadata for item in items],
                    sources=sources,
                    also=other[0] if other else None,
                )
            except ModelMismatchError:
                if attempt == _ATTEMPTS - 1:
                    raise
                spaces = await self._call("spaces", name)
                _check_precomputed(name, items, content_hash, spaces)
        raise AssertionError("unreachable")

    async def _space_vectors(
        self, name: str, space: ModelBinding, items: Sequence[NewItem], data: dict[int, bytes], given: str
    ) -> SpaceVectors:
        """The items' vectors in one of the collection's spaces: given ones where they are of this space,
        the rest embedded from their sources by its version; a bare vector has none in another space."""
        vectors = np.zeros((len(items), space.dim), dtype=np.float32)
        present = np.ones(len(items), dtype=bool)
        to_embed = []
        for position, item in enumerate(items):
            if item.vector is not None and space.content_hash == given:
                vectors[position] = np.asarray(item.vector, dtype=np.float32)
            elif item.text is not None or position in data:
                to_embed.append(position)
            else:  # a bare vector, or an image not fetched (the spaces changed meanwhile): the job's
                present[position] = False
        if to_embed:
            engine = await self._engine_for(name, space)
            embedded = await self.embedder.encode_items(
                engine,
                {i: text for i in to_embed if (text := items[i].text) is not None},
                {i: data[i] for i in to_embed if i in data},
                len(items),
                "items",
            )
            vectors[to_embed] = engine.reduce(embedded, space.dim)[to_embed]
        return SpaceVectors(space.content_hash, vectors, present)

    async def get_item(self, name: str, item_id: str) -> StoredItem:
        """One item as stored: its metadata, its source (when kept) and its vector."""
        return await self._call("get", name, item_id)

    async def delete_item(self, name: str, item_id: str) -> None:
        await self._call("delete", name, item_id)

    async def search(
        self,
        name: str,
        query: Input,
        *,
        top_k: int = 10,
        filter: Mapping[str, Any] | None = None,
        min_score: float | None = None,
    ) -> tuple[ModelEngine, list[SearchHit]]:
        """Nearest items by cosine to a text, an image or a vector, optionally filtered on metadata
        and cut at `min_score`."""
        check_top_k(top_k, self.settings)
        for attempt in range(_ATTEMPTS):
            binding = (await self._call("spaces", name)).bound
            engine = await self._engine_for(name, binding)
            vector = await self.embedder.query(engine, query, binding.dim)
            try:
                hits = await self._call(
                    "search", name, vector, content_hash=engine.content_hash, top_k=top_k, filter=filter
                )
                break
            except ModelMismatchError:  # switched between reading the binding and searching
                if attempt == _ATTEMPTS - 1:
                    raise
        return engine, [hit for hit in hits if min_score is None or hit.score >= min_score]

    # Helpers ----------------------------------------------------------------------------------------

    async def _describe(self, info: CollectionInfo) -> CollectionView:
        jobs = await self._call("list_jobs", info.name, 1)
        job = jobs[0] if jobs and jobs[0].state in ("pending", "running", "waiting", "switched") else None
        previous = info.other if info.other is not None and info.other.role == "previous" else None
        kept = None if previous is None or job is None else previous.binding
        return CollectionView(info, self._model_status(info), job, kept)

    def _model_status(self, info: CollectionInfo) -> ModelStatus:
        served = next((m for m in self.registry.models() if m.name == info.binding.model), None)
        if served is None:
            return "not_served"
        return "current" if served.content_hash == info.binding.content_hash else "stale"

    async def _engine_for(self, name: str, binding: ModelBinding) -> ModelEngine:
        """The engine of this exact space: its version, served or kept loaded (loaded now if need be)."""
        try:
            engine = await self.registry.version(binding.model, binding.version)
        except NotFound as exc:
            raise Conflict(
                f"collection {name!r} was built with {binding.ref}, which is not served here ({exc.message})",
                code="model_not_served",
            ) from exc
        if engine.content_hash != binding.content_hash:
            raise Conflict(
                f"collection {name!r} holds vectors of {binding.ref} (bundle {binding.content_hash[:12]}), but "
                f"the bundle published as {engine.ref} now is {engine.content_hash[:12]}, another embedding "
                "space: the version was replaced in place. Publish it again as a new version",
                code="model_mismatch",
            )
        return engine


def check_metadata(items: Sequence[NewItem], limit: int) -> None:
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


def _source(item: NewItem, image_bytes: bytes | None) -> Source | None:
    """What the item keeps to be re-embedded: its text, its image URL, or its inline image's bytes."""
    if item.text is not None:
        return Source("text", item.text)
    if isinstance(item.image, str) and is_url(item.image):
        return Source("image", item.image.strip())
    if image_bytes is not None:
        return Source.inline_image(image_bytes)
    return None


def _check_precomputed(
    name: str, items: Sequence[NewItem], content_hash: str | None, spaces: CollectionSpaces
) -> None:
    """Vectors given with their sources must say which embedding space they are in: one the collection
    holds (its bound one, or the one it is moving to or from)."""
    binding = spaces.bound
    if content_hash is not None and content_hash not in {s.content_hash for s in spaces.written}:
        raise Conflict(
            f"content_hash {content_hash[:12]} names another embedding space than collection "
            f"{name!r}'s, {binding.model}@{binding.version} (bundle {binding.content_hash[:12]}); "
            "embed the items with that model",
            code="model_mismatch",
        )
    bare = next((i for i, item in enumerate(items) if item.vector is not None and not item.precomputed), None)
    if bare is not None and content_hash not in (None, binding.content_hash):
        raise InvalidInput(
            f"items[{bare}] is a bare vector of {content_hash[:12]}, not of the space collection "
            f"{name!r} is bound to ({binding.ref}): give it with its text or image",
            index=bare,
        )
    position = next((i for i, item in enumerate(items) if item.precomputed), None)
    if position is not None and content_hash is None:
        given = "text" if items[position].text is not None else "image"
        raise InvalidInput(
            f"items[{position}] gives a vector with its {given}: name the bundle that made the vector "
            "with content_hash (GET /v1/models lists each model's)",
            index=position,
        )


def _index_params(index: str, params: Mapping[str, Any]) -> IndexParams:
    try:
        return IndexParams(kind=index, **params)
    except ValidationError as exc:
        problems = "; ".join(
            f"index_params.{'.'.join(map(str, e['loc'])) or 'index'}: {e['msg']}" for e in exc.errors()
        )
        raise InvalidInput(problems) from exc
