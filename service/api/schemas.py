"""Request and response models of the public API (pydantic v2), every resource in one place.

Requests refuse unknown fields, naming the closest known one. Every request field has a
description and an example, and every request model a whole example that works on a fresh
service with the demo model (the docs' "Try it out" sends it). Images are base64, data URIs, URLs
(when enabled) or uploaded files (multipart, `clipserve.service.api.bodies`); a text item may be a plain
string wherever one is accepted."""

from __future__ import annotations

import difflib
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WithJsonSchema,
    WrapValidator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from clipserve.service.stores import IndexParams

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
# A 24x24 PNG of a red disc on white: the docs' examples send it, so "Try it out" just works.
EXAMPLE_IMAGE = (
    "iVBORw0KGgoAAAANSUhEUgAAABgAAAAYCAIAAABvFaqvAAAAaElEQVR42t2UUQoAIQgF8+H9r2y/xWrqohD1Vw6DmkgiMioORtG5T8ROnGi72g3lqGJ91"
    "HRIWI5RpC0Ggz8WjWz6/ng6H/7hyW4SZVfKwveVFk9qJ+ESEYtd2tmlRdmhC/ZRsmX3DeQEsv8dMyhWbq0AAAAASUVORK5CYII="
)
IMAGE_FORMS = (
    "base64, a data URI, an http(s) URL (when the server fetches URLs), or a file in a multipart upload"
)
# An image: text as JSON gives it, or the bytes of an uploaded file (multipart).
ImageInput = Annotated[
    str | bytes,
    WithJsonSchema(
        {"type": "string", "description": f"an image: {IMAGE_FORMS}", "examples": [EXAMPLE_IMAGE]}
    ),
]
MODEL_FIELD = Field(
    None,
    description="model name, or name@version; the default model when absent",
    examples=["shapes-demo"],
)


def _suggestion(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    if close:
        return f"did you mean {close[0]!r}?"
    return f"known fields: {', '.join(known)}"


class _Request(BaseModel):
    """Refuses unknown fields, each with the closest known name (`text` -> did you mean `texts`?)."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="wrap")
    @classmethod
    def _unknown_fields(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        if isinstance(data, dict):
            known = list(cls.model_fields)
            unknown = [key for key in data if isinstance(key, str) and key not in cls.model_fields]
            if unknown:
                raise PydanticCustomError(
                    "unknown_field",
                    "unknown field '{field}': {suggestion}",
                    {"field": unknown[0], "suggestion": _suggestion(unknown[0], known)},
                )
        return handler(data)


class ErrorDetail(BaseModel):
    type: str
    message: str
    index: int | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class EmbedRequest(_Request):
    """Texts and/or images to L2-normalized vectors, in input order (texts first in the response's
    `text_embeddings`, images in `image_embeddings`). As JSON, or as a multipart form with image
    files under `images` and one `texts` field per text."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"texts": ["a red circle", "a blue square"], "images": [EXAMPLE_IMAGE]}]
        },
    )
    model: str | None = MODEL_FIELD
    texts: list[str] | None = Field(
        None, description="texts to embed; a plain string each", examples=[["a red circle", "a blue square"]]
    )
    images: list[ImageInput] | None = Field(
        None, description=f"images to embed: {IMAGE_FORMS}", examples=[[EXAMPLE_IMAGE]]
    )
    encoding_format: EncodingFormat = Field(
        "float",
        description="float: lists of numbers; base64: each vector as base64 of float32 little-endian",
        examples=["float"],
    )
    dimensions: Dimensions = Field(None, examples=[None])


class ModelHeader(BaseModel):
    """The head of every answer a model made: which model, which version, and the vectors' dim
    (`clipserve.service.api.common.model_header` fills it)."""

    model: str = Field(description="the model that answered")
    version: int = Field(description="its version")
    dim: int = Field(description="components per vector (the model's embedding dimension, or fewer if asked)")


class EmbedResponse(ModelHeader):
    text_embeddings: Vectors = Field(description="one vector per text, in the order given")
    image_embeddings: Vectors = Field(description="one vector per image, in the order given")
    truncated: list[bool] = Field(description="one per text: true where it was cut to the context length")


