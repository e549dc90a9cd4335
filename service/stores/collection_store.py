"""The collection store interface shared by the embedded (FAISS + SQLite) and PostgreSQL backends.

A collection is bound to one embedding space: the bundle content hash of the model that made its
vectors. Every write and every search names the hash it expects, so vectors of two spaces never mix.
While it moves to another space (a re-embed job, clipserve.service.stores.jobs) it holds a second,
`other` space beside the bound one: the job's target being filled, then, after the switch, the
previous space kept for rollback. Writes give vectors of both; searches use the bound one only.

Conventions both backends follow (the behaviour tests check them):
- vectors are L2-normalized on the way in; scores are cosine similarities (inner products);
- an upsert with the same id twice in one call keeps the last one ("last wins");
- a filter is an equality test on top-level metadata fields, all of which must match; a field that
  no item has simply matches nothing (empty results, not an error);
- a write returns only once it is durable (a committed transaction);
- an item's source is kept with it: a text, an image URL, or an inline image's original bytes. Those
  bytes live in the same store, content-addressed (sha256) and deduplicated within a collection, with
  a reference count so that replacing or deleting the last item that uses them frees them; the item's
  source then reads `Source("image", "sha256:<hex>")` and `images(name, digests)` gives the bytes back.
  A collection holds at most the store's `max_image_bytes` of them (`ImageStorageFullError`, a 413).
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from clipserve.contract.bundle import NAME_RULE, is_valid_name
from clipserve.service.errors import Conflict, InvalidInput, NotFound, ServiceError, TooLarge, Unavailable

IndexKind = Literal["flat", "hnsw", "ivf"]
SourceKind = Literal["text", "image"]
SpaceRole = Literal["target", "previous"]
RefreshPolicy = Literal["reembed", "pin"]
FilterValue = str | int | float | bool | None

_MAX_ITEM_ID_CHARS = 256
_MAX_FILTER_FIELD_CHARS = 128
IVF_TRAIN_POINTS_PER_LIST = 39
_DEFAULT_NPROBE = 16
"""FAISS wants about 39 training points per IVF list; below that the collection stays exact."""


class IndexStoreError(ServiceError):
    """Base of every error a collection store raises; `index` names the offending item, if one."""


class CollectionNotFoundError(IndexStoreError, NotFound):
    code = "collection_not_found"


class CollectionExistsError(IndexStoreError, Conflict):
    code = "collection_exists"


class ItemNotFoundError(IndexStoreError, NotFound):
    code = "item_not_found"


class InvalidInputError(IndexStoreError, InvalidInput):
    """A bad vector, id, filter, name or parameter from the caller."""


class ModelMismatchError(IndexStoreError, Conflict):
    """The collection's vectors come from a different embedding space than the one asked for."""

    code = "model_mismatch"


class ImageStorageFullError(IndexStoreError, TooLarge):
    """Keeping these images' bytes would take the collection over the store's `max_image_bytes`."""

    code = "collection_images_too_large"


class BackendUnavailableError(IndexStoreError, Unavailable):
    """The storage behind the store cannot be reached or lacks something it needs."""

    code = "collections_unavailable"


