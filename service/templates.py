"""Prompt templates for zero-shot classification.

`templates` in a request is a list of strings each holding `{}` (replaced by the label, as
`clipserve.contract.scoring.fill_template` does for the service and training alike), or the
name of a built-in ensemble: `default` (a short general ensemble), `imagenet80` (the 80 ImageNet
templates of the CLIP paper) or `none` (the label alone).

Every `{}` of a template is a copy of the label, so a template's length and its count of `{}` are
limits of the server (`max_template_chars`, `max_template_slots`), checked before any prompt is built.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources

from clipserve.service.errors import InvalidInput, TooLarge
from clipserve.service.settings import Settings

DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a close-up photo of a {}.",
    "a cropped photo of the {}.",
    "a bright photo of a {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
    "art of the {}.",
)


@cache
def builtin_templates() -> dict[str, tuple[str, ...]]:
    data = json.loads(resources.files("clipserve.service").joinpath("templates.json").read_text())
    return {"default": DEFAULT_TEMPLATES, "none": ("{}",), **{k: tuple(v) for k, v in data.items()}}


def resolve_templates(value: list[str] | str | None, settings: Settings) -> tuple[str, ...]:
    """The templates a request names or gives, each within the server's limits."""
    if value is None:
        return DEFAULT_TEMPLATES
    if isinstance(value, str):
        named = builtin_templates().get(value)
        if named is None:
            known = ", ".join(sorted(builtin_templates()))
            raise InvalidInput(f"templates: unknown ensemble {value!r}; known: {known}")
        return named
    if not value:
        raise InvalidInput("templates: the list is empty")
    if len(value) > settings.max_templates:
        raise InvalidInput(f"templates: {len(value)} given, at most {settings.max_templates} allowed")
    for index, template in enumerate(value):
        check_template(template, index, settings)
    if len(set(value)) != len(value):
        raise InvalidInput("templates: the list has duplicates")
    return tuple(value)


def check_template(template: str, index: int, settings: Settings) -> None:
    """One template: within `max_template_chars`, with one to `max_template_slots` `{}`."""
    if len(template) > settings.max_template_chars:
        raise TooLarge(
            f"templates[{index}] has {len(template)} characters, at most {settings.max_template_chars} "
            "allowed (max_template_chars)",
            code="template_too_long",
            index=index,
        )
    slots = template.count("{}")
    if not slots:
        raise InvalidInput(f"templates[{index}]: {template!r} has no '{{}}' for the label", index=index)
    if slots > settings.max_template_slots:
        raise TooLarge(
            f"templates[{index}] has {slots} '{{}}', at most {settings.max_template_slots} allowed "
            "(max_template_slots): each is a copy of the label",
            code="too_many_slots",
            index=index,
        )
