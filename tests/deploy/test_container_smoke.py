"""scripts/container-smoke.sh and its checks, without a container engine: what the smoke does where
there is none, the metric arithmetic its checks rest on, and the compose commands of the docs
(docs/deployment.md) being the ones it runs. The smoke itself runs the stack for real
(`make container-smoke`, in CI).
"""

from __future__ import annotations

import ast
import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from clipserve.service.metrics import Metrics
from tests.fixtures.containers import machine_without_engine
from tests.fixtures.project import documented_commands

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "scripts" / "container-smoke.sh"
SMOKE_CHECKS = ROOT / "scripts" / "container_smoke_checks.py"


@pytest.fixture(scope="module")
def checks() -> ModuleType:
    spec = importlib.util.spec_from_file_location("container_smoke_checks", SMOKE_CHECKS)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


def run_smoke(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["/bin/bash", str(SMOKE)], env=env, capture_output=True, text=True, timeout=60)


def test_smoke_skips_where_there_is_no_engine(tmp_path: Path) -> None:
    done = run_smoke(machine_without_engine(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("skipped: no container engine")


def test_smoke_fails_where_there_is_no_engine_in_ci(tmp_path: Path) -> None:
    done = run_smoke(machine_without_engine(tmp_path) | {"CI": "true"})
    assert done.returncode == 1
    assert "no container engine" in done.stderr
    assert "skipped" not in done.stdout


def test_metric_totals_from_the_service_metrics(checks: ModuleType) -> None:
    metrics = Metrics()
    metrics.encoder_calls.labels(model="smoke@1", tower="text").inc(3)
    metrics.encoder_calls.labels(model="smoke@1", tower="image").inc(5)
    metrics.encoder_calls.labels(model="smoke@2", tower="text").inc(2)
    metrics.request_latency.labels(route="/v1/embed", method="POST", status="200").observe(0.01)
    metrics.request_latency.labels(route="/v1/embed", method="POST", status="503").observe(0.01)
    text = metrics.render().decode()
    total = checks.metric_total
    assert total(text, "clipserve_encoder_calls_total", tower="text") == 5
    assert total(text, "clipserve_encoder_calls_total") == 10
    assert total(text, "clipserve_encoder_calls_total", model="smoke@1", tower="image") == 5
    assert total(text, "clipserve_request_seconds_count", route="/v1/embed") == 2
    assert total(text, "clipserve_request_seconds_count", route="/v1/classify") == 0


def smoke_compose_commands() -> set[tuple[str, ...]]:
    """The compose commands the smoke runs as a user would (`compose_as_documented`, `compose_run`)."""
    commands = {
        tuple(shlex.split(args))
        for args in re.findall(r"^\s*compose_as_documented (.+)$", SMOKE.read_text(), flags=re.M)
    }
    commands |= {
        tuple(ast.literal_eval(f"({args},)"))
        for args in re.findall(r"self\.engine\.compose_run\(([^)]*)\)", SMOKE_CHECKS.read_text())
    }
    return commands


def test_documented_compose_commands_are_the_ones_the_smoke_runs() -> None:
    documented = {
        tuple(argv[2:])
        for argv in documented_commands()
        if argv[:2] == ["docker", "compose"] and "--profile" not in argv
    }
    smoke = smoke_compose_commands()
    assert ("up", "-d", "--scale", "api=3") in smoke and ("restart", "redis") in smoke
    # The profiles (trainer: a multi-GB image; gpu: no GPU in CI) are documented, not smoke-tested.
    assert documented == smoke
