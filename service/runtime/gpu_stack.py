"""The GPU stack of one environment: which ONNX Runtime is installed, the libraries the pip wheels
carry, and the checks a GPU install must pass (`python -m clipserve.service.runtime.gpu_stack`).

pip puts the CUDA, cuDNN and TensorRT libraries in site-packages (`nvidia/cu13/lib`,
`nvidia/cudnn/lib`, `tensorrt_libs`), where the dynamic loader never looks. ONNX Runtime opens its
CUDA and TensorRT providers with dlopen, so their libraries must already be in the process:
`onnxruntime.preload_dlls()` loads CUDA and cuDNN, `import tensorrt` (through `tensorrt_libs`)
loads libnvinfer and libnvonnxparser; the providers' dependencies then resolve to them by soname.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import importlib
import importlib.metadata
import importlib.util
import io
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from clipserve.service.runtime.base import ProviderUnavailableError

# Distributions that write the `onnxruntime` import folder; two of them in one environment overwrite
# each other's files, and which build then runs is an accident of install order.
ONNXRUNTIME_NAME = re.compile(r"^(onnxruntime|ort-nightly)(-[a-z0-9-]+)?$")
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
PROVIDER_LIBRARIES = {
    "CUDAExecutionProvider": "libonnxruntime_providers_cuda.so",
    "TensorrtExecutionProvider": "libonnxruntime_providers_tensorrt.so",
}
# Comes with the NVIDIA driver (the container toolkit mounts it), never from a wheel.
DRIVER_LIBRARIES = frozenset({"libcuda.so.1"})
# TensorRT's own libraries (the tensorrt-cu13-libs wheel, from NVIDIA's index): absent by design
# from a gpu-cuda install, whose ONNX Runtime still carries its TensorRT provider library.
TENSORRT_LIBRARY = re.compile(r"^lib(nvinfer|nvinfer_plugin|nvonnxparser)\.so(\.\d+)*$")
# What ONNX Runtime's CUDA provider needs loaded before a session is made (cuDNN for convolutions).
CUDA_SONAMES = ("libcudart.so.13", "libcublasLt.so.13", "libcublas.so.13", "libcurand.so.10", "libcudnn.so.9")

IDENTITY_ONNX_HEX = (
    "08083a330a100a017812017922084964656e746974791201675a0d0a017812080a06080112020a00"
    "620d0a017912080a06080112020a0042021011"
)

# Every TensorRT name export/tensorrt.py and service/runtime/tensorrt.py use, relative to the
# `tensorrt` module; tests/export/test_tensorrt_api.py keeps this list and the code in step.
TENSORRT_API = (
    "__version__",
    "nptype",
    "float16",
    "Logger",
    "Logger.WARNING",
    "NetworkDefinitionCreationFlag.STRONGLY_TYPED",
    "MemoryPoolType.WORKSPACE",
    "TensorIOMode.INPUT",
    "TensorIOMode.OUTPUT",
    "Builder",
    "Builder.create_network",
    "Builder.create_builder_config",
    "Builder.create_optimization_profile",
    "Builder.build_serialized_network",
    "OnnxParser",
    "OnnxParser.parse_from_file",
    "OnnxParser.num_errors",
    "OnnxParser.get_error",
    "IBuilderConfig.set_memory_pool_limit",
    "IBuilderConfig.add_optimization_profile",
    "IBuilderConfig.create_timing_cache",
    "IBuilderConfig.set_timing_cache",
    "IBuilderConfig.get_timing_cache",
    "ITimingCache.serialize",
    "IOptimizationProfile.set_shape",
    "Runtime",
    "Runtime.deserialize_cuda_engine",
    "ICudaEngine.num_io_tensors",
    "ICudaEngine.get_tensor_name",
    "ICudaEngine.get_tensor_mode",
    "ICudaEngine.get_tensor_dtype",
    "ICudaEngine.get_tensor_profile_shape",
    "ICudaEngine.create_execution_context",
    "IExecutionContext.set_input_shape",
    "IExecutionContext.get_tensor_shape",
    "IExecutionContext.set_tensor_address",
    "IExecutionContext.execute_async_v3",
)


def onnxruntime_distributions() -> list[str]:
    """'name version' of every installed distribution that provides the `onnxruntime` package.

    Only the metadata folders whose names can be ONNX Runtime's are read (reading every installed
    distribution's metadata costs a fifth of a second; this check runs at every model load)."""
    found = set()
    for entry in sys.path:
        folder = Path(entry or ".")
        for info in (*folder.glob("onnxruntime*.dist-info"), *folder.glob("ort_nightly*.dist-info")):
            dist = importlib.metadata.PathDistribution(info)
            name = (dist.metadata["Name"] or "").lower().replace("_", "-")
            if ONNXRUNTIME_NAME.match(name) and any(
                str(f) == "onnxruntime/__init__.py" for f in dist.files or ()
            ):
                found.add(f"{name} {dist.version}")
    return sorted(found)


