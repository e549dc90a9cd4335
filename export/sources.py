"""Where a model to export comes from: an open_clip name (+ pretrained tag or file), a local
checkpoint, or a custom architecture given as a JSON config. Every failure says what to do."""

from __future__ import annotations

import copy
import difflib
import json
import logging
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.tokenizer import HFTokenizer
from open_clip.transform import PreprocessCfg
from torch import nn

from clipserve.contract.bundle import ModelSource, sha256_file
from clipserve.export.errors import SourceError
from clipserve.export.logs import quiet_logs

RANDOM_INIT = "none"
PREPROCESS_KEYS = tuple(field.name for field in fields(PreprocessCfg))
CONFIG_FILE = "open_clip_config.json"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
_SHOWN_KEYS = 8
_CAUSE_CHARS = 240
VOCAB_SLACK = 64


@dataclass(frozen=True)
class LoadedModel:
    model: nn.Module
    source: ModelSource


def suggest(name: str, known: list[str], count: int = 5) -> list[str]:
    """Close matches, case-insensitive, best first."""
    lowered = {k.lower(): k for k in known}
    matches = difflib.get_close_matches(name.lower(), list(lowered), n=count, cutoff=0.5)
    return [lowered[m] for m in matches]


def builtin_config(name: str) -> dict[str, Any]:
    config = open_clip.get_model_config(name)
    if config is None:
        close = suggest(name, open_clip.list_models())
        hint = f"; did you mean {', '.join(close)}?" if close else "; `clip-export --list-models` lists them"
        raise SourceError(f"unknown open_clip model {name!r}{hint}")
    return config