class ClassifyRequest(_Request):
    """Zero-shot classification: each image against `labels` (turned into prompts by `templates`)
    or a stored `labelset`, top-k labels per image. As JSON, or as a multipart form with image files
    under `images` and one `labels` field per label."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "images": [EXAMPLE_IMAGE],
                    "labels": ["red circle", "blue square", "green triangle"],
                    "top_k": 2,
                }
            ]
        },
    )
    model: str | None = MODEL_FIELD
    images: list[ImageInput] = Field(
        description=f"images to classify: {IMAGE_FORMS}", examples=[[EXAMPLE_IMAGE]]
    )
    labels: list[str] | None = Field(
        None,
        description="the labels to choose from, a plain string each (or give `labelset`)",
        examples=[["red circle", "blue square", "green triangle"]],
    )
    labelset: str | None = Field(
        None,
        description="name of a stored label set (PUT /v1/labelsets/{name}) instead of `labels`",
        examples=["shapes"],
    )
    templates: Templates | None = Field(
        None,
        description="prompt templates with '{}' for the label, or an ensemble name: default, imagenet80, none",
        examples=[["a photo of a {}."]],
    )
    top_k: int = Field(5, ge=1, description="labels to return per image, best first", examples=[2])


class LabelScore(BaseModel):
    label: str = Field(description="one of the labels given, or of the label set")
    score: float = Field(
        description="the model's probability: softmax(logit_scale * cosine) over all labels (CLIP), or "
        "sigmoid(logit_scale * cosine + logit_bias) for this label alone (SigLIP; scores do not sum to 1)"
    )
    similarity: float | None = Field(
        description="cosine similarity; null from a task model, which has no embedding space"
    )


class ClassifyResult(BaseModel):
    index: int = Field(description="position of the image in the request's `images`")
    labels: list[LabelScore] = Field(description="the top-k labels, best first")


Scoring = Literal["softmax", "sigmoid"]


class ClassifyResponse(ModelHeader):
    scoring: Scoring = Field(description="how `score` was computed from the cosine (the model's own rule)")
    results: list[ClassifyResult] = Field(description="one per image, in the order given")


class LabelSetRequest(_Request):
    """A named label set: its labels are encoded once (with the templates) and kept, so every
    classification against it costs one image encoding."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"labels": ["circle", "square", "triangle", "diamond", "cross"]}]},
    )
    labels: list[str] = Field(
        description="the labels, a plain string each", examples=[["circle", "square", "triangle"]]
    )
    templates: Templates | None = Field(
        None,
        description="prompt templates with '{}', or an ensemble name: default, imagenet80, none",
        examples=["default"],
    )
    model: str | None = MODEL_FIELD


class LabelSetWarming(BaseModel):
    model: str = Field(description="the newly served version (name@version) the set moves to")
    status: Literal["queued", "building", "failed"] = Field(description="its build on that version")
    progress: float = Field(description="share of that class matrix computed, 0..1")


class LabelSetInfo(BaseModel):
    name: str = Field(description="the label set's name")
    model: str = Field(description="the model whose space its class matrix is in")
    labels: list[str] = Field(description="its labels, as they were given")
    label_count: int = Field(description="how many labels")
    templates: list[str] = Field(description="the prompt templates its class vectors were made with")
    status: Literal["ready", "queued", "building", "failed"] = Field(
        description="whether it can classify yet: queued while other builds take this replica's build slots"
    )
    progress: float = Field(description="share of the class matrix computed, 0..1")
    queue_position: int | None = Field(None, description="while queued: its place in line (1: it runs next)")
    error: str | None = Field(None, description="why the build failed, when it did")
    serving: str | None = Field(
        None, description="once ready: the model version (name@version) classification by this set uses now"
    )
    warming: LabelSetWarming | None = Field(
        None,
        description="while the set moves to a newly served version: its build there (until it is done, "
        "`serving` names the previous version)",
    )
    created_at: str = Field(description="when it was stored (ISO 8601)")


class LabelSetList(BaseModel):
    labelsets: list[LabelSetInfo] = Field(description="every stored label set")