class IndexParams(BaseModel):
    """ANN index kind and its knobs. Defaults reach Recall@10 >= 0.95 on clustered 512-d data."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: IndexKind = "flat"
    m: int = Field(16, ge=4, le=100, description="HNSW: links per node")
    ef_construction: int = Field(64, ge=8, le=1000, description="HNSW: candidate list size while building")
    ef_search: int = Field(128, ge=1, le=1000, description="HNSW: candidate list size while searching")
    nlist: int = Field(256, ge=1, le=65536, description="IVF: number of lists (k-means centroids)")
    nprobe: int = Field(_DEFAULT_NPROBE, ge=1, le=65536, description="IVF: lists visited per search")

    @model_validator(mode="before")
    @classmethod
    def _default_nprobe_within_nlist(cls, data: Any) -> Any:
        if isinstance(data, dict) and "nprobe" not in data and isinstance(data.get("nlist"), int):
            return {**data, "nprobe": max(1, min(_DEFAULT_NPROBE, data["nlist"]))}
        return data

    @model_validator(mode="after")
    def _nprobe_within_nlist(self) -> IndexParams:
        if self.nprobe > self.nlist:
            raise ValueError(f"nprobe ({self.nprobe}) cannot exceed nlist ({self.nlist})")
        return self

    @property
    def ivf_train_size(self) -> int:
        return IVF_TRAIN_POINTS_PER_LIST * self.nlist


@dataclass(frozen=True)
class ModelBinding:
    """The embedding space a collection lives in."""

    model: str
    version: int
    content_hash: str
    dim: int

    @property
    def ref(self) -> str:
        return f"{self.model}@{self.version}"

    def json(self) -> str:
        return json.dumps(
            {"model": self.model, "version": self.version, "content_hash": self.content_hash, "dim": self.dim}
        )

    @classmethod
    def of(cls, value: str | dict[str, Any]) -> ModelBinding:
        data = json.loads(value) if isinstance(value, str) else value
        return cls(data["model"], int(data["version"]), data["content_hash"], int(data["dim"]))


@dataclass(frozen=True)
class OtherSpace:
    """The embedding space a collection holds besides its bound one: a job's `target` being filled,
    or the `previous` space kept for rollback after a switch. `tag` marks its vectors (embedded store)."""

    binding: ModelBinding
    role: SpaceRole
    job: str
    tag: int = 0

    def json(self) -> str:
        return json.dumps(
            {**json.loads(self.binding.json()), "role": self.role, "job": self.job, "tag": self.tag}
        )

    @classmethod
    def of(cls, value: str | dict[str, Any] | None) -> OtherSpace | None:
        if value is None:
            return None
        data = json.loads(value) if isinstance(value, str) else value
        return cls(ModelBinding.of(data), data["role"], data["job"], int(data.get("tag", 0)))


@dataclass(frozen=True)
class CollectionSpaces:
    """What a request needs to know of a collection's spaces: the one it is bound to (searched, and
    written by every write), the other one if any (written too), and its refresh policy."""

    bound: ModelBinding
    other: OtherSpace | None = None
    policy: RefreshPolicy = "reembed"

    @property
    def written(self) -> list[ModelBinding]:
        """Every space a write must give vectors of: the bound one first."""
        return [self.bound] + ([self.other.binding] if self.other is not None else [])


@dataclass(frozen=True)
class SpaceVectors:
    """Vectors of one more space for an upsert: `vectors[i]` is item i's where `present[i]`."""

    content_hash: str
    vectors: np.ndarray
    present: np.ndarray


@dataclass(frozen=True)
class CollectionInfo:
    name: str
    binding: ModelBinding
    index: IndexParams
    count: int
    created_at: str
    other: OtherSpace | None = None
    policy: RefreshPolicy = "reembed"


STORED_IMAGE_PREFIX = "sha256:"


@dataclass(frozen=True)
class Source:
    """What an item was embedded from, kept so the collection can be re-embedded by another model:
    a text, an image URL, or an inline image. An inline image goes in as `Source.inline_image(bytes)`
    (`data` set) and comes out as `Source("image", "sha256:<hex>")`: its bytes stay in the store,
    read back with `CollectionStore.images`."""

    kind: SourceKind
    value: str
    data: bytes | None = field(default=None, repr=False)

    @classmethod
    def inline_image(cls, data: bytes) -> Source:
        return cls("image", STORED_IMAGE_PREFIX + hashlib.sha256(data).hexdigest(), data)

    @property
    def stored_image(self) -> str | None:
        """The sha256 hex digest of an image whose bytes the store keeps, else None."""
        if self.kind == "image" and self.value.startswith(STORED_IMAGE_PREFIX):
            return self.value.removeprefix(STORED_IMAGE_PREFIX)
        return None


@dataclass
class StoredItem:
    id: str
    vector: np.ndarray
    metadata: dict[str, Any]
    source: Source | None


@dataclass(frozen=True)
class SearchHit:
    id: str
    score: float
    metadata: dict[str, Any] = field(default_factory=dict)


ProgressCallback = Callable[[int, int], None]
"""Called as progress(done, total) after each durable batch of a bulk upsert."""


