"""Teachers and students: creation from open_clip names, JSON configs, checkpoints and our own runs;
the frozen teacher (single or ensemble); weight inheritance from a teacher into a smaller student."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from clipserve.contract import scoring
from clipserve.contract.bundle import sha256_file
from clipserve.contract.scoring import prompts
from clipserve.export.sources import suggest

RUN_CONFIG_FILE = "open_clip_config.json"
RUN_WEIGHTS_FILE = "open_clip_model.safetensors"


class ModelSpecError(ValueError):
    """A teacher or student reference that cannot be turned into a model; the message says why."""


@dataclass
class ClipModel:
    """An open_clip CLIP model with everything needed to feed it and to say where it came from."""

    model: nn.Module
    model_cfg: dict[str, Any]
    preprocess_cfg: dict[str, Any]
    tokenizer: Any
    architecture: str
    pretrained: str | None = None
    checkpoint_sha256: str | None = None

    @property
    def embed_dim(self) -> int:
        return int(self.model_cfg["embed_dim"])

    @property
    def context_length(self) -> int:
        return int(self.model_cfg["text_cfg"].get("context_length", 77))

    @property
    def image_key(self) -> str:
        """Models with equal keys take identical pixel tensors, so a batch is prepared once per key."""
        return json.dumps(self.preprocess_cfg, sort_keys=True, default=list)

    @property
    def text_key(self) -> str:
        """Models with equal keys take identical token ids, so captions are tokenized once per key."""
        inner = getattr(self.tokenizer, "tokenizer", None)  # open_clip's HFTokenizer wraps a transformers one
        origin = getattr(inner, "name_or_path", None)
        name = type(self.tokenizer).__name__
        return f"{name}:{origin}:{self.context_length}" if origin else f"{name}:{self.context_length}"

    @property
    def scoring(self) -> scoring.Scoring:
        """The model's zero-shot scoring rule: softmax (CLIP) or per-label sigmoid (SigLIP)."""
        from clipserve.export.exporter import model_scoring

        return model_scoring(self.model)

    def parameter_counts(self) -> dict[str, int]:
        visual = sum(p.numel() for p in self.model.visual.parameters())
        total = sum(p.numel() for p in self.model.parameters())
        return {"image": visual, "text": total - visual - self.model.logit_scale.numel(), "total": total}


