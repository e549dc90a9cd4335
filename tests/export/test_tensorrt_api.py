"""Every TensorRT name the code uses is listed in `gpu_stack.TENSORRT_API`, and exists in the
pinned TensorRT.

Where the TensorRT libraries are installed (`import tensorrt` works), the real module is walked.
Elsewhere the pinned bindings wheel (in the dev extra: PyPI carries the bindings, only NVIDIA's
index the libraries) is loaded against stand-ins for the nine library functions it imports
(tests/data/tensorrt_standin.c, built here with the C compiler): the classes, enums and methods
walked are the real bindings' own. The walk runs in a subprocess, so no stand-in reaches this one.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from clipserve.service.runtime.gpu_stack import TENSORRT_API

ROOT = Path(__file__).resolve().parents[2]
SOURCES = (ROOT / "export" / "tensorrt.py", ROOT / "service" / "runtime" / "tensorrt.py")
STANDIN = ROOT / "tests" / "data" / "tensorrt_standin.c"
# Names the code gives TensorRT objects, and their classes in the bindings.
TENSORRT_OBJECTS = {
    "builder": "Builder",
    "config": "IBuilderConfig",
    "parser": "OnnxParser",
    "profile": "IOptimizationProfile",
    "engine": "ICudaEngine",
    "context": "IExecutionContext",
}


def pinned_tensorrt() -> str:
    gpu = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    return next(r.split("==")[1] for r in gpu if r.startswith("tensorrt-cu13=="))


def _chain(node: ast.Attribute) -> list[str] | None:
    """['Logger', 'WARNING'] for `trt.Logger.WARNING`; None when the root is not `trt`."""
    parts: list[str] = []
    current: ast.expr = node
    while isinstance(current, ast.Attribute):
        parts.insert(0, current.attr)
        current = current.value
    return parts if isinstance(current, ast.Name) and current.id == "trt" else None


def used_names() -> set[str]:
    """`trt.X.Y` chains, and methods called on the variables that hold TensorRT objects."""
    names: set[str] = set()
    for source in SOURCES:
        tree = ast.parse(source.read_text())
        outer = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute):
                continue
            chain = _chain(node)
            if chain is not None and id(node) not in outer:
                names.add(".".join(chain))
            owner = node.value
            holder = owner.attr if isinstance(owner, ast.Attribute) and _is_self(owner.value) else None
            holder = owner.id if isinstance(owner, ast.Name) else holder
            if holder in TENSORRT_OBJECTS:
                names.add(f"{TENSORRT_OBJECTS[holder]}.{node.attr}")
    return names


def _is_self(node: ast.expr) -> bool:
    return isinstance(node, ast.Name) and node.id == "self"


def test_every_tensorrt_name_in_the_code_is_listed() -> None:
    used = used_names()
    assert used, "the scan found no TensorRT use at all"
    assert sorted(used - set(TENSORRT_API)) == []
    # And nothing listed that the code no longer uses (the list would hide a removed-API risk):
    # a method of an object the scan follows must be seen on it; any other name, somewhere.
    everything = {
        n.attr for s in SOURCES for n in ast.walk(ast.parse(s.read_text())) if isinstance(n, ast.Attribute)
    }
    followed = set(TENSORRT_OBJECTS.values())
    stale = [
        name
        for name in TENSORRT_API
        if name not in used and (name.split(".")[0] in followed or name.split(".")[-1] not in everything)
    ]
    assert stale == []


def _walk(module: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    code = (
        f"import json, {module} as trt\n"
        "from clipserve.service.runtime.gpu_stack import missing_tensorrt_api\n"
        "print(json.dumps([trt.__version__, missing_tensorrt_api(trt),"
        " missing_tensorrt_api(trt, ('Builder.no_such_method', 'BuilderFlag'))]))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env
    )


def _standin_libraries(folder: Path, major: str) -> Path:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler here to build the TensorRT library stand-ins")
    folder.mkdir(parents=True, exist_ok=True)
    for library in ("libnvinfer", "libnvinfer_plugin", "libnvonnxparser"):
        soname = f"{library}.so.{major}"
        subprocess.run(
            [compiler, "-shared", "-fPIC", str(STANDIN), "-o", str(folder / soname), f"-Wl,-soname,{soname}"],
            check=True,
            capture_output=True,
            timeout=60,
        )
    return folder


def test_the_pinned_tensorrt_has_every_name_the_code_uses(tmp_path: Path) -> None:
    pinned = pinned_tensorrt()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = _walk("tensorrt", env)
    if result.returncode != 0:
        if importlib.util.find_spec("tensorrt_bindings") is None:
            pytest.skip(
                "neither tensorrt nor the pinned tensorrt-cu13-bindings is installed "
                f"(import tensorrt: {result.stderr.strip().splitlines()[-1]})"
            )
        libraries = _standin_libraries(tmp_path / "standin", pinned.split(".")[0])
        result = _walk("tensorrt_bindings", {**env, "LD_LIBRARY_PATH": str(libraries)})
    assert result.returncode == 0, result.stderr[-2000:]
    version, missing, must_be_missing = json.loads(result.stdout)
    assert version == pinned
    assert missing == [], f"TensorRT {version} lacks {missing}"
    assert must_be_missing == ["Builder.no_such_method"]  # the walk does report an absent name
