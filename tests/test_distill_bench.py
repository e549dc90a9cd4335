"""bench/distill_shapes.py: its selection and plotting helpers, and a quick run of the whole pipeline."""

from __future__ import annotations

import importlib.util
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "distill_shapes.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("distill_shapes", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_combinations_put_the_two_best_kd_losses_on_an_inherited_student(bench) -> None:
    scores = {
        "scratch": 0.4,
        "logit_kd": 0.30,
        "feature": 0.45,
        "icl": 0.50,
        "class_kd": 0.41,
        "inherit": 0.7,
    }
    assert bench.combinations(scores, 0.5) == {
        "inherit+icl": ("clip=1,icl=0.5", "inherit"),
        "inherit+feature": ("clip=1,feature=0.5", "inherit"),
        "inherit+icl+feature": ("clip=1,icl=0.5,feature=0.5", "inherit"),
    }


def test_every_method_alone_shares_the_clip_loss_and_only_inherit_inherits(bench) -> None:
    table = bench.methods(1.0)
    assert table["scratch"] == ("clip", "random")
    assert table["inherit"] == ("clip", "inherit")
    for kd in bench.KD_METHODS:
        assert table[kd] == (f"clip=1,{kd}=1", "random")


def test_spread_labels_keeps_order_and_gap(bench) -> None:
    values = [50.0, 46.7, 46.5, 75.0, 46.6]
    placed = bench.spread_labels(values, gap=1.0)
    order = sorted(range(len(values)), key=lambda i: values[i])
    heights = [placed[i] for i in order]
    assert all(b - a >= 1.0 - 1e-9 for a, b in itertools.pairwise(heights))
    assert all(p >= v for p, v in zip(placed, values, strict=True))
    assert placed[3] == 75.0  # far from the others: left where it is


@pytest.mark.slow
def test_quick_run_writes_results_report_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    names = [m["name"] for m in results["models"]]
    assert names[:7] == ["teacher", "scratch", "logit_kd", "feature", "icl", "class_kd", "inherit"]
    assert len(names) == 10 and all(n.startswith("inherit+") for n in names[7:])
    summary = results["summary"]
    assert summary["best_student"] in names[2:]
    # one latency per architecture: the teacher's, and the students' shared one
    latencies = {m["name"]: m["latency_ms"]["image"] for m in results["models"]}
    assert len({v for k, v in latencies.items() if k != "teacher"}) == 1
    assert summary["image_latency_speedup"] == pytest.approx(latencies["teacher"] / latencies["scratch"])
    assert (out / "accuracy_vs_latency.png").stat().st_size > 10_000
    assert "| teacher | teacher |" in (out / "results.md").read_text()