class EmbeddingsRequest(_Request):
    """OpenAI-compatible embeddings: the official clients work unchanged."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"model": "shapes-demo", "input": ["a red circle", "a green triangle"]}]
        },
    )
    input: str | list[str] = Field(
        description="a text or a list of texts (images, as base64 or data URIs, with modality image)",
        examples=[["a red circle", "a green triangle"]],
    )
    model: str = Field(description="model name (GET /v1/models lists the ids)", examples=["shapes-demo"])
    encoding_format: EncodingFormat = Field(
        "float", description="float, or base64 of float32 little-endian", examples=["float"]
    )
    modality: Literal["text", "image"] = Field("text", description="what `input` holds", examples=["text"])
    dimensions: Dimensions = Field(None, examples=[None])
    user: str | None = Field(None, description="accepted for compatibility; not used", examples=[None])


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
    id: str = Field(
        description="the model name, as requests give it (`name@version` also works); `name@version` for a "
        "version kept loaded beside the served one"
    )
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
    context_length: int | None = Field(description="the text tower's; null for a task model (none)")
    text_cache: Literal["shared", "local"] | None = Field(
        description="where this model's text vectors are cached: shared (Redis, every replica) or local "
        "(this process: its text tower is faster than a Redis look-up); null for a task model"
    )
    task: bool = Field(
        False,
        description="a task model (clip-distill task): it classifies images among its own labels through "
        "/v1/classify only, with no text tower and no embedding space",
    )
    labels: int | None = Field(None, description="a task model's number of labels")
    source: dict
    default: bool
    status: Literal["serving", "kept"] = Field(
        description="serving: the version a request naming the model gets; kept: an older version still "
        "loaded because collections are bound to it (or a re-embed job moves one to it)"
    )
    kept_for: list[str] = Field(
        default_factory=list, description="what needs this version loaded: collections and re-embed jobs"
    )


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
    """Exactly one of text, image or vector."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"text": "a red circle"}]})
    text: str | None = Field(None, description="a sentence", examples=["a red circle"])
    image: ImageInput | None = Field(None, description=f"an image: {IMAGE_FORMS}", examples=[EXAMPLE_IMAGE])
    vector: list[float] | None = Field(
        None, description="a vector of the model's (or the collection's) dimension", examples=[None]
    )

    @model_validator(mode="after")
    def _one_query(self) -> Query:
        _exactly_one(self, ("text", "image", "vector"))
        return self


class Candidate(_Request):
    """Exactly one of text or image; a plain string is a text candidate."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"text": "a red circle"}]})
    text: str | None = Field(None, description="a sentence", examples=["a red circle"])
    image: ImageInput | None = Field(None, description=f"an image: {IMAGE_FORMS}", examples=[EXAMPLE_IMAGE])

    @model_validator(mode="after")
    def _one_candidate(self) -> Candidate:
        _exactly_one(self, ("text", "image"))
        return self


def _text_item(value: object) -> object:
    return {"text": value} if isinstance(value, str) else value


def _text_item_with_id(value: object) -> object:
    return {"id": value, "text": value} if isinstance(value, str) else value


# A plain string where a text item goes: validated as {"text": ...} (items: its id is the text).
QueryOrText = Annotated[Query, BeforeValidator(_text_item, json_schema_input_type=Query | str)]
CandidateOrText = Annotated[Candidate, BeforeValidator(_text_item, json_schema_input_type=Candidate | str)]


class RankRequest(_Request):
    """One query against candidates given in the request. A plain string is a text (as the query,
    or as a candidate). As a multipart form: `query` and each of `candidates` a text field or an
    image file."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"query": {"image": EXAMPLE_IMAGE}, "candidates": ["a red circle", "a blue square"]}]
        },
    )
    model: str | None = MODEL_FIELD
    query: QueryOrText = Field(
        description="the query: a plain string (a text), or one of text, image or vector",
        examples=[{"image": EXAMPLE_IMAGE}],
    )
    candidates: list[CandidateOrText] = Field(
        min_length=1,
        description="what to rank: plain strings (texts), or objects with a text or an image",
        examples=[["a red circle", "a blue square", {"image": EXAMPLE_IMAGE}]],
    )
    top_k: int | None = Field(None, description="results to return; all candidates when absent", examples=[2])
    probabilities: bool = Field(
        False,
        description="also give the model's probabilities (softmax over the candidates, or sigmoid)",
        examples=[True],
    )


class RankResult(BaseModel):
    index: int = Field(description="position of the candidate in the request's `candidates`")
    score: float = Field(description="cosine similarity to the query")
    probability: float | None = Field(None, description="the model's probability, when asked for")


