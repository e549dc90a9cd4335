"""`clip-export`: turn an open_clip model into a verified, published model bundle.

clip-export --model ViT-B-32 --pretrained none --name vitb32 --models-dir models/ [--int8] [--fp16] [--tensorrt]
clip-export --model ViT-B-32 --pretrained laion2b_s34b_b79k --checkpoint ~/Downloads/vitb32.bin --name vitb32
clip-export --config my_arch.json --checkpoint student.pt --name student
clip-export --model ViT-B-16-SigLIP2 --pretrained webli --checkpoint siglip2.bin --tokenizer ./siglip2-tokenizer/
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from clipserve.contract.bundle import Bundle, BundleError, ModelSource
from clipserve.contract.cli_settings import CliSettings, SettingsError, load_settings

PROG = "clip-export"


class ExportSettings(CliSettings):
    """The options of `clip-export`."""

    model_config = SettingsConfigDict(env_prefix="CLIP_EXPORT_")

    # The model
    model: str | None = Field(None, description="open_clip model name, e.g. ViT-B-32, MobileCLIP2-S0")
    config: Path | None = Field(
        None, description="JSON architecture (bare model config or open_clip_config.json) instead of a name"
    )
    pretrained: str | None = Field(
        None, description="open_clip pretrained tag, 'none' for random init, or a checkpoint path"
    )
    checkpoint: Path | None = Field(
        None,
        description="local weights: a state_dict, {'state_dict': ...} or DDP 'module.' keys; with "
        "--pretrained TAG the file holds that tag's weights and its preprocessing is used",
    )
    seed: int = Field(0, description="seed for random init")
    tokenizer: str | None = Field(
        None,
        description="for models with a Hugging Face tokenizer (SigLIP, multilingual): a folder holding "
        "its tokenizer.json, or a hub name; none: the one the model config names, from the hub",
    )
    # The bundle
    name: str | None = Field(None, description="model name in the repository; none: the --model name")
    models_dir: Path = Field(Path("models"), description="model repository to publish to")
    version: int | None = Field(None, ge=1, description="version to publish; none: the next free one")
    # Variants and checks
    int8: bool = Field(False, description="add int8 graphs (CPU)")
    fp16: bool = Field(False, description="add fp16 graphs (GPU)")
    tensorrt: bool = Field(
        False, description="add TensorRT fp16 engines for this GPU (needs CUDA and tensorrt)"
    )
    timing_cache_dir: Path | None = Field(
        None,
        description="with --tensorrt: folder where TensorRT's layer timing cache is kept between builds; "
        "none: the user cache folder ($XDG_CACHE_HOME or ~/.cache, then clipserve/tensorrt)",
    )
    fuse: bool = Field(
        True,
        description="CPU graphs with ONNX Runtime's fused attention, LayerNorm and GELU (graphs that miss "
        "the fp32 threshold fused are exported unfused); --no-fuse: plain ONNX ops only",
    )
    min_cosine: float | None = Field(None, description="fp32 parity threshold; none: 0.9999")
    min_cosine_int8: float | None = Field(None, description="int8 parity threshold; none: 0.99")
    min_cosine_fp16: float | None = Field(None, description="fp16 and TensorRT parity threshold; none: 0.999")
    # The run
    torch_threads: int | None = Field(None, ge=1, description="torch CPU threads (none: torch's choice)")
    quiet: bool = Field(False, description="no progress lines")
    list_models: bool = Field(False, description="list open_clip model names and exit")

    @field_validator("min_cosine", "min_cosine_int8", "min_cosine_fp16")
    @classmethod
    def _cosine(cls, value: float | None) -> float | None:
        if value is not None and not 0.0 < value <= 1.0:
            raise ValueError("must be in (0, 1]")
        return value

    def thresholds(self) -> dict[str, float]:
        given = {"fp32": self.min_cosine, "int8": self.min_cosine_int8, "fp16": self.min_cosine_fp16}
        return {precision: value for precision, value in given.items() if value is not None}


def _default_name(args: ExportSettings) -> str:
    if args.name:
        return args.name
    if args.model:
        return args.model
    raise BundleError("--name is required with --config (the model's name in the repository)")


def describe_source(source: ModelSource) -> str:
    parts = [source.architecture]
    if source.pretrained:
        parts.append("random init" if source.pretrained == "none" else f"pretrained {source.pretrained}")
    if source.checkpoint_sha256:
        parts.append(f"checkpoint sha256 {source.checkpoint_sha256[:16]}")
    if source.training_run:
        parts.append(f"training run {source.training_run}")
    return ", ".join(parts)


def _describe_tokenizer(manifest) -> str:
    spec = manifest.tokenizer
    if spec.kind == "clip-bpe":
        return f"CLIP BPE, clean {spec.clean}"
    where = f" from {manifest.source.tokenizer}" if manifest.source.tokenizer else ""
    return (
        f"Hugging Face {spec.vocab_file} ({spec.vocab_size} ids{where}), clean {spec.clean}, pad to context"
    )


def summary(bundle: Bundle) -> str:
    m = bundle.manifest
    image = m.image
    lines = [
        f"published {bundle.ref} at {bundle.path}",
        f"  content hash   {m.content_hash[:16]}",
        f"  source         {describe_source(m.source)}",
        f"  embed dim      {m.embed_dim}, logit scale {m.logit_scale:.4g}"
        + (f", logit bias {m.logit_bias:.4g}" if m.logit_bias is not None else ""),
        f"  image          {image.size[0]}x{image.size[1]}, {image.resize_mode} resize, {image.interpolation}, "
        f"mean {tuple(round(v, 4) for v in image.mean)}, std {tuple(round(v, 4) for v in image.std)}",
        f"  text           context {m.tokenizer.context_length}, {m.text.pooling} pooling, "
        f"{'dynamic length' if m.text.dynamic_length else 'fixed length (pad to context)'}",
        f"  tokenizer      {_describe_tokenizer(m)}",
        f"  scoring        {m.scoring}"
        + (" (per label: sigmoid of scale * cos + bias)" if m.scoring == "sigmoid" else " over the labels"),
        "  files",
    ]
    lines += [f"    {f.path:<44} {f.size / 1e6:9.2f} MB  {f.precision or f.role}" for f in m.files]
    lines.append("  parity (ONNX Runtime / TensorRT vs torch)")
    lines += [
        f"    {r.file:<44} min cos {r.min_cosine:.6f}  mean {r.mean_cosine:.6f}  max |diff| "
        f"{r.max_abs_diff:.1e}  >= {r.threshold}  {'ok' if r.passed else 'FAILED'}"
        for r in m.parity
    ]
    return "\n".join(lines)


def run(args: ExportSettings) -> Bundle:
    import torch

    from clipserve.contract.bundle import ModelRepository
    from clipserve.export.exporter import check_can_publish, export_bundle
    from clipserve.export.sources import load_model

    if args.model is None and args.config is None:
        raise BundleError("say which model: --model NAME (see --list-models) or --config JSON")
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    name = _default_name(args)
    thresholds = args.thresholds()
    if args.model and args.pretrained is None and args.checkpoint is None:
        raise BundleError(
            "say which weights: --pretrained TAG, --pretrained none (random init) or --checkpoint PATH"
        )
    check_can_publish(ModelRepository(args.models_dir), name, args.version, args.tensorrt)
    started = time.perf_counter()
    if not args.quiet:
        print(f"{PROG}: {args.model or args.config} -> {args.models_dir / name}", file=sys.stderr)
    tokenizer = early_tokenizer(args)
    loaded = load_model(args.model, args.pretrained, args.checkpoint, args.config, seed=args.seed)
    if not args.quiet:
        print(f"  model loaded in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    return export_bundle(
        loaded.model,
        args.models_dir,
        name,
        source=loaded.source,
        int8=args.int8,
        fp16=args.fp16,
        tensorrt=args.tensorrt,
        min_cosine=thresholds or None,
        version=args.version,
        progress=not args.quiet,
        tokenizer=tokenizer,
        timing_cache_dir=args.timing_cache_dir,
        fuse=args.fuse,
    )


def early_tokenizer(args: ExportSettings):
    """The model's Hugging Face tokenizer, loaded and checked against the config's vocabulary size
    before the model is built (a wrong folder or an offline hub fails in a second, not after minutes);
    None for CLIP BPE."""
    from clipserve.export.sources import (
        builtin_config,
        check_tokenizer_vocab,
        load_hf_tokenizer,
        read_config_file,
    )

    if args.config is not None:
        model_cfg, _ = read_config_file(args.config)
    else:
        model_cfg = builtin_config(args.model)
    architecture = args.model or args.config.stem
    tokenizer = load_hf_tokenizer(architecture, model_cfg, args.tokenizer)
    vocab_size = model_cfg.get("text_cfg", {}).get("vocab_size")
    if tokenizer is not None and vocab_size and not model_cfg["text_cfg"].get("hf_model_name"):
        where = args.tokenizer or model_cfg["text_cfg"]["hf_tokenizer_name"]
        check_tokenizer_vocab(architecture, tokenizer, int(vocab_size), str(where))
    return tokenizer


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = load_settings(ExportSettings, argv, PROG, description=__doc__)
    except SettingsError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    if args.list_models:
        import open_clip

        print("\n".join(open_clip.list_models()))
        return 0
    try:
        bundle = run(args)
    except BundleError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing was published", file=sys.stderr)
        return 130
    print(summary(bundle))
    return 0


if __name__ == "__main__":
    sys.exit(main())