class CollectionStore(Protocol):
    """What the HTTP layer needs from a backend. All methods are blocking; call them off the event loop."""

    def create_collection(self, name: str, binding: ModelBinding, index: IndexParams) -> CollectionInfo: ...

    def drop_collection(self, name: str) -> None: ...

    def list_collections(self) -> list[CollectionInfo]: ...

    def describe(self, name: str) -> CollectionInfo: ...

    def binding(self, name: str) -> ModelBinding:
        """The collection's embedding space, without counting its items (cheap, for every request)."""
        ...

    def upsert(
        self,
        name: str,
        ids: Sequence[str],
        vectors: np.ndarray,
        *,
        content_hash: str,
        metadata: Sequence[dict[str, Any]] | None = None,
        sources: Sequence[Source | None] | None = None,
        progress: ProgressCallback | None = None,
        also: SpaceVectors | None = None,
    ) -> int:
        """`vectors` are of the space `content_hash`, `also` of one more: whichever of the two are the
        collection's bound and other spaces are written (`ModelMismatchError` without the bound one);
        the other space of items given none is left empty, for its job to fill."""
        ...

    def get(self, name: str, item_id: str) -> StoredItem: ...

    def delete(self, name: str, item_id: str) -> None: ...

    def count(self, name: str) -> int: ...

    def search(
        self,
        name: str,
        query: np.ndarray,
        *,
        content_hash: str,
        top_k: int,
        filter: dict[str, FilterValue] | None = None,
    ) -> list[SearchHit]: ...

    def spaces(self, name: str) -> CollectionSpaces:
        """The bound space, the other space held if any, and the policy (cheap, for every request)."""
        ...

    def all_spaces(self) -> dict[str, CollectionSpaces]:
        """Every collection's spaces, without counting items."""
        ...

    def versions_in_use(self) -> dict[str, list[str]]:
        """Model versions (`name@version`) that collections and active jobs need loaded, with why."""
        ...

    def close(self) -> None: ...


def validate_collection_name(name: str) -> None:
    if not is_valid_name(name):
        raise InvalidInputError(f"invalid collection name {name!r}: {NAME_RULE}")


def check_binding(name: str, binding: ModelBinding, content_hash: str) -> None:
    if binding.content_hash != content_hash:
        raise ModelMismatchError(
            f"collection {name!r} holds vectors of {binding.model}@{binding.version} "
            f"(bundle {binding.content_hash[:12]}), not of the requested model's embedding space "
            f"(bundle {content_hash[:12]}); re-embed the collection or query it with the model it was built with"
        )


def normalize_rows(vectors: np.ndarray, dim: int, what: str = "vector") -> np.ndarray:
    """float32 (n, dim), every row finite, non-zero and L2-normalized; errors name the first bad row."""
    array = np.asarray(vectors, dtype=np.float32)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2:
        raise InvalidInputError(f"{what}s must be a 2-d array, got {array.ndim} dimensions")
    if array.shape[1] != dim:
        raise InvalidInputError(
            f"{what} has dimension {array.shape[1]}, the collection expects {dim}", index=0
        )
    finite = np.isfinite(array).all(axis=1)
    if not finite.all():
        bad = int(np.argmin(finite))
        raise InvalidInputError(f"{what} {bad} contains NaN or infinity", index=bad)
    norms = np.linalg.norm(array, axis=1)
    if (norms == 0).any():
        bad = int(np.argmin(norms))
        raise InvalidInputError(f"{what} {bad} is all zeros and has no direction", index=bad)
    return np.ascontiguousarray(array / norms[:, None], dtype=np.float32)


def unstorable(text: str) -> str | None:
    """Why a string cannot be stored as it is (PostgreSQL keeps no NUL in text or JSONB, and no
    store keeps half of a UTF-16 surrogate pair), or None. Both backends refuse the same strings."""
    if "\x00" in text:
        return "contains a NUL character (\\u0000), which cannot be stored"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "contains a lone UTF-16 surrogate, which is not valid Unicode"
    return None


