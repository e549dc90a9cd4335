"""The GPU stack, checked where no GPU is: the pins, the one-ONNX-Runtime rule, the TensorRT
provider's options, the engine choice, and the in-image check run against this environment.

A second ONNX Runtime install is stood in for by its metadata alone (a dist-info folder on the
path): that is all the check reads, and installing both wheels here would cost 300 MB to prove
what the metadata proves.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from clipserve.contract.bundle import Bundle, BundleFile
from clipserve.service.runtime import (
    ProviderUnavailableError,
    RuntimeConfigError,
    RuntimeOptions,
    tower_options,
)
from clipserve.service.runtime.gpu_stack import (
    check_single_onnxruntime,
    link_report,
    onnxruntime_distributions,
    tensorrt_link_verdict,
    why_no_cuda,
    write_identity_graph,
)
from clipserve.service.runtime.onnx import provider_list, tensorrt_provider_options
from clipserve.service.runtime.tensorrt import device_name, matching_engine
from clipserve.service.settings import Settings
from tests.fixtures.project import expanded_extras, requirement_names

ROOT = Path(__file__).resolve().parents[2]
EXTRAS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
ONNXRUNTIMES = {"onnxruntime", "onnxruntime-gpu"}


def requirement_name(requirement: str) -> str:
    (name,) = requirement_names([requirement])
    return name


@pytest.mark.parametrize(
    ("extras", "runtime"),
    [
        ("serve", "onnxruntime"),
        ("serve,train,dev", "onnxruntime"),
        ("serve-gpu", "onnxruntime-gpu"),
        ("serve-gpu-cuda", "onnxruntime-gpu"),
        ("serve-gpu,train-gpu,dev", "onnxruntime-gpu"),
    ],
)
def test_each_install_path_brings_exactly_one_onnxruntime(extras: str, runtime: str) -> None:
    names = requirement_names(expanded_extras(set(extras.split(","))))
    assert names & ONNXRUNTIMES == {runtime}
    assert not names & {"torch"} or "train" in extras


def test_gpu_pins_are_exact_and_on_one_cuda_major() -> None:
    gpu = expanded_extras({"gpu"})
    assert all("==" in r for r in gpu), [r for r in gpu if "==" not in r]
    pins = {requirement_name(r): r.split("==")[1] for r in gpu}
    assert pins["tensorrt-cu13"] == pins["tensorrt-cu13-bindings"]
    assert pins["tensorrt-cu13"].startswith("10.")  # onnxruntime-gpu 1.31 links libnvinfer.so.10
    assert pins["nvidia-cuda-runtime"].startswith("13.") and pins["cuda-bindings"].startswith("13.")
    assert not [name for name in pins if name.endswith("-cu12")]
    dev_bindings = next(r for r in EXTRAS["dev"] if requirement_name(r) == "tensorrt-cu13-bindings")
    assert dev_bindings.split("==")[1] == pins["tensorrt-cu13-bindings"]


def test_the_gpu_pins_satisfy_what_torch_asks_for() -> None:
    """train-gpu installs torch beside the gpu extra: every CUDA package both name must agree."""
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement

    try:
        torch_requires = [Requirement(r) for r in requires("torch") or []]
    except PackageNotFoundError:
        pytest.skip("torch is not installed here")
    pins = {requirement_name(r): r.split("==")[1] for r in expanded_extras({"gpu"})}
    shared = [r for r in torch_requires if r.name in pins and (r.marker is None or r.marker.evaluate())]
    if not shared:
        pytest.skip("this torch build asks for no CUDA package of the gpu extra")
    assert {r.name for r in shared} >= {"nvidia-cudnn-cu13", "cuda-bindings"}
    for requirement in shared:
        assert requirement.specifier.contains(pins[requirement.name]), (requirement, pins[requirement.name])


def _second_onnxruntime(folder: Path) -> Path:
    """The metadata pip leaves for the other ONNX Runtime build (GPU beside CPU, or CPU beside GPU)."""
    (installed,) = onnxruntime_distributions()
    name, version = (
        ("onnxruntime", "1.32.0")
        if installed.startswith("onnxruntime-gpu")
        else ("onnxruntime-gpu", "1.31.1")
    )
    info = folder / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "RECORD").write_text("onnxruntime/__init__.py,,\nonnxruntime/capi/_ld_preload.py,,\n")
    return folder


def test_a_mixed_onnxruntime_install_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (only,) = onnxruntime_distributions()
    assert check_single_onnxruntime() == only
    monkeypatch.syspath_prepend(str(_second_onnxruntime(tmp_path)))
    assert len(onnxruntime_distributions()) == 2
    with pytest.raises(
        ProviderUnavailableError, match=r"2 ONNX Runtime builds .*onnxruntime-gpu 1\.31\.1.*serve-gpu"
    ):
        check_single_onnxruntime()


def test_clip_serve_refuses_a_mixed_install_in_one_line(tmp_path: Path, tiny_repo: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(_second_onnxruntime(tmp_path / "site"))}
    result = subprocess.run(
        [sys.executable, "-m", "clipserve.service.server.cli", "--models-dir", str(tiny_repo), "--port", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clip-serve: error: 2 ONNX Runtime builds"), result.stderr
    assert "Traceback" not in result.stderr


def test_towers_get_the_shape_ranges_the_service_feeds_them(tiny_bundle, tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path, max_batch_size_image=16, max_batch_size_text=32, labelset_chunk_texts=256
    )
    manifest = tiny_bundle.manifest
    image, text = (tower_options(settings, manifest, tower) for tower in ("image", "text"))
    height, width = manifest.image.size
    assert image.shapes.minimum == (1, 3, height, width) and image.shapes.maximum == (16, 3, height, width)
    context = manifest.tokenizer.context_length
    # Label-set chunks bypass the batcher, so the text profile reaches the chunk size.
    assert text.shapes.maximum == (256, context) and text.shapes.optimum[0] == 32
    assert text.shapes.minimum[1] == (2 if manifest.text.dynamic_length else context)
    assert image.engine_cache_dir == tmp_path / "engine-cache" / f"{manifest.content_hash[:16]}-image"
    assert tower_options(
        Settings(engine_cache_dir=tmp_path / "c"), manifest, "text"
    ).engine_cache_dir.parent == (tmp_path / "c")


def test_tensorrt_provider_gets_one_profile_over_the_served_shapes(tiny_bundle, tmp_path: Path) -> None:
    options = tower_options(Settings(data_dir=tmp_path), tiny_bundle.manifest, "image")
    without_cache = RuntimeOptions(providers=("tensorrt", "cuda"), shapes=options.shapes)
    provider = tensorrt_provider_options(without_cache)
    height, width = tiny_bundle.manifest.image.size
    assert provider == {
        "trt_profile_min_shapes": f"pixel_values:1x3x{height}x{width}",
        "trt_profile_opt_shapes": f"pixel_values:8x3x{height}x{width}",
        "trt_profile_max_shapes": f"pixel_values:8x3x{height}x{width}",
    }
    (trt_entry, cuda_entry) = provider_list(without_cache)
    assert trt_entry == ("TensorrtExecutionProvider", {"device_id": 0, **provider})
    assert cuda_entry == ("CUDAExecutionProvider", {"device_id": 0})


def test_the_engine_cache_needs_tensorrt_and_says_so(tiny_bundle, tmp_path: Path) -> None:
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError):
        pass
    else:
        pytest.skip("tensorrt loads here; the cache folder is exercised by the gpu tests")
    options = tower_options(Settings(data_dir=tmp_path), tiny_bundle.manifest, "image")
    with pytest.raises(ProviderUnavailableError, match="TensorRT cannot be loaded"):
        tensorrt_provider_options(options)


def _engine(path: str, tower: str | None, gpu: str | None = None, version: str | None = None) -> BundleFile:
    return BundleFile(
        path=path,
        sha256="0" * 64,
        size=1,
        role="engine",
        precision="fp16",
        tower=tower,
        gpu=gpu,
        tensorrt_version=version,
    )


def test_engines_are_chosen_by_tower_gpu_and_tensorrt_version(tiny_bundle) -> None:
    engines = [
        _engine("text.nvidia-a10.trt10.16.1.11.plan", "text", "NVIDIA A10", "10.16.1.11"),
        _engine("text.nvidia-h200.trt10.14.1.48.plan", "text", "NVIDIA H200", "10.14.1.48"),
        _engine("text.nvidia-h200.trt10.16.1.11.plan", "text", "NVIDIA H200", "10.16.1.11"),
        _engine("image.nvidia-h200.trt10.16.1.11.plan", None, "NVIDIA H200", "10.16.1.11"),
    ]
    manifest = tiny_bundle.manifest.model_copy(update={"files": [*tiny_bundle.manifest.files, *engines]})
    bundle = Bundle(manifest=manifest, path=tiny_bundle.path)
    chosen = matching_engine(bundle, "text", "NVIDIA H200", "10.16.1.11")
    assert chosen.path == "text.nvidia-h200.trt10.16.1.11.plan"
    assert matching_engine(bundle, "image", "NVIDIA H200", "10.16.1.11").path.startswith("image.")
    # No fallback to "the first engine": one built elsewhere would not deserialize, or run wrongly.
    with pytest.raises(
        RuntimeConfigError, match=r"no text engine for this machine \(NVIDIA L4, TensorRT 10\.16\.1\.11\)"
    ) as refused:
        matching_engine(bundle, "text", "NVIDIA L4", "10.16.1.11")
    assert "text.nvidia-a10.trt10.16.1.11.plan (NVIDIA A10, TensorRT 10.16.1.11)" in str(refused.value)
    assert "clip-export --tensorrt" in str(refused.value)
    with pytest.raises(RuntimeConfigError, match="no TensorRT engine for its image tower"):
        matching_engine(tiny_bundle, "image", "NVIDIA H200", "10.16.1.11")


def test_provider_libraries_are_resolved_with_ldd(tmp_path: Path) -> None:
    """link_report on a real shared library: Python's own extension modules link libc."""
    import _ctypes

    report = link_report(Path(_ctypes.__file__), [])
    assert report.resolved and not report.missing
    assert all(path is None or Path(path).exists() for path in report.resolved.values())


