"""`clip-export`: turn an open_clip model into a verified, published model bundle.

    clip-export --model ViT-B-32 --pretrained none --name vitb32 --repo models/ [--int8] [--fp16] [--tensorrt]
    clip-export --model ViT-B-32 --pretrained laion2b_s34b_b79k --checkpoint ~/Downloads/vitb32.bin --name vitb32
    clip-export --config my_arch.json --checkpoint student.pt --name student

Every flag can also be given as an environment variable CLIP_EXPORT_<FLAG> (e.g. CLIP_EXPORT_REPO).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from export.bundle import Bundle, BundleError, ModelSource

ENV_PREFIX = "CLIP_EXPORT_"
_TRUE = {"1", "true", "yes", "on"}


def _env(flag: str, default: str | None = None) -> str | None:
    return os.environ.get(ENV_PREFIX + flag.upper().replace("-", "_"), default)


def _env_flag(flag: str) -> bool:
    return (_env(flag) or "").strip().lower() in _TRUE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clip-export",
        description="Export an open_clip model to a verified ONNX model bundle.",
        epilog="Every flag can also be set as an environment variable CLIP_EXPORT_<FLAG>, e.g. CLIP_EXPORT_REPO.",
    )
    what = parser.add_argument_group("model")
    what.add_argument(
        "--model", default=_env("model"), help="open_clip model name, e.g. ViT-B-32, MobileCLIP2-S0"
    )
    what.add_argument(
        "--config",
        default=_env("config"),
        help="JSON architecture (bare model config or open_clip_config.json) instead of a name",
    )
    what.add_argument(
        "--pretrained",
        default=_env("pretrained"),
        help="open_clip pretrained tag, 'none' for random init, or a checkpoint path",
    )
    what.add_argument(
        "--checkpoint",
        default=_env("checkpoint"),
        help="local weights: a state_dict, {'state_dict': ...} or DDP 'module.' keys; with "
        "--pretrained TAG the file holds that tag's weights and its preprocessing is used",
    )
    what.add_argument("--seed", type=int, default=_env("seed", "0"), help="seed for random init")
    where = parser.add_argument_group("bundle")
    where.add_argument("--name", default=_env("name"), help="model name in the repository (default: --model)")
    where.add_argument(
        "--repo", default=_env("repo", "models"), help="model repository folder (default: models)"
    )
    where.add_argument(
        "--version", type=int, default=_env("version"), help="version to publish (default: the next free one)"
    )
    variants = parser.add_argument_group("variants and checks")
    variants.add_argument(
        "--int8", action="store_true", default=_env_flag("int8"), help="add int8 graphs (CPU)"
    )
    variants.add_argument(
        "--fp16", action="store_true", default=_env_flag("fp16"), help="add fp16 graphs (GPU)"
    )
    variants.add_argument(
        "--tensorrt",
        action="store_true",
        default=_env_flag("tensorrt"),
        help="add TensorRT fp16 engines for this GPU (needs CUDA and tensorrt)",
    )
    variants.add_argument(
        "--min-cosine", type=float, default=_env("min_cosine"), help="fp32 parity threshold (default 0.9999)"
    )
    variants.add_argument(
        "--min-cosine-int8",
        type=float,
        default=_env("min_cosine_int8"),
        help="int8 parity threshold (default 0.99)",
    )
    variants.add_argument(
        "--min-cosine-fp16",
        type=float,
        default=_env("min_cosine_fp16"),
        help="fp16 and TensorRT parity threshold (default 0.999)",
    )
    parser.add_argument(
        "--threads", type=int, default=_env("threads"), help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument("--quiet", action="store_true", default=_env_flag("quiet"), help="no progress lines")
    parser.add_argument("--list-models", action="store_true", help="list open_clip model names and exit")
    return parser


def _thresholds(args: argparse.Namespace) -> dict[str, float]:
    given = {"fp32": args.min_cosine, "int8": args.min_cosine_int8, "fp16": args.min_cosine_fp16}
    for precision, value in given.items():
        if value is not None and not 0.0 < value <= 1.0:
            raise BundleError(
                f"--min-cosine{'' if precision == 'fp32' else '-' + precision} must be in (0, 1]"
            )
    return {precision: value for precision, value in given.items() if value is not None}


def _default_name(args: argparse.Namespace) -> str:
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


def run(args: argparse.Namespace) -> Bundle:
    import torch

    from export.bundle import ModelRepository
    from export.exporter import check_can_publish, export_bundle
    from export.sources import load_model

    if args.model is None and args.config is None:
        raise BundleError("say which model: --model NAME (see --list-models) or --config JSON")
    if args.threads:
        torch.set_num_threads(args.threads)
    name = _default_name(args)
    thresholds = _thresholds(args)
    if args.model and args.pretrained is None and args.checkpoint is None:
        raise BundleError(
            "say which weights: --pretrained TAG, --pretrained none (random init) or --checkpoint PATH"
        )
    check_can_publish(ModelRepository(args.repo), name, args.version, args.tensorrt)
    started = time.perf_counter()
    if not args.quiet:
        print(f"clip-export: {args.model or args.config} -> {Path(args.repo) / name}", file=sys.stderr)
    loaded = load_model(args.model, args.pretrained, args.checkpoint, args.config, seed=args.seed)
    if not args.quiet:
        print(f"  model loaded in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    return export_bundle(
        loaded.model,
        args.repo,
        name,
        source=loaded.source,
        int8=args.int8,
        fp16=args.fp16,
        tensorrt=args.tensorrt,
        min_cosine=thresholds or None,
        version=args.version,
        progress=not args.quiet,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list_models:
        import open_clip

        print("\n".join(open_clip.list_models()))
        return 0
    try:
        bundle = run(args)
    except BundleError as exc:
        print(f"clip-export: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("clip-export: interrupted; nothing was published", file=sys.stderr)
        return 130
    print(summary(bundle))
    return 0


if __name__ == "__main__":
    sys.exit(main())
