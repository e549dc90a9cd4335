"""Request and response models of the public API (pydantic v2). Requests refuse unknown fields."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

EncodingFormat = Literal["float", "base64"]
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
    score: float = Field(description="softmax(logit_scale * cosine) over all labels")
    similarity: float = Field(description="cosine similarity")


class ClassifyResult(BaseModel):
    index: int
    labels: list[LabelScore]


class ClassifyResponse(BaseModel):
    model: str
    version: int
    dim: int
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
    dimensions: int | None = Field(None, description="accepted only when equal to the model's dim")
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
    name: str
    version: int
    dim: int
    content_hash: str
    precision: dict[str, str]
    providers: list[str]
    logit_scale: float
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
