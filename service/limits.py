"""The server's input limits, checked before any work is done, with errors that name the item.

Every check raises a domain error (`TooLarge` for a limit of this server, `InvalidInput` for
something no server would accept) whose message names the field as the caller wrote it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from clipserve.contract.bundle import NAME_RULE, is_valid_name
from clipserve.service.errors import InvalidInput, TooLarge
from clipserve.service.settings import Settings


def check_texts(texts: Sequence[str], settings: Settings, field: str = "texts") -> None:
    """Texts to embed: at most `max_texts_per_request`, none empty, none over `max_text_chars`."""
    if len(texts) > settings.max_texts_per_request:
        raise TooLarge(
            f"{field}: {len(texts)} given, at most {settings.max_texts_per_request} per request",
            code="too_many_texts",
        )
    check_item_texts(dict(enumerate(texts)), settings, field, item_field="")


def check_item_texts(
    texts: Mapping[int, str], settings: Settings, field: str, item_field: str = ".text"
) -> None:
    """Texts that are members of a list of items (`candidates[3].text`): the same limits, by position."""
    if len(texts) > settings.max_texts_per_request:
        raise TooLarge(
            f"{field}: {len(texts)} texts given, at most {settings.max_texts_per_request} per request",
            code="too_many_texts",
        )
    for position, text in texts.items():
        where = f"{field}[{position}]{item_field}"
        if not text.strip():
            raise InvalidInput(f"{where} is an empty string", index=position)
        if len(text) > settings.max_text_chars:
            raise TooLarge(
                f"{where} has {len(text)} characters, at most {settings.max_text_chars} allowed",
                code="text_too_long",
                index=position,
            )


def check_images(count: int, settings: Settings, field: str = "images") -> None:
    if count > settings.max_images_per_request:
        raise TooLarge(
            f"{field}: {count} given, at most {settings.max_images_per_request} per request",
            code="too_many_images",
        )


def check_classify(images: int, top_k: int, settings: Settings) -> None:
    """A classification's images (at least one, within `max_images_per_request`) and its `top_k`."""
    if not images:
        raise InvalidInput("images: the list is empty; give at least one image")
    check_images(images, settings)
    check_top_k(top_k, settings)


def check_labels(labels: Sequence[str], limit: int, max_chars: int, field: str = "labels") -> None:
    """Class labels: at least one, at most `limit`, none empty or over `max_chars`, no duplicates."""
    if not labels:
        raise InvalidInput(f"{field}: the list is empty; give at least one label")
    if len(labels) > limit:
        raise InvalidInput(f"{field}: {len(labels)} given, at most {limit} allowed", code="too_many_labels")
    seen: dict[str, int] = {}
    for index, label in enumerate(labels):
        if not label.strip():
            raise InvalidInput(f"{field}[{index}] is empty", index=index)
        if len(label) > max_chars:
            raise InvalidInput(
                f"{field}[{index}] has {len(label)} characters, at most {max_chars} allowed",
                code="text_too_long",
                index=index,
            )
        if label in seen:
            raise InvalidInput(f"{field}[{index}] {label!r} duplicates {field}[{seen[label]}]", index=index)
        seen[label] = index


def check_prompts(labels: int, templates: int, limit: int, setting: str, advice: str = "") -> None:
    """Labels x templates, the prompts a class matrix encodes, within `limit` (named by `setting`)."""
    if labels * templates > limit:
        raise TooLarge(
            f"labels x templates: {labels} x {templates} = {labels * templates} prompts, at most {limit} "
            f"allowed ({setting}){advice}",
            code="too_many_prompts",
        )


def check_top_k(top_k: int | None, settings: Settings) -> None:
    if top_k is None:
        return
    if top_k < 1:
        raise InvalidInput(f"top_k must be at least 1, got {top_k}")
    if top_k > settings.max_top_k:
        raise InvalidInput(f"top_k {top_k} is over the limit of {settings.max_top_k}")


def check_name(name: str, what: str) -> None:
    """A label set's or collection's name: the same rule as model names."""
    if not is_valid_name(name):
        raise InvalidInput(f"{what} name {name!r}: {NAME_RULE}")


def unit_vector(values: Sequence[float], dim: int, field: str = "vector") -> np.ndarray:
    """A caller's vector as a unit float32 row; refused for a wrong dim, NaN/inf or all zeros."""
    vector = np.asarray(values, dtype=np.float32)
    if vector.shape != (dim,):
        raise InvalidInput(
            f"{field} has {vector.size} dimensions, the model's space has {dim}", code="invalid_vector"
        )
    if not np.isfinite(vector).all():
        raise InvalidInput(f"{field} contains NaN or infinity", code="invalid_vector")
    norm = float(np.linalg.norm(vector))
    if norm == 0:
        raise InvalidInput(f"{field} is all zeros and has no direction", code="invalid_vector")
    return vector / norm
