"""The house: one import package, an import graph without cycles, dependencies pointing one way, and
a wheel that installs `clipserve` and nothing else.

The module graph is read from the source (an AST walk over every import, at module level or inside a
function), with the top-level folders mapped into `clipserve` as setup.py maps them.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

from tests.fixtures.service import free_port

ROOT = Path(__file__).resolve().parents[2]


def rooms() -> dict[str, str]:
    """setup.py's ROOMS, read without running setup()."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "ROOMS" for t in node.targets
        ):
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no ROOMS")


def modules() -> dict[str, Path]:
    """Every module of the package, by dotted name."""
    found: dict[str, Path] = {}
    for package, folder in rooms().items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that `name` imports, anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        for imported in names:
            while imported and imported not in known:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
    return targets


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_module_graph_has_no_cycle() -> None:
    graph = import_graph()
    assert len(graph) > 60, "the walk found too few modules: is setup.py's ROOMS read right?"
    assert cycles(graph) == []


def _importers(graph: dict[str, set[str]], target_prefix: str) -> set[str]:
    return {name for name, targets in graph.items() if any(t.startswith(target_prefix) for t in targets)}


def test_dependencies_point_one_way() -> None:
    """training -> export -> contract <- service: the contract imports no room, the service neither
    the exporter nor training."""
    graph = import_graph()
    contract = {n for n in graph if n.startswith("clipserve.contract")}
    for name in contract:
        assert not {t for t in graph[name] if not t.startswith("clipserve.contract")}, name
    service = {n for n in graph if n.startswith("clipserve.service")}
    for name in service:
        leaks = {t for t in graph[name] if t.startswith(("clipserve.export", "clipserve.training"))}
        assert not leaks, f"{name} imports {leaks}"
    for name in (n for n in graph if n.startswith("clipserve.export")):
        assert not {t for t in graph[name] if t.startswith("clipserve.training")}, name


def test_only_the_http_layer_imports_the_api() -> None:
    """The facades (embedding, classification, collections, label sets) take plain values and give
    plain results: request and response models stay in `service/api/`, which the app alone wires in."""
    graph = import_graph()
    api = "clipserve.service.api"
    importers = {
        name
        for name in _importers(graph, api)
        if not (name == api or name.startswith(f"{api}.")) and name != "clipserve.service.app"
    }
    assert importers == set(), f"modules outside {api} import it: {sorted(importers)}"


def _third_party_imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_only_the_http_layer_imports_fastapi_and_nothing_served_imports_torch() -> None:
    for name, path in modules().items():
        imported = _third_party_imports(path)
        if name.startswith(("clipserve.service", "clipserve.contract")):
            assert not imported & {"torch", "open_clip", "torchvision"}, name
        if "fastapi" in imported:
            assert name.startswith("clipserve.service.api") or name == "clipserve.service.app", name


def test_every_package_folder_is_in_the_map() -> None:
    """A folder with an __init__.py outside the rooms would be left out of the wheel silently."""
    mapped = {ROOT / folder for folder in rooms().values()}
    for init in ROOT.glob("*/__init__.py"):
        if init.parent.name in ("tests", "bench"):
            continue
        assert init.parent in mapped, f"{init.parent.name}/ is a package but setup.py does not map it"


@pytest.mark.slow
def test_the_wheel_installs_one_package_and_clip_serve_starts_from_it(
    tmp_path: Path, tiny_repo: Path
) -> None:
    """Build the wheel, install it alone into a new venv (with the venv's own pip), check what landed,
    start clip-serve from it.

    The new venv finds the dependencies (not the project) in this environment's site-packages through
    a path file, so the check needs no network and sees exactly what the wheel installs."""
    dist, source = tmp_path / "dist", tmp_path / "source"
    for name in ("pyproject.toml", "setup.py", "README.md", *rooms().values()):
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            source.mkdir(exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    built = subprocess.run(  # from a copy: an in-tree build would leave build/ in the checkout
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, source],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = dist.glob("clipserve-*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"clipserve"}

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=120)
    purelib = json.loads(
        subprocess.run(
            [
                venv / "bin" / "python",
                "-c",
                "import json, sysconfig; print(json.dumps(sysconfig.get_paths()['purelib']))",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    before = set(os.listdir(purelib))
    subprocess.run(
        [venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel],
        check=True,
        capture_output=True,
        timeout=300,
    )
    installed = set(os.listdir(purelib)) - before
    assert {n for n in installed if not n.endswith(".dist-info")} == {"clipserve"}, installed
    scripts = {p.name for p in (venv / "bin").iterdir()} & {"clip-serve", "clip-export", "clip-distill"}
    assert scripts == {"clip-serve", "clip-export", "clip-distill"}

    here = next(p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir())
    (Path(purelib) / "dependencies.pth").write_text(here + "\n")
    python = venv / "bin" / "python"
    where = subprocess.run(
        [
            python,
            "-c",
            "import clipserve.service.app as a, importlib.util as u; print(a.__file__); "
            "print([n for n in ('service', 'export', 'training') if u.find_spec(n)])",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=True,
    ).stdout.splitlines()
    assert where[0].startswith(purelib), where
    assert where[1] == "[]", "a top-level service/export/training module is importable"

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPSERVE_")}
    server = subprocess.Popen(
        [
            venv / "bin" / "clip-serve",
            "--models-dir",
            tiny_repo,
            "--port",
            str(port),
            "--redis-url",
            "none",
            "--data-dir",
            tmp_path / "data",
            "--reload-poll-s",
            "0",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stderr.read()[-2000:] if server.stderr else ""
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
                    assert response.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline, "clip-serve from the wheel never became ready"
                time.sleep(0.3)
    finally:
        server.terminate()
        server.wait(timeout=30)


def _is_test_module(name: str) -> bool:
    return name.startswith("tests.") and name.rpartition(".")[2].startswith("test_")


def test_tests_share_helpers_through_fixtures_not_each_other() -> None:
    """A test module imports helpers from tests/fixtures/, never from another test module."""
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not _is_test_module(node.module), f"{path.name} imports {node.module}"
            if isinstance(node, ast.Import):
                assert not any(_is_test_module(a.name) for a in node.names), path.name


TEST_ROOMS = {
    "contract": "clipserve/contract/",
    "service": "service/",
    "export": "export/",
    "training": "training/",
    "index": "index/",
    "deploy": "docker/, deploy/, docker-compose.yml, scripts/",
    "project": "the package, the docs",
}


def test_test_modules_live_in_the_room_they_test() -> None:
    """tests/<room>/test_*.py, one folder per room of the code (TEST_ROOMS), none at the top."""
    assert sorted((ROOT / "tests").glob("test_*.py")) == []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        room = path.relative_to(ROOT / "tests").parts[0]
        assert room in TEST_ROOMS, f"{path.relative_to(ROOT)}: not in a room folder ({', '.join(TEST_ROOMS)})"
        assert (path.parent / "__init__.py").is_file(), f"{path.parent} has no __init__.py"