def test_the_identity_graph_runs(tmp_path: Path) -> None:
    import numpy as np
    import onnxruntime

    session = onnxruntime.InferenceSession(str(write_identity_graph(tmp_path / "g.onnx")))
    (out,) = session.run(None, {"x": np.array([1.5, -2.0], dtype=np.float32)})
    assert out.tolist() == [1.5, -2.0]


def test_the_image_check_reports_this_environment() -> None:
    """`python -m clipserve.service.runtime.gpu_stack` (what runs inside the GPU image), run here: on a CPU
    install it fails on the providers, saying so; on a GPU install it checks their libraries.
    Either way it ends with the gpu test gate's decision, from the same function as the gate."""
    import onnxruntime

    result = subprocess.run(
        [sys.executable, "-m", "clipserve.service.runtime.gpu_stack"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert f"[ok] one ONNX Runtime distribution: {check_single_onnxruntime()}" in result.stdout
    assert "Traceback" not in result.stderr
    reason = why_no_cuda()
    gate = result.stdout.strip().splitlines()[-1]
    if reason is None:
        assert gate == "[ok] gpu test gate: a CUDA session starts: the gpu tests run"
    else:
        assert gate == f"[skip] gpu test gate: the gpu tests skip here, saying: needs a CUDA GPU: {reason}"
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        assert result.returncode == 1 and "[FAIL] providers in this build" in result.stdout
        assert "[FAIL] ldd libonnxruntime_providers_cuda.so: not in this onnxruntime build" in result.stdout
        return
    assert "[ok] providers in this build" in result.stdout
    assert "ldd libonnxruntime_providers_cuda.so: libcublasLt.so.13 => " in result.stdout
    assert "ldd libonnxruntime_providers_tensorrt.so" in result.stdout


def test_the_gpu_gate_decides_with_a_session_and_says_why() -> None:
    """The reason the `gpu` tests skip with: here, a CPU onnxruntime (or no CUDA session)."""
    import onnxruntime

    reason = why_no_cuda()
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        assert (
            reason
            == f"{check_single_onnxruntime()} has no CUDA provider (install '.[serve-gpu,train-gpu,dev]' in a separate venv)"
        )
    elif reason is not None:
        assert reason.startswith("a CUDA session does not start here: CUDAExecutionProvider")


def shared_library(compiler: str, source: Path, out: Path, *flags: str) -> None:
    subprocess.run(
        [compiler, "-shared", "-fPIC", str(source), "-o", str(out), *flags],
        check=True,
        capture_output=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def provider_standin(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A library linked like ONNX Runtime's TensorRT provider: libnvinfer.so.10, libnvonnxparser.so.10
    and a CUDA library (of a name no system has: a CUDA toolkit on the host would resolve a real
    one), built here with the C compiler. Returns it and the folders of its TensorRT and CUDA
    dependencies."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler here to build the provider stand-in")
    root = tmp_path_factory.mktemp("provider")
    tensorrt, cuda = root / "tensorrt", root / "cuda"
    for folder, sonames in (
        (tensorrt, ("libnvinfer.so.10", "libnvonnxparser.so.10")),
        (cuda, ("libclipserve_standin_cuda.so.13",)),
    ):
        folder.mkdir()
        for soname in sonames:
            source = root / f"{soname}.c"
            source.write_text(f"int {soname.split('.')[0]}_standin(void) {{ return 0; }}\n")
            shared_library(compiler, source, folder / soname, f"-Wl,-soname,{soname}")
    provider = root / "libonnxruntime_providers_tensorrt.so"
    source = root / "provider.c"
    source.write_text("int provider(void) { return 0; }\n")
    links = ["-l:libnvinfer.so.10", "-l:libnvonnxparser.so.10", "-l:libclipserve_standin_cuda.so.13"]
    shared_library(compiler, source, provider, f"-L{tensorrt}", f"-L{cuda}", "-Wl,--no-as-needed", *links)
    return provider, tensorrt, cuda


def test_a_cuda_install_names_the_tensorrt_libraries_it_lacks(provider_standin) -> None:
    """Real ldd: without TensorRT's folder, exactly its libraries are missing. A gpu-cuda install
    says so and passes as expected; a full install fails; any other missing library fails both."""
    provider, tensorrt, cuda = provider_standin
    without_tensorrt = link_report(provider, [cuda])
    assert without_tensorrt.missing == ["libnvinfer.so.10", "libnvonnxparser.so.10"]
    status, detail = tensorrt_link_verdict(without_tensorrt, cuda_only=True)
    assert status == "expected"
    assert detail.startswith("not found: libnvinfer.so.10, libnvonnxparser.so.10, TensorRT's own libraries")
    assert "expected for this variant" in detail
    assert tensorrt_link_verdict(without_tensorrt, cuda_only=False) == (
        "FAIL",
        "not found: libnvinfer.so.10, libnvonnxparser.so.10",
    )
    nothing = link_report(provider, [])
    status, detail = tensorrt_link_verdict(nothing, cuda_only=True)
    assert status == "FAIL" and detail.startswith(
        "not found: libclipserve_standin_cuda.so.13 (and TensorRT's own libnvinfer.so.10"
    )
    complete = link_report(provider, [tensorrt, cuda])
    assert complete.missing == []
    assert tensorrt_link_verdict(complete, cuda_only=False) == ("ok", "every library found")
    assert tensorrt_link_verdict(complete, cuda_only=True) == ("ok", "every library found")


def test_without_a_usable_gpu_engines_are_refused_saying_why() -> None:
    cudart = pytest.importorskip("cuda.bindings.runtime")
    err, count = cudart.cudaGetDeviceCount()
    if int(err) == 0 and count > 0:
        pytest.skip("a CUDA device is present; engines are chosen for it in the gpu tests")
    with pytest.raises(ProviderUnavailableError, match=r"no usable CUDA device 0 .*\(cudaError"):
        device_name(0)