def _friendly_to_open_clip(cfg: dict[str, Any]) -> dict[str, Any]:
    """Accept {'embed_dim', 'vision': {...}, 'text': {...}} with `heads` and turn it into open_clip's model_cfg."""
    try:
        vision, text = dict(cfg["vision"]), dict(cfg["text"])
        embed_dim = int(cfg["embed_dim"])
    except KeyError as exc:
        raise ModelSpecError(
            f"student config lacks {exc.args[0]!r}: expected embed_dim, vision and text"
        ) from exc
    vision_heads = int(vision.pop("heads", max(1, int(vision["width"]) // 64)))
    if int(vision["width"]) % vision_heads:
        raise ModelSpecError(f"vision width {vision['width']} is not divisible by {vision_heads} heads")
    vision["head_width"] = int(vision["width"]) // vision_heads
    text.setdefault("heads", max(1, int(text["width"]) // 64))
    text.setdefault("vocab_size", 49408)
    text.setdefault("context_length", 77)
    if int(text["width"]) % int(text["heads"]):
        raise ModelSpecError(f"text width {text['width']} is not divisible by {text['heads']} heads")
    return {"embed_dim": embed_dim, "vision_cfg": vision, "text_cfg": text}


def read_config_with_preprocess(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model_cfg, preprocess_cfg) of a JSON config: bare, friendly, or open_clip_config.json style
    (whose preprocess_cfg, e.g. SigLIP's squash resize and 0.5 mean/std, the model keeps)."""
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise ModelSpecError(f"model config {path} does not exist") from exc
    except json.JSONDecodeError as exc:
        raise ModelSpecError(f"model config {path} is not valid JSON: {exc}") from exc
    preprocess = dict(raw.get("preprocess_cfg", {})) if "model_cfg" in raw else {}
    if "model_cfg" in raw:
        raw = raw["model_cfg"]
    return (raw if "vision_cfg" in raw else _friendly_to_open_clip(raw)), preprocess


def run_model_dir(ref: str | Path) -> Path | None:
    """The folder holding a trained model of ours: a run's `final/` or the folder itself."""
    path = Path(str(ref).removeprefix("local-dir:"))
    for candidate in (path / "final", path):
        if (candidate / RUN_CONFIG_FILE).is_file():
            return candidate
    return None


def _needs_factory(model_cfg: dict[str, Any]) -> bool:
    """Configs open_clip.CLIP cannot build alone: a custom text tower (SigLIP) or a Hugging Face one."""
    text_cfg = model_cfg.get("text_cfg", {})
    return bool(model_cfg.get("custom_text") or text_cfg.get("hf_model_name"))


def model_tokenizer(model_cfg: dict[str, Any], architecture: str) -> Any:
    """open_clip's tokenizer for a config: its Hugging Face tokenizer (a folder or hub name in
    `text_cfg.hf_tokenizer_name`, with the config's cleaning) or CLIP's BPE."""
    from clipserve.export.errors import SourceError
    from clipserve.export.sources import load_hf_tokenizer

    try:
        tokenizer = load_hf_tokenizer(architecture, model_cfg)
    except SourceError as exc:
        raise ModelSpecError(str(exc).replace("--tokenizer DIR", "text_cfg.hf_tokenizer_name = DIR")) from exc
    if tokenizer is not None:
        return tokenizer
    text_cfg = model_cfg["text_cfg"]
    clean = text_cfg.get("tokenizer_kwargs", {}).get("clean", "lower")
    return open_clip.SimpleTokenizer(context_length=int(text_cfg.get("context_length", 77)), clean=clean)


def _from_config(
    model_cfg: dict[str, Any],
    architecture: str,
    seed: int,
    preprocess_cfg: dict[str, Any] | None = None,
) -> ClipModel:
    torch.manual_seed(seed)
    cfg = copy.deepcopy(model_cfg)
    tokenizer = model_tokenizer(cfg, architecture)
    if _needs_factory(cfg):
        from clipserve.export.errors import SourceError
        from clipserve.export.sources import model_from_config

        try:
            model = model_from_config(cfg, preprocess_cfg)
        except SourceError as exc:
            raise ModelSpecError(str(exc)) from exc
        preprocess = dict(open_clip.get_model_preprocess_cfg(model))
    else:
        model = open_clip.CLIP(**cfg)
        size = model.visual.image_size
        preprocess = dict(vars(open_clip.transform.PreprocessCfg()))
        preprocess["size"] = list(size) if isinstance(size, tuple) else [size, size]
        preprocess.update(preprocess_cfg or {})
        open_clip.set_model_preprocess_cfg(model, preprocess)
    return ClipModel(model, model_cfg, preprocess, tokenizer, architecture)


def check_model_ref(ref: str) -> None:
    """Refuse, in a moment and before anything is built, a ref that names no model we can build."""
    if run_model_dir(ref) is not None or ref.endswith(".json"):
        if ref.endswith(".json") and not Path(ref).is_file():
            raise ModelSpecError(f"model config {ref} does not exist")
        return
    if open_clip.get_model_config(ref) is None:
        close = suggest(ref, open_clip.list_models())
        hint = f"did you mean {', '.join(close)}?" if close else "see open_clip.list_models()"
        raise ModelSpecError(
            f"unknown model {ref!r}: not an open_clip model name, a .json config or a run folder with "
            f"{RUN_CONFIG_FILE} ({hint})"
        )


def load_clip(ref: str, pretrained: str | None = None, seed: int = 0) -> ClipModel:
    """Build a CLIP model, in eval mode, from an open_clip name (+ pretrained tag, `none`, or
    checkpoint file), a JSON config file, or a run folder of ours."""
    loaded = _load_clip(ref, pretrained, seed)
    loaded.model.eval()
    return loaded


def _load_clip(ref: str, pretrained: str | None, seed: int) -> ClipModel:
    run_dir = run_model_dir(ref)
    if run_dir is not None:
        saved = json.loads((run_dir / RUN_CONFIG_FILE).read_text())
        loaded = _from_config(
            saved["model_cfg"], saved.get("architecture", str(run_dir)), seed, saved.get("preprocess_cfg")
        )
        loaded.preprocess_cfg = saved.get("preprocess_cfg", loaded.preprocess_cfg)
        open_clip.set_model_preprocess_cfg(loaded.model, loaded.preprocess_cfg)
        weights = run_dir / RUN_WEIGHTS_FILE
        open_clip.load_checkpoint(loaded.model, str(weights))
        loaded.checkpoint_sha256 = sha256_file(weights)
        loaded.pretrained = str(run_dir)
        return loaded
    if ref.endswith(".json"):
        model_cfg, preprocess_cfg = read_config_with_preprocess(Path(ref))
        return _from_config(model_cfg, Path(ref).stem, seed, preprocess_cfg)
    check_model_ref(ref)
    tag = None if pretrained in (None, "", "none") else pretrained
    torch.manual_seed(seed)
    try:
        model = open_clip.create_model(ref, pretrained=tag)
    except RuntimeError as exc:
        raise ModelSpecError(f"cannot load {ref} with pretrained={pretrained!r}: {exc}") from exc
    model_cfg = open_clip.get_model_config(ref)
    checkpoint_sha = sha256_file(Path(tag)) if tag and Path(tag).is_file() else None
    return ClipModel(
        model,
        model_cfg,
        dict(model.visual.preprocess_cfg),
        model_tokenizer(model_cfg, ref),
        ref,
        pretrained=tag,
        checkpoint_sha256=checkpoint_sha,
    )


@dataclass
class TowerOutputs:
    image: torch.Tensor
    text: torch.Tensor
    logit_scale: torch.Tensor
    # SigLIP-trained teachers: the bias of their sigmoid scoring (None for CLIP's softmax)
    logit_bias: torch.Tensor | None = None


def _detached(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach()


@dataclass
class Teacher:
    """One or several frozen CLIP models; each gets the inputs prepared with its own preprocessing."""

    members: list[ClipModel] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.members:
            raise ModelSpecError("a teacher needs at least one model")
        for member in self.members:
            member.model.eval()
            member.model.requires_grad_(False)

    @property
    def embed_dims(self) -> list[int]:
        return [m.embed_dim for m in self.members]

    def to(self, device: torch.device) -> Teacher:
        for member in self.members:
            member.model.to(device)
        return self

    @torch.no_grad()
    def encode(self, images: dict[str, torch.Tensor], tokens: dict[str, torch.Tensor]) -> list[TowerOutputs]:
        outputs = []
        for member in self.members:
            model = member.model
            outputs.append(
                TowerOutputs(
                    image=model.encode_image(images[member.image_key], normalize=True),
                    text=model.encode_text(tokens[member.text_key], normalize=True),
                    logit_scale=model.logit_scale.exp().detach(),
                    logit_bias=_detached(getattr(model, "logit_bias", None)),
                )
            )
        return outputs

    @torch.no_grad()
    def class_vectors(
        self, class_names: list[str], templates: list[str], device: torch.device
    ) -> list[torch.Tensor]:
        """Per member: one L2-normalized vector per class, the mean of its template embeddings."""
        vectors = []
        for member in self.members:
            vectors.append(class_vectors(member, class_names, templates, device))
        return vectors


@torch.no_grad()
def class_vectors(
    clip: ClipModel, class_names: list[str], templates: list[str], device: torch.device
) -> torch.Tensor:
    """[classes, D]: the service's class vectors (clipserve/contract/scoring.py), from this model's text tower."""
    embeddings = [
        clip.model.encode_text(clip.tokenizer(prompts([name], templates)).to(device)).float().cpu()
        for name in class_names
    ]
    vectors = scoring.class_vectors(torch.cat(embeddings).numpy(), len(templates))
    return torch.from_numpy(vectors).to(device)


def load_teacher(refs: list[str], pretrained: list[str | None] | None = None, seed: int = 0) -> Teacher:
    """`refs` and `pretrained` pair up; several refs make an ensemble."""
    tags = list(pretrained or [])
    if len(tags) == 1 and len(refs) > 1:
        tags = tags * len(refs)
    if tags and len(tags) != len(refs):
        raise ModelSpecError(
            f"{len(refs)} teachers but {len(tags)} pretrained tags; give one, or one per teacher"
        )
    tags = tags or [None] * len(refs)
    return Teacher(
        [load_clip(ref, tag, seed=seed + i) for i, (ref, tag) in enumerate(zip(refs, tags, strict=True))]
    )


# ---- weight inheritance -------------------------------------------------------------------------


@dataclass
class InheritanceReport:
    copied: list[str] = field(default_factory=list)
    sliced: list[str] = field(default_factory=list)
    interpolated: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _layer_map(student_layers: int | list[int], teacher_layers: int | list[int]) -> list[int]:
    """Teacher layer kept for each student layer: every k-th, ending at the teacher's last layer.
    ResNet towers (blocks per stage as a list) keep all their blocks: only channels shrink."""
    if isinstance(student_layers, list) or isinstance(teacher_layers, list):
        if student_layers != teacher_layers:
            raise ModelSpecError(
                f"ResNet towers inherit only with the same blocks per stage: student {student_layers}, "
                f"teacher {teacher_layers}"
            )
        return []
    if student_layers > teacher_layers:
        raise ModelSpecError(f"student has {student_layers} layers, the teacher only {teacher_layers}")
    k = teacher_layers / student_layers
    return [min(teacher_layers - 1, math.ceil((i + 1) * k) - 1) for i in range(student_layers)]


def _teacher_key(key: str, vision_map: list[int], text_map: list[int]) -> str:
    parts = key.split(".")
    if "resblocks" in parts:
        at = parts.index("resblocks") + 1
        layer_map = vision_map if parts[0] == "visual" else text_map
        parts[at] = str(layer_map[int(parts[at])])
    return ".".join(parts)


def _slice_leading(source: torch.Tensor, shape: torch.Size, key: str) -> torch.Tensor:
    if key.endswith("in_proj_weight") or key.endswith("in_proj_bias"):
        # q, k and v are stacked along dim 0: keep the leading channels (= leading heads) of each
        blocks = source.chunk(3, dim=0)
        per = shape[0] // 3
        return torch.cat([_slice_leading(b, torch.Size((per, *shape[1:])), "") for b in blocks], dim=0)
    index = tuple(slice(0, n) for n in shape)
    return source[index]


def _interpolate_positions(source: torch.Tensor, target_len: int, width: int) -> torch.Tensor:
    cls, grid = source[:1, :width], source[1:, :width]
    old = math.isqrt(grid.shape[0])
    new = math.isqrt(target_len - 1)
    grid = grid.reshape(1, old, old, width).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(new * new, width)], dim=0)


def inherit_weights(student: ClipModel, teacher: ClipModel) -> InheritanceReport:
    """TinyCLIP-style initialisation: every k-th teacher layer, the leading channels and heads."""
    s_vis, t_vis = student.model_cfg["vision_cfg"], teacher.model_cfg["vision_cfg"]
    vision_map = _layer_map(s_vis["layers"], t_vis["layers"])
    text_map = _layer_map(student.model_cfg["text_cfg"]["layers"], teacher.model_cfg["text_cfg"]["layers"])
    teacher_state = teacher.model.state_dict()
    report = InheritanceReport()
    new_state = {}
    for key, target in student.model.state_dict().items():
        source = teacher_state.get(_teacher_key(key, vision_map, text_map))
        if source is None or source.dim() != target.dim():
            report.skipped.append(key)
            continue
        if source.shape == target.shape:
            new_state[key] = source.clone()
            report.copied.append(key)
        elif key == "visual.positional_embedding" and source.shape[0] != target.shape[0]:
            new_state[key] = _interpolate_positions(source, target.shape[0], target.shape[1])
            report.interpolated.append(key)
        elif key == "visual.conv1.weight" and source.shape[2:] != target.shape[2:]:
            kernel = F.interpolate(source[: target.shape[0], :, :, :], size=target.shape[2:], mode="bilinear")
            new_state[key] = (
                kernel * (source.shape[2] * source.shape[3]) / (target.shape[2] * target.shape[3])
            )
            report.interpolated.append(key)
        elif all(s >= t for s, t in zip(source.shape, target.shape, strict=True)) and not (
            key == "token_embedding.weight" and source.shape[0] != target.shape[0]
        ):
            new_state[key] = _slice_leading(source, target.shape, key).clone()
            report.sliced.append(key)
        else:
            report.skipped.append(key)
    if not report.copied and not report.sliced:
        raise ModelSpecError(
            f"student {student.architecture} shares no weights with teacher {teacher.architecture}: "
            "weight inheritance needs the same open_clip ViT family, with the student no wider or deeper"
        )
    student.model.load_state_dict(new_state, strict=False)
    return report