class RankResponse(ModelHeader):
    scoring: Scoring | None = Field(None, description="how `probability` was computed, when asked for")
    results: list[RankResult] = Field(description="candidates, best first")


class IndexOptions(_Request):
    """Index parameters; each has a sensible default for its index kind (HNSW's shown)."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"m": 32, "ef_construction": 200, "ef_search": 64}]}
    )
    m: int | None = Field(None, description="HNSW links per node", examples=[32])
    ef_construction: int | None = Field(None, description="HNSW build candidate list", examples=[200])
    ef_search: int | None = Field(None, description="HNSW search candidate list", examples=[64])
    nlist: int | None = Field(None, description="IVF lists", examples=[1024])
    nprobe: int | None = Field(None, description="IVF lists visited per search", examples=[16])


class CreateCollection(_Request):
    """A collection bound to a served model's embedding space."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"name": "my-images"}]})
    name: str = Field(description="the collection's name, used in its URLs", examples=["my-images"])
    model: str | None = MODEL_FIELD
    dimensions: Dimensions = Field(None, examples=[None])
    index: Literal["flat", "hnsw", "ivf"] = Field(
        "flat", description="flat: exact; hnsw, ivf: approximate, for large collections", examples=["flat"]
    )
    index_params: IndexOptions = Field(
        default_factory=IndexOptions,
        description="parameters of the index (none needed for flat)",
        json_schema_extra={"examples": [{}]},
    )
    on_model_update: Literal["reembed", "pin"] | None = Field(
        None,
        description="what a newly published version of the model does to the collection: reembed (a job "
        "moves it in the background, searches answering meanwhile) or pin (it stays on its version until "
        "POST /v1/collections/{name}/reembed); default: pin when `model` names a version (tiny@2), "
        "else reembed",
        examples=[None],
    )


class Item(_Request):
    """One item: an id and exactly one of text, image or vector, with metadata to filter on; or a
    vector made elsewhere together with the text or image it was made from (the request's
    `content_hash` then names the model that made it), so the item keeps its source."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"id": "red-circle", "image": EXAMPLE_IMAGE, "metadata": {"file": "red.png"}}]
        },
    )
    id: str | int = Field(description="the item's id; an existing id is replaced", examples=["red-circle"])
    text: str | None = Field(None, description="a text to embed", examples=["a red circle"])
    image: ImageInput | None = Field(
        None, description=f"an image to embed: {IMAGE_FORMS}", examples=[EXAMPLE_IMAGE]
    )
    vector: list[float] | None = Field(
        None,
        description="a vector of the collection's dimension; alone, or with the text or image it was "
        "made from when the request gives `content_hash`",
        examples=[None],
    )
    metadata: dict[str, Any] = Field(
        default_factory=dict, description="fields to filter searches on", examples=[{"file": "red.png"}]
    )

    @model_validator(mode="after")
    def _one_source(self) -> Item:
        if self.vector is not None and (self.text is not None or self.image is not None):
            _exactly_one(self, ("text", "image"))
        else:
            _exactly_one(self, ("text", "image", "vector"))
        return self

    @property
    def precomputed(self) -> bool:
        """A vector given together with its source: stored as it is, the source kept beside it."""
        return self.vector is not None and (self.text is not None or self.image is not None)


ItemOrText = Annotated[Item, BeforeValidator(_text_item_with_id, json_schema_input_type=Item | str)]


class UpsertItems(_Request):
    """Items to add or replace. A plain string is a text item whose id is the text itself. As a
    multipart form: image files under `items` (each file's name is its id and `metadata.file`)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "items": [
                        {"id": "red-circle", "image": EXAMPLE_IMAGE, "metadata": {"file": "red.png"}},
                        "a blue square",
                    ]
                }
            ]
        },
    )
    items: list[ItemOrText] = Field(
        min_length=1,
        description="items: objects with an id, or plain strings (text items, id = the text)",
        examples=[[{"id": "red-circle", "image": EXAMPLE_IMAGE}, "a blue square"]],
    )
    content_hash: str | None = Field(
        None,
        description="the bundle content hash of the model that made the items' vectors (GET /v1/models "
        "lists it); needed when an item gives a vector with its text or image, and refused with "
        "409 model_mismatch unless it is the collection's",
        examples=[None],
    )


