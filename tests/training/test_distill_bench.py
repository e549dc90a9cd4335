"""bench/distill_shapes.py: its selection and plotting helpers, and a quick run of the whole pipeline."""

from __future__ import annotations

import importlib.util
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "distill_shapes.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("distill_shapes", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["distill_shapes"] = module  # its dataclasses look themselves up there
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
    tuned = {
        "logit_kd": bench.KDSetting(1.0),
        "feature": bench.KDSetting(10.0),
        "icl": bench.KDSetting(0.5),
        "class_kd": bench.KDSetting(3.0, {"class_kd_temperature": 4.0}),
    }
    locked = {"lock_text": True}
    assert bench.combinations(scores, tuned) == {
        "inherit+icl": bench.Method("clip=1,icl=0.5", "inherit", locked),
        "inherit+feature": bench.Method("clip=1,feature=10", "inherit", locked),
        "inherit+icl+feature": bench.Method("clip=1,icl=0.5,feature=10", "inherit", locked),
    }
    scores["class_kd"] = 0.6
    both = bench.combinations(scores, tuned)["inherit+class_kd+icl"]
    assert both == bench.Method(
        "clip=1,class_kd=3,icl=0.5", "inherit", {"class_kd_temperature": 4.0, "lock_text": True}
    )
    # the unlabeled transfer images go to the methods with an image-side loss
    assert both.unlabeled and not bench.Method("clip=1,icl=0.5", "inherit").unlabeled


def test_every_method_alone_shares_the_clip_loss_with_its_tuned_setting(bench) -> None:
    table = bench.methods()
    assert table["scratch"] == bench.Method("clip", "random")
    assert table["inherit"] == bench.Method("clip", "inherit")
    assert table["inherit-locked"] == bench.Method("clip", "inherit", {"lock_text": True})
    assert [kd for kd in bench.KD_METHODS if table[kd].unlabeled] == ["feature", "class_kd"]
    for kd in bench.KD_METHODS:
        setting = bench.TUNED[kd]
        assert table[kd] == bench.Method(f"clip=1,{kd}={setting.weight:g}", "random", setting.options)
        assert setting in bench.SWEEP[kd], f"the tuned {kd} setting is one the sweep tried"


def test_goals_are_judged_on_the_mean_over_seeds(bench) -> None:
    per_seed = {
        0: {
            "scratch": 0.50,
            "logit_kd": 0.56,
            "feature": 0.60,
            "icl": 0.52,
            "class_kd": 0.55,
            "inherit": 0.80,
            "inherit-locked": 0.78,
            "inherit+feature": 0.86,
        },
        1: {
            "scratch": 0.48,
            "logit_kd": 0.50,
            "feature": 0.58,
            "icl": 0.50,
            "class_kd": 0.53,
            "inherit": 0.82,
            "inherit-locked": 0.83,
            "inherit+feature": 0.84,
        },
    }
    served = {"int8_minus_fp32_points": -0.5}
    goal = bench.goals(per_seed, teacher_top1=0.88, speedup=6.0, served=served)
    assert goal["best_student"] == "inherit+feature"
    assert goal["best_vs_teacher"]["met"] and goal["best_vs_teacher"]["ratio"] == pytest.approx(0.85 / 0.88)
    gains = goal["each_loss_vs_scratch_points"]
    assert gains["feature"]["met"] and not gains["icl"]["met"]
    assert gains["logit_kd"]["gain"] == pytest.approx(4.0)
    assert gains["logit_kd"]["met"]
    assert goal["inherit_kd_vs_inherit_points"]["met"]
    # against the better of the two inherited students without KD
    assert goal["inherit_kd_vs_inherit_points"]["against"] == "inherit"
    assert goal["inherit_kd_vs_inherit_points"]["gain"] == pytest.approx(4.0)
    assert goal["int8_vs_fp32_served"]["met"]
    assert not bench.goals(per_seed, 0.88, speedup=3.0, served=None)["best_vs_teacher"]["met"]


