"""The Dockerfiles, checked without a container engine (scripts/container-smoke.sh builds and runs
the serving image for real, in CI after these tests).

What a build would do is checked piece by piece against the real project: the files each image
COPYs exist and, copied alone, build a wheel that carries the service and the demo page; the
extras each image installs exist in pyproject.toml (and the serving image's hold no torch); the
images run as a non-root user; the serving image's CMD, run here exactly as written, starts the
real service and its HEALTHCHECK command passes against it; and the docs (README.md, docs/) give
the same install and start commands as the images, so the two cannot drift apart.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from clipserve.contract.cli_settings import SettingsError
from clipserve.service.server.cli import settings_from
from tests.fixtures.project import (
    documented_commands,
    expanded_extras,
    markdown_commands,
    pyproject,
    requirement_names,
    shell_commands,
)
from tests.fixtures.service import free_port

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
IMAGES = ("serve", "serve-gpu", "train")
TORCH_PACKAGES = ("torch", "torchvision", "open_clip_torch", "open-clip-torch")
HEALTHCHECK_IN_IMAGE = "/opt/clipserve/healthcheck.py"


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str

    @property
    def exec_form(self) -> list[str] | None:
        """The JSON-array form of CMD/ENTRYPOINT/RUN, or None for the shell form."""
        text = self.args.strip()
        if not text.startswith("["):
            return None
        return json.loads(text)


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped, as the builder reads them."""
    instructions: list[Instruction] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip()))
        pending = ""
    assert not pending, f"{path}: dangling line continuation"
    return instructions


def dockerfile(image: str) -> list[Instruction]:
    return parse_dockerfile(DOCKER / f"Dockerfile.{image}")


def only(instructions: list[Instruction], keyword: str) -> Instruction:
    found = [i for i in instructions if i.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword}, found {len(found)}"
    return found[0]


def pip_installed_extras(instructions: list[Instruction]) -> set[str]:
    """Extras of the project installed by `pip install '.[a,b]'` in the RUN lines."""
    extras: set[str] = set()
    for instruction in instructions:
        if instruction.keyword != "RUN":
            continue
        for argv in shell_commands(instruction.args):
            extras |= project_extras(argv)
    return extras


def project_extras(argv: list[str]) -> set[str]:
    if argv[:2] != ["pip", "install"] and argv[1:4] != ["-m", "pip", "install"]:
        return set()
    found: set[str] = set()
    for arg in argv:
        match = re.fullmatch(r"\.\[([a-z0-9_,-]+)\]", arg)
        if match:
            found |= set(match.group(1).split(","))
    return found