def check_single_onnxruntime() -> str:
    """The one ONNX Runtime distribution installed here; refuses a mixed (or missing) install."""
    installed = onnxruntime_distributions()
    if len(installed) == 1:
        return installed[0]
    if not installed:
        raise ProviderUnavailableError(
            "no ONNX Runtime is installed: pip install '.[serve]' (CPU) or '.[serve-gpu]' (GPU)"
        )
    raise ProviderUnavailableError(
        f"{len(installed)} ONNX Runtime builds are installed together ({', '.join(installed)}); they share "
        "the import folder `onnxruntime`, so which one runs is undefined: pip uninstall -y "
        f"{' '.join(entry.split()[0] for entry in installed)}, then install one set, "
        "'.[serve]' (CPU) or '.[serve-gpu]' (GPU)"
    )


@functools.cache
def load_tensorrt() -> object:
    """`import tensorrt`, which loads libnvinfer and libnvonnxparser from the tensorrt_libs wheel."""
    try:
        return importlib.import_module("tensorrt")
    except (ImportError, OSError) as exc:
        raise ProviderUnavailableError(
            f"TensorRT cannot be loaded ({exc}); install '.[serve-gpu]', whose tensorrt-cu13 brings "
            "the TensorRT libraries"
        ) from exc


@functools.cache
def load_cuda_libraries() -> None:
    """CUDA and cuDNN from the nvidia-* wheels, loaded into the process for ONNX Runtime's providers."""
    import onnxruntime

    # preload_dlls reports a library it cannot load on stdout and carries on: check the result here.
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        onnxruntime.preload_dlls(cuda=True, cudnn=True, msvc=False)
    missing = []
    for soname in CUDA_SONAMES:
        try:
            ctypes.CDLL(soname)
        except OSError:
            missing.append(soname)
    if missing:
        detail = " ".join(printed.getvalue().split())
        raise ProviderUnavailableError(
            f"CUDA libraries {missing} are not loadable; install '.[serve-gpu]' or '.[serve-gpu-cuda]' (the nvidia-* CUDA 13 wheels)"
            + (f": {detail}" if detail else "")
        )


def prepare_providers(provider_names: list[str]) -> None:
    """Load what the requested GPU providers need: TensorRT first, then CUDA and cuDNN."""
    if "TensorrtExecutionProvider" in provider_names:
        load_tensorrt()
    if any(name in GPU_PROVIDERS for name in provider_names):
        load_cuda_libraries()


def missing_tensorrt_api(trt: object, names: tuple[str, ...] = TENSORRT_API) -> list[str]:
    missing = []
    for name in names:
        target = trt
        for part in name.split("."):
            if not hasattr(target, part):
                missing.append(name)
                break
            target = getattr(target, part)
    return missing


def wheel_library_dirs() -> list[Path]:
    """The folders of the CUDA, cuDNN and TensorRT libraries that pip installed here."""
    folders: list[Path] = []
    for package in ("nvidia", "tensorrt_libs"):
        spec = importlib.util.find_spec(package)
        for location in (spec.submodule_search_locations or []) if spec else []:
            root = Path(location)
            folders += sorted(p.parent for p in root.rglob("lib*.so*") if p.is_file())
    return sorted(set(folders))


@dataclass(frozen=True)
class LinkReport:
    library: Path
    resolved: dict[str, str | None]

    @property
    def missing(self) -> list[str]:
        return [name for name, path in self.resolved.items() if path is None and name not in DRIVER_LIBRARIES]

    @property
    def driver_missing(self) -> list[str]:
        return [name for name, path in self.resolved.items() if path is None and name in DRIVER_LIBRARIES]


def link_report(library: Path, search_dirs: list[Path]) -> LinkReport:
    """What `ldd` resolves each dependency of `library` to, with the wheels' folders on the path."""
    env = {"LD_LIBRARY_PATH": ":".join(str(d) for d in search_dirs), "PATH": "/usr/bin:/bin"}
    output = subprocess.run(["ldd", str(library)], capture_output=True, text=True, env=env, check=True).stdout
    resolved: dict[str, str | None] = {}
    for line in output.splitlines():
        name, arrow, target = line.strip().partition(" => ")
        if arrow:
            resolved[name] = None if target.startswith("not found") else target.split(" (")[0]
    return LinkReport(library, resolved)