def test_a_finished_student_run_is_reused_only_for_the_same_job(bench, tmp_path: Path) -> None:
    budget = bench.ShapesBudget(steps=3, batch_size=4)
    unlabeled = ("synthetic:shapes?size=6&held_out=none", tmp_path)

    def job_of(name, seed, method, teacher, transfer=unlabeled):
        return bench.Job(name, seed, method, tmp_path / "s", budget, teacher, tmp_path, transfer)

    job = job_of("scratch", 0, bench.Method("clip", "random"), tmp_path / "t-1")
    (job.out / "final").mkdir(parents=True)
    (job.out / "job.json").write_text(json.dumps(job.record()))
    assert bench.train_student(job) == ("scratch", 0, 0.0, 0.0)
    # the teacher does not decide a student trained from scratch; the seed does
    assert job_of("scratch", 0, job.method, tmp_path / "t-2").record() == job.record()
    assert job_of("scratch", 1, job.method, tmp_path / "t-1").record() != job.record()
    kd = bench.Method("clip=1,feature=3", "random")
    assert job_of("f", 0, kd, tmp_path / "t-1").record() != job_of("f", 0, kd, tmp_path / "t-2").record()
    # the transfer set decides only the methods it feeds
    other = ("synthetic:shapes?size=8&held_out=none", tmp_path)
    assert (
        job_of("f", 0, kd, tmp_path / "t-1").record() != job_of("f", 0, kd, tmp_path / "t-1", other).record()
    )
    assert job.record() == job_of("scratch", 0, job.method, tmp_path / "t-1", other).record()


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
    assert names[:8] == [
        "teacher",
        "scratch",
        "logit_kd",
        "feature",
        "icl",
        "class_kd",
        "inherit",
        "inherit-locked",
    ]
    assert len(names) == 11 and all(n.startswith("inherit+") for n in names[8:])
    summary = results["summary"]
    assert summary["goals"]["best_student"] in names[2:]
    # the teacher was built into the cache under --out, with its build time and held-out curve
    teacher = summary["teacher"]
    assert Path(teacher["dir"]).parent == out / "teachers" and (Path(teacher["dir"]) / "build.json").is_file()
    assert teacher["build_seconds"]["wall"] > 0 and teacher["held_out_curve"]
    # one latency per architecture: the teacher's, and the students' shared one
    latencies = {m["name"]: m["latency_ms"]["image"] for m in results["models"]}
    assert len({v for k, v in latencies.items() if k != "teacher"}) == 1
    speedup = summary["goals"]["best_vs_teacher"]["image_latency_speedup"]
    assert speedup == pytest.approx(latencies["teacher"] / latencies["scratch"])
    served = summary["served"]
    assert served["images"] == 60 and 0 <= served["int8"] <= 1 and 0 <= served["fp32"] <= 1
    assert (out / "accuracy_vs_latency.png").stat().st_size > 10_000
    assert "| teacher | teacher |" in (out / "results.md").read_text()


def test_the_teacher_cache_key_follows_the_recipe_and_the_config_content(tmp_path: Path) -> None:
    from clipserve.training.recipes import SHAPES_LARGE_TEACHER_CONFIG, TeacherRecipe

    recipe = TeacherRecipe()
    assert recipe.key() == TeacherRecipe().key() and len(recipe.key()) == 12
    assert TeacherRecipe(steps=recipe.steps + 1).key() != recipe.key()
    assert TeacherRecipe(threads=recipe.threads + 1).key() != recipe.key()
    copy = tmp_path / "copy.json"
    copy.write_text(SHAPES_LARGE_TEACHER_CONFIG.read_text())
    # the same content under another path is the same teacher; other content is another
    assert TeacherRecipe(config=copy).key() == recipe.key()
    copy.write_text(SHAPES_LARGE_TEACHER_CONFIG.read_text().replace('"width": 24', '"width": 20'))
    assert TeacherRecipe(config=copy).key() != recipe.key()
    assert recipe.directory(tmp_path) == tmp_path / f"shapes-teacher-{recipe.key()}"