def env_of(instructions: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in instructions:
        if instruction.keyword == "ENV":
            for pair in shlex.split(instruction.args):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


@pytest.mark.parametrize("image", IMAGES)
def test_dockerfile_copies_only_what_exists(image: str) -> None:
    for instruction in dockerfile(image):
        if instruction.keyword != "COPY" or "--from=" in instruction.args:
            continue
        *sources, _target = shlex.split(instruction.args)
        for source in sources:
            assert (ROOT / source).exists(), f"Dockerfile.{image} copies {source}, which does not exist"
    # Every builder reads the context's .dockerignore; BuildKit reads <Dockerfile>.dockerignore instead
    # where there is one.
    own = DOCKER / f"Dockerfile.{image}.dockerignore"
    for ignore in [ROOT / ".dockerignore", *([own] if own.exists() else [])]:
        assert {".venv", "models", ".git", ".env"} <= set(ignore.read_text().split()), f"{ignore} sends them"


@pytest.mark.parametrize("image", IMAGES)
def test_images_run_as_a_non_root_user(image: str) -> None:
    instructions = dockerfile(image)
    keywords = [i.keyword for i in instructions]
    user = [i for i in instructions if i.keyword == "USER"][-1]
    assert user.args not in ("root", "0", "0:0")
    assert keywords.index("CMD") > len(keywords) - 1 - keywords[::-1].index("USER")
    assert any(f"--uid {10001}" in i.args for i in instructions if i.keyword == "RUN")


def test_serve_image_installs_the_serve_extra_and_no_torch() -> None:
    instructions = dockerfile("serve")
    assert pip_installed_extras(instructions) == {"serve"}
    project = pyproject()["project"]
    installed = requirement_names(project["dependencies"] + expanded_extras({"serve"}))
    assert not installed & set(TORCH_PACKAGES), f"the serve extra pulls in {installed & set(TORCH_PACKAGES)}"
    assert "onnxruntime" in installed
    assert only(instructions, "CMD").exec_form[0] == "clip-serve"


def test_serve_image_installs_from_a_constraints_file_of_a_resolved_environment() -> None:
    """Reproducible builds: Dockerfile.serve installs `.[serve]` under docker/constraints-serve.txt
    (written by `make constraints` from an environment pip resolved), which pins every package of
    that environment exactly, each pin within what pyproject.toml asks."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    instructions = dockerfile("serve")
    copies = [shlex.split(i.args) for i in instructions if i.keyword == "COPY"]
    assert any("docker/constraints-serve.txt" in copy[:-1] for copy in copies)
    installs = [
        argv
        for i in instructions
        if i.keyword == "RUN"
        for argv in shell_commands(i.args)
        if argv[:2] == ["pip", "install"]
    ]
    assert installs == [["pip", "install", "--constraint", "constraints-serve.txt", ".[serve]"]]
    pins: dict[str, Version] = {}
    for line in (DOCKER / "constraints-serve.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, equals, version = line.partition("==")
            assert equals and version, f"not an exact pin: {line}"
            pins[canonicalize_name(name)] = Version(version)
    for text in pyproject()["project"]["dependencies"] + expanded_extras({"serve"}):
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} is not pinned: run make constraints"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{name}=={pins[name]} does not satisfy {requirement}: run make constraints"
        )
    assert not set(pins) & {canonicalize_name(name) for name in TORCH_PACKAGES}


def test_gpu_image_is_python_slim_with_only_the_gpu_onnxruntime_and_tensorrt() -> None:
    instructions = dockerfile("serve-gpu")
    args = dict(i.args.split("=", 1) for i in instructions if i.keyword == "ARG" and "=" in i.args)
    # The same base as the CPU image: every library but the driver comes from a wheel.
    serve_args = dict(
        i.args.split("=", 1) for i in dockerfile("serve") if i.keyword == "ARG" and "=" in i.args
    )
    assert args["PYTHON_IMAGE"] == serve_args["PYTHON_IMAGE"]
    assert not any(i.keyword == "FROM" and "nvidia/cuda" in i.args for i in instructions)
    # The pinned requirements of the set first (a layer keyed on pyproject.toml alone), then the
    # project on top of them, adding no requirement of its own.
    installs = [
        shell_commands(i.args) for i in instructions if i.keyword == "RUN" and "pip install" in i.args
    ]
    assert installs == [
        [
            [
                "python",
                "/src/requirements.py",
                "${GPU_SET}",
                "/src/pyproject.toml",
                ">",
                "/src/requirements.txt",
            ],
            ["pip", "install", "-r", "/src/requirements.txt"],
        ],
        [["pip", "install", "--no-deps", "/src"], ["rm", "-rf", "/src"]],
    ]
    copies = [shlex.split(i.args) for i in instructions if i.keyword == "COPY"]
    assert copies.index(["pyproject.toml", "docker/requirements.py", "/src/"]) < copies.index(
        ["service", "/src/service"]
    )
    assert args["GPU_SET"] == "serve-gpu"
    names = requirement_names(expanded_extras({args["GPU_SET"]}))
    assert {"onnxruntime-gpu", "tensorrt-cu13", "cuda-bindings", "nvidia-cudnn-cu13"} <= names
    assert "onnxruntime" not in names and not names & set(TORCH_PACKAGES)
    cuda_only = requirement_names(expanded_extras({"serve-gpu-cuda"}))
    assert "onnxruntime-gpu" in cuda_only and "tensorrt-cu13" not in cuda_only
    # Nothing is uninstalled or reinstalled over another build: one onnxruntime from the start.
    assert not any("uninstall" in i.args or "--force-reinstall" in i.args for i in instructions)
    assert env_of(instructions)["CLIPSERVE_PROVIDERS"] == "tensorrt,cuda,cpu"


def test_train_image_has_torch_and_open_clip() -> None:
    instructions = dockerfile("train")
    # the train extra's pinned requirements in a layer of their own, then the project without deps
    installs = [
        shell_commands(i.args) for i in instructions if i.keyword == "RUN" and "pip install" in i.args
    ]
    assert installs == [
        [
            ["python", "/src/requirements.py", "train", "/src/pyproject.toml", ">", "/src/requirements.txt"],
            ["pip", "install", "-r", "/src/requirements.txt"],
        ],
        [["pip", "install", "--no-deps", "/src"], ["rm", "-rf", "/src"]],
    ]
    train = requirement_names(expanded_extras({"train"}))
    assert {"torch", "open_clip_torch", "onnx", "onnxruntime"} <= train


@pytest.mark.parametrize("image", ["serve", "serve-gpu"])
def test_serving_images_check_health_on_readyz(image: str) -> None:
    instructions = dockerfile(image)
    healthcheck = only(instructions, "HEALTHCHECK")
    options, _, command = healthcheck.args.partition("CMD ")
    assert "--interval=" in options and "--start-period=" in options
    assert json.loads(command) == ["python", HEALTHCHECK_IN_IMAGE]
    copies = [shlex.split(i.args) for i in instructions if i.keyword == "COPY"]
    assert ["docker/healthcheck.py", HEALTHCHECK_IN_IMAGE] in copies
    assert "/readyz" in (DOCKER / "healthcheck.py").read_text()
    assert env_of(instructions)["CLIPSERVE_PORT"] == only(instructions, "EXPOSE").args


def test_copied_sources_build_a_wheel_with_the_service_and_the_demo_page(tmp_path: Path) -> None:
    """The build stage of Dockerfile.serve, minus the network: copy what it copies, build the wheel."""
    context = tmp_path / "context"
    for instruction in dockerfile("serve"):
        if instruction.keyword == "COPY" and "--from=" not in instruction.args:
            *sources, _target = shlex.split(instruction.args)
            for source in sources:
                if source.startswith("docker/"):
                    continue
                target = context / source
                if (ROOT / source).is_dir():
                    shutil.copytree(ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(ROOT / source, target)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            ".",
        ],
        cwd=context,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = tmp_path.glob("clipserve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in (
        "clipserve/service/static/index.html",
        "clipserve/service/static/app.js",
        "clipserve/service/static/style.css",
        "clipserve/service/api/demo.py",
        "clipserve/contract/bundle.py",
    ):
        assert required in names, f"the image would lack {required}"
    # The serving image carries neither the training code nor the exporter (both need torch).
    assert not any(name.startswith(("clipserve/training/", "clipserve/export/")) for name in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert (
        "clip-serve = clipserve.service.server.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    )


def test_docs_give_the_images_install_and_start_commands(capsys: pytest.CaptureFixture[str]) -> None:
    commands = documented_commands()
    serve = dockerfile("serve")
    installs = [project_extras(argv) for argv in commands if project_extras(argv)]
    assert pip_installed_extras(serve) in installs, "no `pip install '.[serve]'` in the docs"
    cmd = only(serve, "CMD").exec_form
    starts = [argv for argv in commands if argv and argv[0] == cmd[0]]
    assert starts, "the docs never show how to start clip-serve"
    image_flags = {arg for arg in cmd if arg.startswith("--")}
    for argv in [cmd, *starts]:
        if "--help" not in argv:
            try:
                settings_from(argv[1:])
            except SettingsError as exc:
                pytest.fail(f"clip-serve refuses `{shlex.join(argv)}`, given in the docs or the image: {exc}")
    assert any({arg.split("=")[0] for arg in argv if arg.startswith("--")} == image_flags for argv in starts)
    builds = [argv for argv in commands if argv[:2] == ["docker", "build"]]
    assert builds, "docs never show how to build the images"
    for argv in builds:
        assert (ROOT / argv[argv.index("-f") + 1]).is_file()


def test_markdown_command_extraction() -> None:
    text = "Run `pip install '.[serve]'` then:\n```bash\nclip-serve --models models/ \\\n  --port 8000  # comment\n```\n"
    assert markdown_commands(text) == [
        ["clip-serve", "--models", "models/", "--port", "8000"],
        ["pip", "install", ".[serve]"],
    ]


def run_healthcheck(command: list[str], port: int) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable if arg == "python" else arg for arg in command]
    argv = [str(DOCKER / "healthcheck.py") if arg == HEALTHCHECK_IN_IMAGE else arg for arg in argv]
    env = {**os.environ, "CLIPSERVE_PORT": str(port)}
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)


def test_healthcheck_options_follow_the_services_convention_and_prefix(tmp_path: Path) -> None:
    """CLIPSERVE_PORT and CLIPSERVE_HEALTH_TIMEOUT_S are its settings: listed in --help, a bad value told
    in one line (and the probe fails), the port read from the variable the image sets."""
    script = str(DOCKER / "healthcheck.py")
    env = {key: value for key, value in os.environ.items() if not key.startswith("CLIPSERVE_")}
    shown = subprocess.run(
        [sys.executable, script, "--help"], env=env, capture_output=True, text=True, timeout=30
    )
    assert shown.returncode == 0
    text = " ".join(shown.stdout.split())
    assert "--port N" in text and "env CLIPSERVE_PORT]" in text
    assert "--health-timeout-s NUMBER" in text and "env CLIPSERVE_HEALTH_TIMEOUT_S]" in text
    bad = env | {"CLIPSERVE_HEALTH_TIMEOUT_S": "soon"}
    result = subprocess.run([sys.executable, script], env=bad, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "CLIPSERVE_HEALTH_TIMEOUT_S: Input should be a valid number" in result.stderr
    port = free_port()
    result = run_healthcheck(["python", HEALTHCHECK_IN_IMAGE], port)
    assert result.returncode == 1 and f"127.0.0.1:{port}/readyz" in result.stderr


def test_serve_image_cmd_starts_the_service_and_its_healthcheck_passes(
    tiny_repo: Path, tmp_path: Path
) -> None:
    """Dockerfile.serve's CMD and HEALTHCHECK, run as written with the image's paths mapped to temp dirs."""
    instructions = dockerfile("serve")
    port = free_port()
    mapping = {
        "/models": str(tiny_repo),
        "/data": str(tmp_path / "data"),
        "0.0.0.0": "127.0.0.1",
        "8000": str(port),
    }
    image_env = {
        key: mapping.get(value, value) for key, value in env_of(instructions).items() if key != "PATH"
    }
    env = {key: value for key, value in os.environ.items() if not key.startswith("CLIPSERVE_")}
    env |= image_env | {"CLIPSERVE_INTRA_OP_THREADS": "1", "CLIPSERVE_PREPROCESS_WORKERS": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    healthcheck = json.loads(only(instructions, "HEALTHCHECK").args.partition("CMD ")[2])

    assert run_healthcheck(healthcheck, port).returncode == 1, "the healthcheck passes with no server"
    cmd = [mapping.get(arg, arg) for arg in only(instructions, "CMD").exec_form]
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 90
        while (result := run_healthcheck(healthcheck, port)).returncode != 0:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, f"not ready in 90 s: {result.stderr}"
            time.sleep(0.5)
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
