"""`clip-serve`: run the API with uvicorn. Every flag is also an env var `CLIPSERVE_*`."""

from __future__ import annotations

import argparse
import os
import sys

from pydantic import ValidationError

from export.bundle import ModelRepository
from service.logs import configure_logging
from service.runtime import ProviderUnavailableError
from service.runtime.gpu_stack import check_single_onnxruntime
from service.settings import Settings


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="clip-serve", description=__doc__)
    parser.add_argument("--models", help="model repository dir (CLIPSERVE_MODELS_DIR)")
    parser.add_argument(
        "--serve", help="models to serve, comma-separated name or name@version (CLIPSERVE_MODELS)"
    )
    parser.add_argument(
        "--default-model", help="model used when a request names none (CLIPSERVE_DEFAULT_MODEL)"
    )
    parser.add_argument("--host", default=os.environ.get("CLIPSERVE_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("CLIPSERVE_PORT", "8000")))
    parser.add_argument("--redis-url", help="CLIPSERVE_REDIS_URL; 'none' for the in-process cache only")
    parser.add_argument("--providers", help="comma-separated: cpu, cuda, tensorrt (CLIPSERVE_PROVIDERS)")
    parser.add_argument("--precision", choices=["fp32", "fp16", "int8"], help="CLIPSERVE_PRECISION")
    parser.add_argument(
        "--threads", type=int, help="ONNX Runtime intra-op threads (CLIPSERVE_INTRA_OP_THREADS)"
    )
    parser.add_argument("--log-level", help="CLIPSERVE_LOG_LEVEL")
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    overrides = {
        "models_dir": args.models,
        "models": args.serve,
        "default_model": args.default_model,
        "providers": args.providers,
        "precision": args.precision,
        "intra_op_threads": args.threads,
        "log_level": args.log_level,
    }
    given = {k: v for k, v in overrides.items() if v is not None}
    if args.redis_url is not None:  # after the filter: None here means "no Redis", not "not given"
        given["redis_url"] = None if args.redis_url.lower() in ("", "none") else args.redis_url
    return Settings(**given)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = settings_from(args)
    except ValidationError as exc:
        print(f"clip-serve: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    try:
        check_single_onnxruntime()
    except ProviderUnavailableError as exc:
        print(f"clip-serve: {exc}", file=sys.stderr)
        return 1
    configure_logging(settings.log_level, settings.log_json)
    import uvicorn

    from service.app import create_app

    if not settings.models and not ModelRepository(settings.models_dir).models():
        print(
            f"clip-serve: no models in {settings.models_dir} (export one with clip-export)", file=sys.stderr
        )
        return 1
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_config=None, access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