def provider_link_reports() -> dict[str, LinkReport]:
    spec = importlib.util.find_spec("onnxruntime")
    capi = Path(spec.origin).parent / "capi" if spec and spec.origin else None
    dirs = wheel_library_dirs()
    return {
        provider: link_report(capi / library, dirs)
        for provider, library in PROVIDER_LIBRARIES.items()
        if capi is not None and (capi / library).is_file()
    }


def session_providers(onnx_path: Path, provider_names: list[str], preload: bool) -> tuple[list[str], str]:
    """The providers a real session activates on `onnx_path`, and why any requested one did not."""
    import onnxruntime

    onnxruntime.set_default_logger_severity(4)  # the reason is reported below, in one line
    if preload:
        try:
            prepare_providers(provider_names)
        except ProviderUnavailableError as exc:
            return [], str(exc)
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    try:
        session = onnxruntime.InferenceSession(str(onnx_path), options, providers=provider_names)
    except Exception as exc:  # onnxruntime raises its own types for a provider that fails to start
        return [], f"{type(exc).__name__}: {exc}"
    active = session.get_providers()
    if all(name in active for name in provider_names):
        return active, ""
    return active, _provider_load_error(provider_names, active)


def _provider_load_error(requested: list[str], active: list[str]) -> str:
    """ONNX Runtime falls back quietly; dlopen of the provider library says what is missing."""
    spec = importlib.util.find_spec("onnxruntime")
    capi = Path(spec.origin).parent / "capi" if spec and spec.origin else Path()
    reasons = []
    for name in requested:
        if name in active or name not in PROVIDER_LIBRARIES:
            continue
        try:
            ctypes.CDLL(str(capi / PROVIDER_LIBRARIES[name]))
            reasons.append(f"{name} loads but did not start (no usable GPU or driver)")
        except OSError as exc:
            reasons.append(f"{name}: {exc}")
    return "; ".join(reasons)


def write_identity_graph(path: Path) -> Path:
    """A one-node float graph for session checks, written without the onnx package (the serving
    image has none): ModelProto(ir_version 8, opset 17, graph `g`: y = Identity(x), float [N])."""
    path.write_bytes(bytes.fromhex(IDENTITY_ONNX_HEX))
    return path


def _print_check(ok: bool, label: str, detail: str) -> bool:
    print(f"[{'ok' if ok else 'FAIL'}] {label}: {detail}")
    return ok


SESSION_REQUESTS = (["CUDAExecutionProvider"], ["TensorrtExecutionProvider", "CUDAExecutionProvider"])


def session_lines(
    preload: bool, requests: tuple[list[str], ...] = SESSION_REQUESTS
) -> list[tuple[bool, str]]:
    """(all requested providers active, what happened) for each provider set, on real sessions."""
    lines = []
    with tempfile.TemporaryDirectory(prefix="clipserve-gpu-check-") as scratch:
        graph = write_identity_graph(Path(scratch) / "identity.onnx")
        for requested in requests:
            active, why = session_providers(graph, requested, preload=preload)
            detail = f"asked {requested}, active {active}" + (f" ({why})" if why else "")
            lines.append((all(p in active for p in requested), detail))
    return lines


def _system_library(path: str | None) -> bool:
    return path is not None and path.startswith(("/lib", "/usr/lib"))


def why_no_cuda() -> str | None:
    """Why CUDA cannot run here, decided by a real session on a one-node graph (None: it can).

    The `gpu` tests' gate (tests/conftest.py) and the in-image check both ask this.
    `get_available_providers()` only lists what the onnxruntime build contains; a session says
    whether the provider really loads (driver, GPU, CUDA and cuDNN libraries)."""
    try:
        import onnxruntime
    except ImportError:
        return "onnxruntime is not installed"
    try:
        installed = check_single_onnxruntime()
    except ProviderUnavailableError as exc:
        return str(exc)
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return f"{installed} has no CUDA provider (install '.[serve-gpu,train-gpu,dev]' in a separate venv)"
    with tempfile.TemporaryDirectory(prefix="clipserve-gpu-gate-") as scratch:
        graph = write_identity_graph(Path(scratch) / "identity.onnx")
        active, why = session_providers(graph, ["CUDAExecutionProvider"], preload=True)
    return None if "CUDAExecutionProvider" in active else f"a CUDA session does not start here: {why}"


