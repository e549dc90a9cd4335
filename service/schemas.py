"""Request and response models of the public API (pydantic v2), every resource in one place.
Requests refuse unknown fields."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    model_validator,
)

from service.index import IndexParams

EncodingFormat = Literal["float", "base64"]


def _whole_number(value: object, handler: ValidatorFunctionWrapHandler) -> object:
    try:
        return handler(value)
    except ValidationError as exc:
        raise ValueError(
            f"give a whole number from 1 to the model's dim (GET /v1/models lists each model's dim), not {value!r}"
        ) from exc


Dimensions = Annotated[
    int | None,
    WrapValidator(_whole_number),
    Field(
        description="keep the first N components of each vector, renormalized: exact for Matryoshka-"
        "trained models, an approximation for others; 1 to the model's dim",
    ),
]
Vectors = list[list[float]] | list[str]
Templates = list[str] | str


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(BaseModel):
    type: str
    message: str
    index: int | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class EmbedRequest(_Request):
    model: str | None = Field(None, description="name or name@version; the default model when absent")
    texts: list[str] | None = None
    images: list[str] | None = Field(None, description="base64, data URIs, or http(s) URLs when enabled")
    encoding_format: EncodingFormat = Field(
        "float", description="base64: each vector as base64 of float32 little-endian"
    )
    dimensions: Dimensions = None


class EmbedForm(_Request):
    """`/v1/embed` as `multipart/form-data`: image files and text fields."""

    model: str | None = Field(None, description="name or name@version; the default model when absent")
    texts: list[str] = Field(default_factory=list, description="one form field per text")
    images: list[bytes] = Field(default_factory=list, description="one file per image")
    encoding_format: EncodingFormat = "float"
    dimensions: Dimensions = None


class EmbedResponse(BaseModel):
    model: str
    version: int
    dim: int
    text_embeddings: Vectors
    image_embeddings: Vectors
    truncated: list[bool] = Field(description="one per text: true where it was cut to the context length")


class ClassifyRequest(_Request):
    model: str | None = None
    images: list[str]
    labels: list[str] | None = None
    labelset: str | None = None
    templates: Templates | None = Field(
        None, description="templates with '{}', or an ensemble name: default, imagenet80, none"
    )
    top_k: int = Field(5, ge=1)


class LabelScore(BaseModel):
    label: str
    score: float = Field(
        description="the model's probability: softmax(logit_scale * cosine) over all labels (CLIP), or "
        "sigmoid(logit_scale * cosine + logit_bias) for this label alone (SigLIP; scores do not sum to 1)"
    )
    similarity: float = Field(description="cosine similarity")


class ClassifyResult(BaseModel):
    index: int
    labels: list[LabelScore]


Scoring = Literal["softmax", "sigmoid"]


class ClassifyResponse(BaseModel):
    model: str
    version: int
    dim: int
    scoring: Scoring = Field(description="how `score` was computed from the cosine (the model's own rule)")
    results: list[ClassifyResult]


class LabelSetRequest(_Request):
    labels: list[str]
    templates: Templates | None = None
    model: str | None = None


class LabelSetInfo(BaseModel):
    name: str
    model: str
    labels: int
    templates: list[str]
    status: Literal["ready", "building", "failed"]
    progress: float = Field(description="share of the class matrix computed, 0..1")
    error: str | None = None
    created_at: str
    label_names: list[str] | None = None


class LabelSetList(BaseModel):
    labelsets: list[LabelSetInfo]


class EmbeddingsRequest(_Request):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"description": "OpenAI-compatible"})
    input: str | list[str]
    model: str
    encoding_format: EncodingFormat = "float"
    modality: Literal["text", "image"] = "text"
    dimensions: Dimensions = None
    user: str | None = None


class EmbeddingItem(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingItem]
    model: str
    usage: Usage


class ModelInfo(BaseModel):
    id: str = Field(description="the model name, as requests give it (`name@version` also works)")
    object: Literal["model"] = "model"
    created: int = Field(description="publish time of the served version, seconds since the epoch")
    owned_by: str = "clipserve"
    name: str
    version: int
    dim: int
    content_hash: str
    precision: dict[str, str]
    providers: list[str]
    scoring: Scoring
    logit_scale: float
    logit_bias: float | None
    image_size: list[int]
    context_length: int
    source: dict
    default: bool


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelInfo]


class ReloadResponse(BaseModel):
    loaded: list[str]
    unchanged: list[str]
    failed: list[dict]


# Retrieval: rank and collections


def _exactly_one(model: BaseModel, fields: tuple[str, ...]) -> None:
    given = [name for name in fields if getattr(model, name) is not None]
    if len(given) != 1:
        choices = f"{', '.join(fields[:-1])} or {fields[-1]}"
        raise ValueError(f"give exactly one of {choices} (got {', '.join(given) or 'none'})")


class Query(_Request):
    """Exactly one of text, image (base64, data URI or URL) or vector."""

    text: str | None = None
    image: str | None = None
    vector: list[float] | None = None

    @model_validator(mode="after")
    def _one_query(self) -> Query:
        _exactly_one(self, ("text", "image", "vector"))
        return self


class Candidate(_Request):
    """Exactly one of text or image."""

    text: str | None = None
    image: str | None = None

    @model_validator(mode="after")
    def _one_candidate(self) -> Candidate:
        _exactly_one(self, ("text", "image"))
        return self


class RankRequest(_Request):
    model: str | None = Field(None, description="name or name@version; the default model when absent")
    query: Query
    candidates: list[Candidate] = Field(min_length=1)
    top_k: int | None = Field(None, description="results to return; all candidates when absent")
    probabilities: bool = Field(
        False, description="also give the model's probabilities (softmax over the candidates, or sigmoid)"
    )


class RankResult(BaseModel):
    index: int
    score: float
    probability: float | None = None


class RankResponse(BaseModel):
    model: str
    version: int
    dim: int
    scoring: Scoring | None = Field(None, description="how `probability` was computed, when asked for")
    results: list[RankResult]


class IndexOptions(_Request):
    m: int | None = Field(None, description="HNSW links per node")
    ef_construction: int | None = Field(None, description="HNSW build candidate list")
    ef_search: int | None = Field(None, description="HNSW search candidate list")
    nlist: int | None = Field(None, description="IVF lists")
    nprobe: int | None = Field(None, description="IVF lists visited per search")


class CreateCollection(_Request):
    name: str
    model: str | None = Field(None, description="name or name@version; the default model when absent")
    dimensions: Dimensions = None
    index: Literal["flat", "hnsw", "ivf"] = "flat"
    index_params: IndexOptions = Field(default_factory=IndexOptions)


class Item(_Request):
    id: str | int
    text: str | None = None
    image: str | None = None
    vector: list[float] | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_source(self) -> Item:
        _exactly_one(self, ("text", "image", "vector"))
        return self


class UpsertItems(_Request):
    items: list[Item] = Field(min_length=1)


class SearchRequest(Query):
    top_k: int = 10
    filter: dict[str, Any] | None = Field(None, description="field: value, all must be equal")


class ReembedRequest(_Request):
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