def unstorable_in(value: Any, where: str) -> str | None:
    """The first string inside a JSON value (keys included) that cannot be stored, as
    '<where>.<key>[i]: <why>', or None."""
    if isinstance(value, str):
        problem = unstorable(value)
        return f"{where}: {problem}" if problem else None
    if isinstance(value, dict):
        for key, item in value.items():
            found = unstorable_in(key, f"{where} (a key)") or unstorable_in(item, f"{where}.{key}")
            if found:
                return found
    if isinstance(value, list | tuple):
        for position, item in enumerate(value):
            found = unstorable_in(item, f"{where}[{position}]")
            if found:
                return found
    return None


def check_storable(value: Any, where: str, index: int | None = None) -> None:
    problem = unstorable_in(value, where)
    if problem:
        raise InvalidInputError(problem, index=index)


def validate_top_k(top_k: int, limit: int | None = None) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise InvalidInputError(f"top_k must be a positive integer, got {top_k!r}")
    if limit is not None and top_k > limit:
        raise InvalidInputError(f"top_k {top_k} is over the limit of {limit}")


def validate_filter(filter: dict[str, FilterValue] | None) -> dict[str, FilterValue]:
    if not filter:
        return {}
    if not isinstance(filter, dict):
        raise InvalidInputError("filter must be an object of field: value")
    for key, value in filter.items():
        if (
            not isinstance(key, str)
            or not key
            or len(key) > _MAX_FILTER_FIELD_CHARS
            or '"' in key
            or "\\" in key
        ):
            raise InvalidInputError(
                f"invalid filter field {key!r}: a non-empty name of at most {_MAX_FILTER_FIELD_CHARS} "
                "characters, without quotes or backslashes"
            )
        if value is not None and not isinstance(value, str | int | float | bool):
            raise InvalidInputError(
                f"filter field {key!r}: only strings, numbers, booleans and null can be matched"
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidInputError(f"filter field {key!r}: value must be finite")
        check_storable(key, "filter field")
        check_storable(value, f"filter field {key!r}")
    return dict(filter)


def validate_item_id(item_id: str) -> None:
    check_storable(item_id, "item id")


@dataclass
class PreparedUpsert:
    """An upsert validated, normalized and with the last of duplicate ids kept: the bound space's
    vectors of every item, and the other space's where given (`other_present`; zero rows elsewhere)."""

    ids: list[str]
    vectors: np.ndarray
    metadata: list[dict[str, Any]]
    sources: list[Source | None]
    other_vectors: np.ndarray
    other_present: np.ndarray

    def part(self, rows: slice) -> PreparedUpsert:
        return PreparedUpsert(
            self.ids[rows],
            self.vectors[rows],
            self.metadata[rows],
            self.sources[rows],
            self.other_vectors[rows],
            self.other_present[rows],
        )


def vectors_by_space(
    name: str, spaces: CollectionSpaces, content_hash: str, vectors: np.ndarray, also: SpaceVectors | None
) -> tuple[np.ndarray, SpaceVectors | None]:
    """From what an upsert gives (`vectors` of `content_hash`, maybe `also` of one more space): the
    bound space's vectors, which every item needs, and the other space's, if given."""
    given = {content_hash: SpaceVectors(content_hash, vectors, np.ones(len(vectors), dtype=bool))}
    if also is not None:
        given.setdefault(also.content_hash, also)
    bound = given.get(spaces.bound.content_hash)
    if bound is None:
        check_binding(name, spaces.bound, content_hash)
    assert bound is not None
    if not np.all(bound.present):
        raise InvalidInputError(f"every item needs a vector of collection {name!r}'s bound space")
    other = given.get(spaces.other.binding.content_hash) if spaces.other is not None else None
    return bound.vectors, other


def prepare_upsert(
    ids: Sequence[str],
    vectors: np.ndarray,
    dim: int,
    metadata: Sequence[dict[str, Any]] | None,
    sources: Sequence[Source | None] | None,
    other: SpaceVectors | None = None,
    other_dim: int = 0,
) -> PreparedUpsert:
    """Validate a whole upsert before anything is written, then keep the last of duplicate ids."""
    count = len(ids)
    if count == 0:
        empty = np.zeros((0, dim), dtype=np.float32)
        return PreparedUpsert([], empty, [], [], np.zeros((0, other_dim), np.float32), np.zeros(0, bool))
    for what, column in (("metadata", metadata), ("sources", sources)):
        if column is not None and len(column) != count:
            raise InvalidInputError(f"{len(ids)} ids but {len(column)} {what} entries")
    if len(vectors) != count:
        raise InvalidInputError(f"{count} ids but {len(vectors)} vectors")
    for position, item_id in enumerate(ids):
        if not isinstance(item_id, str) or not item_id or len(item_id) > _MAX_ITEM_ID_CHARS:
            raise InvalidInputError(
                f"item {position}: id must be a non-empty string of at most {_MAX_ITEM_ID_CHARS} characters",
                index=position,
            )
        check_storable(item_id, f"item {position}: id", index=position)
    metadata = list(metadata) if metadata is not None else [{} for _ in range(count)]
    for position, entry in enumerate(metadata):
        if not isinstance(entry, dict):
            raise InvalidInputError(f"item {position}: metadata must be an object", index=position)
        check_storable(entry, f"item {position}: metadata", index=position)
    for position, source in enumerate(sources or []):
        if source is not None:
            check_storable(source.value, f"item {position}: {source.kind}", index=position)
    normalized = normalize_rows(vectors, dim)
    other_vectors = np.zeros((count, other_dim), dtype=np.float32)
    present = np.zeros(count, dtype=bool)
    if other is not None:
        present = np.asarray(other.present, dtype=bool)
        if len(other.vectors) != count or len(present) != count:
            raise InvalidInputError(f"{count} ids but {len(other.vectors)} vectors of the other space")
        if present.any():
            other_vectors[present] = normalize_rows(np.asarray(other.vectors)[present], other_dim)
    last_position = {item_id: position for position, item_id in enumerate(ids)}
    keep = sorted(last_position.values())
    source_list = list(sources) if sources is not None else [None] * count
    return PreparedUpsert(
        [ids[p] for p in keep],
        normalized[keep] if len(keep) != count else normalized,
        [metadata[p] for p in keep],
        [source_list[p] for p in keep],
        other_vectors[keep],
        present[keep],
    )


@dataclass
class ImageRefs:
    """The inline images of an upsert batch: bytes by digest, and how many of its items use each."""

    data: dict[str, bytes] = field(default_factory=dict)
    uses: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, sources: Sequence[Source | None]) -> ImageRefs:
        refs = cls()
        for position, source in enumerate(sources):
            digest = source.stored_image if source is not None else None
            if digest is None:
                continue
            if source.data is not None:
                if hashlib.sha256(source.data).hexdigest() != digest:
                    raise InvalidInputError(
                        f"item {position}: image bytes do not match {source.value}", index=position
                    )
                refs.data[digest] = source.data
            elif digest not in refs.data:
                raise InvalidInputError(
                    f"item {position}: source {source.value} names stored image bytes but carries none",
                    index=position,
                )
            refs.uses[digest] = refs.uses.get(digest, 0) + 1
        return refs


def released_images(sources: Sequence[tuple[str | None, str | None]]) -> dict[str, int]:
    """How many references to stored images the removed rows `(source_kind, source)` held, by digest."""
    released: dict[str, int] = {}
    for kind, value in sources:
        if kind == "image" and value and value.startswith(STORED_IMAGE_PREFIX):
            digest = value.removeprefix(STORED_IMAGE_PREFIX)
            released[digest] = released.get(digest, 0) + 1
    return released


def check_image_bytes(name: str, total: int, limit: int | None) -> None:
    if limit is not None and total > limit:
        raise ImageStorageFullError(
            f"collection {name!r} would keep {total} bytes of inline images, over this server's limit of "
            f"{limit} bytes per collection; send images as URLs, or delete items first"
        )


def encode_metadata(entry: dict[str, Any], position: int) -> str:
    try:
        return json.dumps(entry, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(
            f"item {position}: metadata is not plain JSON ({exc})", index=position
        ) from exc


def batches(total: int, size: int) -> Iterator[slice]:
    for start in range(0, total, size):
        yield slice(start, min(start + size, total))


class ReadWriteLock:
    """Many readers or one writer; a waiting writer blocks new readers so bulk writes make progress."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writing or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writing or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()
