"""The GPU image's check (scripts/container-gpu-check.sh, `make gpu-image-check`) and the requirements
list the image installs before its code (docker/requirements.py), checked without a container
engine. The check itself builds and runs the image for real, in CI after the container smoke.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.fixtures.containers import machine_without_engine
from tests.fixtures.project import expanded_extras

ROOT = Path(__file__).resolve().parents[2]
CHECK = ROOT / "scripts" / "container-gpu-check.sh"
REQUIREMENTS = ROOT / "docker" / "requirements.py"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirements_of(
    extras: str, pyproject: Path = ROOT / "pyproject.toml"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REQUIREMENTS), extras, str(pyproject)],
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize("extras", ["serve-gpu-cuda", "serve-gpu", "serve", "serve-gpu,dev"])
def test_the_image_installs_what_pip_install_of_the_extra_would(extras: str) -> None:
    """The image installs the project with --no-deps on top of this list: it must hold all of it."""
    done = requirements_of(extras)
    assert done.returncode == 0, done.stderr
    listed = done.stdout.splitlines()
    expected = PYPROJECT["project"]["dependencies"] + expanded_extras(set(extras.split(",")))
    assert sorted(listed) == sorted(set(expected))
    assert not [line for line in listed if line.startswith("clipserve")]
    assert len(listed) == len(set(listed))


def test_the_cuda_set_lists_the_gpu_onnxruntime_alone() -> None:
    listed = requirements_of("serve-gpu-cuda").stdout.splitlines()
    runtimes = [
        r for r in listed if r.split("[")[0].split("=")[0].split(">")[0] in ("onnxruntime", "onnxruntime-gpu")
    ]
    assert runtimes == ["onnxruntime-gpu[cuda,cudnn]==1.31.1"]
    assert not [r for r in listed if r.startswith(("tensorrt", "torch"))]


def test_an_unknown_extra_is_one_line_naming_the_extras(tmp_path: Path) -> None:
    done = requirements_of("serve-gpu-cuda,no-such-set")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"requirements.py: no extra 'no-such-set' in pyproject.toml (there are {', '.join(PYPROJECT['project']['optional-dependencies'])})"
    ]


def test_self_references_that_loop_end(tmp_path: Path) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        '[project]\ndependencies = ["numpy"]\n'
        '[project.optional-dependencies]\na = ["clipserve[b]", "x==1"]\nb = ["clipserve[a]", "y==2"]\n'
    )
    done = requirements_of("a", pyproject)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["numpy", "y==2", "x==1"]


def run_check(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["/bin/bash", str(CHECK)], env=env, capture_output=True, text=True, timeout=60)


def test_the_check_skips_where_there_is_no_engine(tmp_path: Path) -> None:
    done = run_check(machine_without_engine(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("skipped: no container engine")


def test_the_check_fails_where_there_is_no_engine_in_ci(tmp_path: Path) -> None:
    done = run_check(machine_without_engine(tmp_path) | {"CI": "true"})
    assert done.returncode == 1
    assert "gpu image check: FAILED: no container engine" in done.stderr
    assert "skipped" not in done.stdout


def test_the_check_refuses_an_unknown_set_in_one_line(tmp_path: Path) -> None:
    done = run_check(machine_without_engine(tmp_path) | {"GPU_SET": "serve"})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "container-gpu-check: GPU_SET must be serve-gpu or serve-gpu-cuda, not 'serve'"
    ]


def test_ci_runs_the_check_after_the_container_smoke() -> None:
    steps = [
        line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith(("make", "CI="))
    ]
    smoke = steps.index('CI="${CI:-true}" make container-smoke')
    assert steps[-1] == 'CI="${CI:-true}" make gpu-image-check' and steps.index(steps[-1]) > smoke
    makefile = (ROOT / "Makefile").read_text()
    assert "gpu-image-check: venv\n\t@bash scripts/container-gpu-check.sh\n" in makefile