class SearchRequest(Query):
    """Nearest items to exactly one of text, image or vector. As a multipart form: the image as a
    file under `image`."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"text": "a red circle", "top_k": 5}]}
    )
    top_k: int = Field(10, description="results to return, best first", examples=[5])
    min_score: float | None = Field(
        None, description="leave out items whose cosine similarity is below this", examples=[0.0]
    )
    filter: dict[str, Any] | None = Field(
        None, description="field: value, all must be equal", examples=[{"file": "red.png"}]
    )


class ReembedRequest(_Request):
    """Which model version to move the collection to, and what to do with items that cannot move."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{}]})
    model: str | None = Field(
        None,
        description="model to move to, as name (its served version) or name@version; default: the version "
        "now served of the model the collection is bound to",
        examples=["shapes-demo"],
    )
    drop_unembeddable: bool = Field(
        False,
        description="items that cannot be embedded again (added as bare vectors, or whose source no longer "
        "embeds) are deleted at the switch; without it the switch waits for them to be re-added. Asked "
        "again for a running job, it updates that job (and its failed items are tried again)",
        examples=[False],
    )


class RollbackRequest(_Request):
    """How to go back to the space a collection was moved from."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{}]})
    drop_unembeddable: bool = Field(
        False,
        description="items added since the switch as bare vectors of the new space have no vector of the "
        "previous one: deleted with this, else the rollback is refused naming them",
        examples=[False],
    )


class JobSummary(BaseModel):
    id: str
    state: str
    model: str = Field(description="the model the job moves the collection to")
    version: int
    done: int
    total: int


class PreviousSpace(BaseModel):
    model: str
    version: int
    until: str | None = Field(description="when it is given up; POST .../rollback goes back to it before")


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
        description="current: the collection is bound to the version served under its model's name; stale: "
        "a newer version is served, and the collection's own version (kept loaded) answers until a re-embed "
        "moves it; not_served: no model of that name is served"
    )
    on_model_update: Literal["reembed", "pin"] = Field(
        description="reembed: a newly published version starts a re-embed job; pin: the collection stays on "
        "its version until asked"
    )
    job: JobSummary | None = Field(None, description="the re-embed job moving the collection, if any")
    previous: PreviousSpace | None = Field(
        None, description="the space the last switch moved from, kept (and written) for a rollback"
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


class SearchResponse(ModelHeader):
    results: list[Hit]


class JobItemError(BaseModel):
    id: str = Field(description="the item's id")
    type: str = Field(description="why, as the API names errors: invalid_image, text_too_long, ...")
    message: str


class Job(BaseModel):
    """A background re-embed of a collection: where it is, how fast it goes, what could not move."""

    id: str
    object: Literal["job"] = "job"
    kind: Literal["reembed"] = "reembed"
    collection: str
    state: Literal[
        "pending", "running", "waiting", "switched", "completed", "cancelled", "rolled_back", "failed"
    ] = Field(
        description="pending: not started yet; running: embedding; waiting: every item that can move has, "
        "the switch waits for the others (re-add them, or ask again with drop_unembeddable); switched: the "
        "collection answers from the new space, the old one kept for rollback until keep_until; completed; "
        "cancelled; rolled_back; failed (see message)"
    )
    model: str = Field(description="the model version it moves the collection to, name@version")
    from_model: str = Field(description="the version the collection was bound to, name@version")
    auto: bool = Field(description="started by the collection's policy when the version was published")
    drop_unembeddable: bool
    done: int = Field(description="items moved (or failed) so far")
    total: int = Field(description="items in the collection")
    rate: float | None = Field(description="items per second since it (re)started")
    eta_s: float | None = Field(description="seconds to go at that rate")
    errors: int = Field(description="items whose source did not embed")
    error_samples: list[JobItemError] = Field(description="the first of them, with why")
    unembeddable: int = Field(description="items added as bare vectors, which cannot be embedded again")
    unembeddable_ids: list[str] = Field(description="the first of them")
    owner: str | None = Field(description="the replica running it")
    created_at: str
    started_at: str | None
    switched_at: str | None
    finished_at: str | None
    keep_until: str | None = Field(description="until when POST /v1/collections/{name}/rollback goes back")
    message: str | None


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Job]