def read_config_file(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A JSON model config, bare ({embed_dim, vision_cfg, text_cfg}) or open_clip_config.json style
    ({model_cfg, preprocess_cfg}); returns (model_cfg, preprocess_cfg)."""
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise SourceError(f"model config {path} does not exist") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise SourceError(f"cannot read model config {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise SourceError(f"model config {path} must hold a JSON object")
    model_cfg = raw.get("model_cfg", raw)
    missing = [key for key in ("embed_dim", "vision_cfg", "text_cfg") if key not in model_cfg]
    if missing:
        raise SourceError(f"model config {path} lacks {', '.join(missing)}")
    return model_cfg, raw.get("preprocess_cfg", {})


def check_text_tower_supported(architecture: str, model_cfg: Mapping[str, Any]) -> None:
    """Refuse, in one line naming what is missing, an architecture a bundle cannot hold."""
    text_cfg = model_cfg.get("text_cfg", {})
    if model_cfg.get("multimodal_cfg"):
        raise SourceError(
            f"{architecture} is a captioning model (CoCa): its text decoder has no place in a bundle; "
            "only CLIP-style models (an image and a text tower) are exported"
        )
    if text_cfg.get("tokenizer_mode"):
        raise SourceError(
            f"{architecture} uses open_clip's tokenizer mode {text_cfg['tokenizer_mode']!r}, which clipserve "
            "bundles do not reproduce (supported: the standard Hugging Face tokenizer call, and CLIP BPE)"
        )


def hf_tokenizer_name(model_cfg: Mapping[str, Any]) -> str | None:
    """The Hugging Face tokenizer (hub name or folder) the config names; None for CLIP BPE."""
    return model_cfg.get("text_cfg", {}).get("hf_tokenizer_name") or None


def load_hf_tokenizer(
    architecture: str, model_cfg: Mapping[str, Any], tokenizer: str | Path | None = None
) -> HFTokenizer | None:
    """open_clip's tokenizer for a model with a Hugging Face tokenizer, as open_clip builds it (context
    length, cleaning, strip_sep_token from the config), loaded from `tokenizer` (a folder or hub name)
    or else from the name in the config. None for a CLIP-BPE model."""
    named = hf_tokenizer_name(model_cfg)
    if named is None:
        if tokenizer is not None:
            raise SourceError(
                f"{architecture} uses CLIP's BPE tokenizer, which every bundle carries; --tokenizer is "
                "for models with a Hugging Face tokenizer"
            )
        return None
    text_cfg = model_cfg.get("text_cfg", {})
    where = str(tokenizer or named)
    if (
        tokenizer is not None
        and not Path(where).exists()
        and (where.startswith((".", "~")) or Path(where).is_absolute())
    ):
        raise SourceError(f"tokenizer folder {where} does not exist")
    if Path(where).is_file():
        raise SourceError(
            f"tokenizer {where} is a file; give the folder holding tokenizer.json (as save_pretrained writes it)"
        )
    kwargs = dict(text_cfg.get("tokenizer_kwargs", {}))
    try:
        with quiet_logs(logging.ERROR):
            return HFTokenizer(where, context_length=int(text_cfg.get("context_length", 77)), **kwargs)
    except Exception as exc:
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        cause = cause if len(cause) <= _CAUSE_CHARS else cause[:_CAUSE_CHARS] + "…"
        raise SourceError(
            f"cannot load the Hugging Face tokenizer {where!r} of {architecture} (offline, or not a tokenizer "
            f"folder?): pass a local copy with --tokenizer DIR, a folder holding tokenizer.json  (cause: {cause})"
        ) from exc


def tokenizer_size(tokenizer: HFTokenizer) -> int:
    """Ids the tokenizer can produce, added tokens included."""
    return len(tokenizer.tokenizer)


def check_tokenizer_vocab(architecture: str, tokenizer: HFTokenizer, vocab_size: int, where: str) -> None:
    """Refuse a tokenizer whose ids do not fit the text tower's embedding table. A table may have a few
    rows more than the tokenizer has ids (rounded up for speed: NLLB's 256206 for 256204 ids)."""
    size = tokenizer_size(tokenizer)
    if size > vocab_size or vocab_size - size > VOCAB_SLACK:
        raise SourceError(
            f"the tokenizer {where} has {size} ids but {architecture}'s text tower has a vocabulary of "
            f"{vocab_size}: it is not this model's tokenizer"
        )


def model_from_config(
    model_cfg: Mapping[str, Any], preprocess_cfg: Mapping[str, Any] | None = None
) -> nn.Module:
    """A random-init model of a custom architecture, with open_clip's preprocessing defaults merged
    with `preprocess_cfg`, exactly as open_clip itself builds one from a local config."""
    check_text_tower_supported("the custom architecture", model_cfg)
    with tempfile.TemporaryDirectory(prefix="clipserve-config-") as folder:
        document = {"model_cfg": dict(model_cfg), "preprocess_cfg": dict(preprocess_cfg or {})}
        (Path(folder) / CONFIG_FILE).write_text(json.dumps(document))
        try:
            with quiet_logs(logging.ERROR):
                # pretrained_text=False: a Hugging Face text tower is built from its config, no weights
                model = open_clip.create_model(
                    f"local-dir:{folder}", load_weights=False, pretrained_text=False
                )
        except OSError as exc:
            hf_name = model_cfg.get("text_cfg", {}).get("hf_model_name")
            cause = (
                str(exc).strip().splitlines()[0][:_CAUSE_CHARS] if str(exc).strip() else type(exc).__name__
            )
            raise SourceError(
                f"cannot build the Hugging Face text model {hf_name!r}: its config.json is not here (offline?); "
                "use a --config whose text_cfg.hf_model_name is a folder holding that config.json  "
                f"(cause: {cause})"
                if hf_name
                else f"cannot build the model: {cause}"
            ) from exc
        except (TypeError, KeyError, ValueError, RuntimeError, AssertionError) as exc:
            raise SourceError(f"invalid model config: {type(exc).__name__}: {exc}") from exc
    return model.eval()


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A bare state_dict, {"state_dict": ...} (training checkpoints), or `module.`-prefixed (DDP)."""
    if not path.is_file():
        raise SourceError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            loaded: Any = load_file(str(path), device="cpu")
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load's errors on junk: KeyError, UnpicklingError, RuntimeError ...
        raise SourceError(
            f"cannot read checkpoint {path}: it is not a PyTorch (.pt, .bin) or .safetensors file of weights "
            f"({type(exc).__name__}); save one with torch.save(model.state_dict(), path)"
        ) from None
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if (
        not isinstance(loaded, Mapping)
        or not loaded
        or not all(isinstance(v, torch.Tensor) for v in loaded.values())
    ):
        raise SourceError(f"checkpoint {path} holds no state_dict (a mapping of parameter names to tensors)")
    if all(key.startswith("module.") for key in loaded):
        loaded = {key.removeprefix("module."): value for key, value in loaded.items()}
    return dict(loaded)


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN_KEYS])
    return shown + (f" (and {len(keys) - _SHOWN_KEYS} more)" if len(keys) > _SHOWN_KEYS else "")


def load_weights(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], path: Path, architecture: str
) -> None:
    """Load strictly; a checkpoint of another architecture is refused naming the keys that differ."""
    expected = model.state_dict()
    # logit_scale is a 0-d or 1-element tensor depending on the open_clip version that saved it.
    state_dict = {
        key: value.reshape(expected[key].shape)
        if key in expected and value.numel() == expected[key].numel() and key.startswith("logit_")
        else value
        for key, value in state_dict.items()
    }
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = sorted(
        f"{key} {tuple(state_dict[key].shape)} vs {tuple(expected[key].shape)}"
        for key in set(expected) & set(state_dict)
        if state_dict[key].shape != expected[key].shape
    )
    problems = []
    if missing:
        problems.append(f"missing keys: {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listed(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches (checkpoint vs model): {_listed(mismatched)}")
    if problems:
        raise SourceError(
            f"checkpoint {path} does not fit architecture {architecture}: " + "; ".join(problems)
        )
    model.load_state_dict(state_dict, strict=True)


def check_tag(name: str, tag: str) -> None:
    tags = open_clip.list_pretrained_tags_by_model(name)
    if tag not in tags:
        known = ", ".join(tags) if tags else "none published"
        raise SourceError(
            f"{name} has no pretrained tag {tag!r} (tags: {known}); use --pretrained none for random "
            "weights or --checkpoint PATH for a local file"
        )


def tag_preprocess(name: str, tag: str) -> dict[str, Any]:
    """The preprocessing published with a pretrained tag (e.g. MobileCLIP's mean 0 / std 1)."""
    check_tag(name, tag)
    tag_cfg = open_clip.get_pretrained_cfg(name, tag)
    return {key: tag_cfg[key] for key in PREPROCESS_KEYS if key in tag_cfg}


def architecture_preprocess(name: str) -> dict[str, Any]:
    """The preprocessing every published tag of an architecture shares (SigLIP's squash resize and 0.5
    mean/std, MobileCLIP's 0/1): what its weights expect, so a random-init or untagged export gets it
    too. Empty when the tags disagree or there are none (open_clip's defaults apply)."""
    configs = [
        {key: tag_cfg[key] for key in PREPROCESS_KEYS if key in tag_cfg}
        for tag in open_clip.list_pretrained_tags_by_model(name)
        if (tag_cfg := open_clip.get_pretrained_cfg(name, tag))
    ]
    shared = [json.dumps(config, sort_keys=True, default=list) for config in configs]
    return configs[0] if configs and len(set(shared)) == 1 else {}


def _create_pretrained(name: str, tag: str) -> nn.Module:
    check_tag(name, tag)
    try:
        with quiet_logs(logging.ERROR):
            return open_clip.create_model(name, pretrained=tag)
    except Exception as exc:
        cause = str(exc) if len(str(exc)) <= _CAUSE_CHARS else str(exc)[:_CAUSE_CHARS] + "…"
        raise SourceError(
            f"could not fetch the {name} weights {tag!r}: this machine looks offline or the hub is "
            f"unreachable. Download the checkpoint on a connected machine and pass it as a local file: "
            f"--model {name} --pretrained {tag} --checkpoint PATH  (cause: {cause})"
        ) from exc


def _looks_like_a_path(value: str) -> bool:
    return Path(value).is_file() or "/" in value or value.endswith(CHECKPOINT_SUFFIXES)


def load_model(
    name: str | None = None,
    pretrained: str | None = RANDOM_INIT,
    checkpoint: Path | str | None = None,
    config: Path | str | None = None,
    seed: int = 0,
) -> LoadedModel:
    """Build the model to export.

    - `name` + `pretrained` tag: open_clip weights (`none`: random init with `seed`);
    - `name` or `config` + `checkpoint`: a local file (bare, {"state_dict": ...} or `module.`-prefixed);
      with a pretrained tag too, the file holds that tag's weights and its preprocessing is used;
    - `config`: a JSON architecture (bare model config or open_clip_config.json style).
    """
    if name is None and config is None:
        raise SourceError("say which model: a model name (--model) or a JSON config (--config)")
    if config is not None:
        model_cfg, preprocess_cfg = read_config_file(Path(config))
        architecture = name or Path(config).stem
    else:
        model_cfg, preprocess_cfg = builtin_config(name), architecture_preprocess(name)
        architecture = name
    check_text_tower_supported(architecture, model_cfg)
    if pretrained and pretrained != RANDOM_INIT and _looks_like_a_path(pretrained):
        checkpoint, pretrained = pretrained, None
    tagged = pretrained not in (None, RANDOM_INIT)
    source = {"architecture": architecture, "config": copy.deepcopy(model_cfg)}
    torch.manual_seed(seed)
    if checkpoint is None and tagged:
        if config is not None:
            raise SourceError(
                "a pretrained tag needs an open_clip model name; with --config pass --checkpoint"
            )
        model = _create_pretrained(architecture, pretrained)
        return LoadedModel(model.eval(), ModelSource(pretrained=pretrained, **source))
    if checkpoint is None:
        return LoadedModel(
            model_from_config(model_cfg, preprocess_cfg), ModelSource(pretrained=RANDOM_INIT, **source)
        )
    if tagged:
        preprocess_cfg = {**tag_preprocess(architecture, pretrained), **preprocess_cfg}
    path = Path(checkpoint)
    state_dict = read_state_dict(path)
    model = model_from_config(model_cfg, preprocess_cfg)
    load_weights(model, state_dict, path, architecture)
    return LoadedModel(
        model.eval(),
        ModelSource(pretrained=pretrained if tagged else None, checkpoint_sha256=sha256_file(path), **source),
    )
