"""DDP under torchrun: two CPU processes on gloo train like one process on the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from clipserve.training.cli import run_training
from tests.fixtures.training import TINY_DATA

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _losses(run: Path) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if "loss" in json.loads(line)]


@pytest.mark.slow
def test_two_process_gloo_ddp_matches_single_process(tiny_student_config: Path, tmp_path: Path) -> None:
    common = ["--student", str(tiny_student_config), "--data", TINY_DATA, "--steps", "4", "--batch-size", "8"]
    common += [
        "--lr",
        "2e-3",
        "--warmup-steps",
        "1",
        "--torch-threads",
        "1",
        "--no-progress",
        "--no-evaluate",
        "--accumulation",
        "2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "clipserve.training.cli", *common, "--out", str(tmp_path / "ddp")]
    done = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=240, cwd=Path(__file__).parents[2]
    )
    assert done.returncode == 0, done.stderr[-3000:]

    run_training(
        {
            "student": str(tiny_student_config),
            "data": TINY_DATA,
            "steps": 4,
            "batch_size": 8,
            "lr": 2e-3,
            "warmup_steps": 1,
            "accumulation": 2,
            "progress": False,
            "evaluate": False,
            "out": str(tmp_path / "single"),
        }
    )
    assert _losses(tmp_path / "ddp") == pytest.approx(_losses(tmp_path / "single"), rel=1e-4)
    ddp_weights = load_file(str(tmp_path / "ddp" / "final" / "open_clip_model.safetensors"))
    single_weights = load_file(str(tmp_path / "single" / "final" / "open_clip_model.safetensors"))
    for key, value in single_weights.items():
        assert (ddp_weights[key] - value).abs().max() < 1e-4, key