def tensorrt_link_verdict(report: LinkReport, cuda_only: bool) -> tuple[str, str]:
    """(status, what to print) for ldd of the TensorRT provider library.

    A full install must resolve every library. A gpu-cuda install has no TensorRT libraries, so
    exactly those may be missing, and are named: `expected` when nothing else is, else `FAIL`."""
    missing = report.missing
    if not missing:
        return "ok", "every library found"
    if not cuda_only:
        return "FAIL", f"not found: {', '.join(missing)}"
    tensorrt_own = [name for name in missing if TENSORRT_LIBRARY.match(name)]
    others = [name for name in missing if name not in tensorrt_own]
    if others:
        return (
            "FAIL",
            f"not found: {', '.join(others)} (and TensorRT's own {', '.join(tensorrt_own) or 'none'})",
        )
    return "expected", (
        f"not found: {', '.join(tensorrt_own)}, TensorRT's own libraries, which a gpu-cuda install "
        "does not have (expected for this variant: the TensorRT provider cannot load, the CUDA "
        "provider does not need them); every other library found"
    )


def _print_line(status: str, label: str, detail: str) -> None:
    print(f"[{status}] {label}: {detail}")


def run_checks(require_gpu: bool, cuda_only: bool) -> bool:
    """The checks that need no GPU, then real sessions (failing only with `require_gpu`).

    `cuda_only`: a gpu-cuda install (the `serve-gpu-cuda` image), which has no TensorRT: its
    TensorRT provider library is still checked, and the TensorRT libraries it lacks are named."""
    try:
        installed = check_single_onnxruntime()
    except ProviderUnavailableError as exc:
        return _print_check(False, "one ONNX Runtime distribution", str(exc))
    results = [_print_check(True, "one ONNX Runtime distribution", installed)]
    import onnxruntime

    # Both providers are compiled into every onnxruntime-gpu build, whatever else is installed.
    available = onnxruntime.get_available_providers()
    results.append(
        _print_check(all(p in available for p in GPU_PROVIDERS), "providers in this build", str(available))
    )
    reports = provider_link_reports()
    for provider in GPU_PROVIDERS:
        library = PROVIDER_LIBRARIES[provider]
        report = reports.get(provider)
        if report is None:
            results.append(_print_check(False, f"ldd {library}", "not in this onnxruntime build"))
            continue
        found = ", ".join(
            f"{n} => {p or 'not found'}" for n, p in report.resolved.items() if not _system_library(p)
        )
        if provider == "TensorrtExecutionProvider":
            status, verdict = tensorrt_link_verdict(report, cuda_only)
            _print_line(status, f"ldd {library}", verdict)
            print(f"     {found}")
            results.append(status != "FAIL")
        else:
            results.append(_print_check(not report.missing, f"ldd {library}", found))
        if report.driver_missing:
            print(
                f"     {provider}: {', '.join(report.driver_missing)} comes with the NVIDIA driver (none here)"
            )
    try:
        trt = load_tensorrt()
    except ProviderUnavailableError as exc:
        if cuda_only:
            _print_line(
                "skip",
                "TensorRT API",
                "not walked: the tensorrt package is not installed (a gpu-cuda install has no TensorRT; "
                "its libraries come only from NVIDIA's package index). tests/export/test_tensorrt_api.py walks "
                "the pinned tensorrt-cu13-bindings instead",
            )
        else:
            results.append(_print_check(False, "import tensorrt", str(exc)))
    else:
        missing = missing_tensorrt_api(trt)
        detail = f"{trt.__version__}, {len(TENSORRT_API)} names used, missing: {missing or 'none'}"
        results.append(_print_check(not missing, "TensorRT API", detail))
    requests = SESSION_REQUESTS[:1] if cuda_only else SESSION_REQUESTS
    for loaded, detail in session_lines(preload=True, requests=requests):
        results.append(_print_check(loaded or not require_gpu, "session", detail))
    reason = why_no_cuda()
    if reason is None:
        _print_line("ok", "gpu test gate", "a CUDA session starts: the gpu tests run")
    else:
        _print_line("skip", "gpu test gate", f"the gpu tests skip here, saying: needs a CUDA GPU: {reason}")
        results.append(not require_gpu)
    return all(results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m clipserve.service.runtime.gpu_stack", description=__doc__
    )
    parser.add_argument("--require-gpu", action="store_true", help="fail when a GPU session does not start")
    parser.add_argument("--cuda-only", action="store_true", help="a gpu-cuda install: no TensorRT to check")
    parser.add_argument(
        "--sessions",
        choices=["preload", "no-preload"],
        help="only try real sessions, with or without loading the wheels' libraries first",
    )
    args = parser.parse_args(argv)
    if args.sessions:
        for _, detail in session_lines(preload=args.sessions == "preload"):
            print(f"{args.sessions}: {detail}")
        return 0
    return 0 if run_checks(args.require_gpu, args.cuda_only) else 1


if __name__ == "__main__":
    sys.exit(main())
