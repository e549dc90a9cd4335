"""clip-distill's progress written to a log: a line of the bar's figures every few seconds, not a
carriage-return redraw per step."""

from __future__ import annotations

import io
import time

from clipserve.training.progress import progress_bar


def test_a_log_gets_a_line_every_few_seconds_and_the_last_state():
    out = io.StringIO()
    bar = progress_bar(stream=out, every_s=0.2, total=50, desc="train", unit="step")
    for _ in range(50):
        bar.update(1)
        time.sleep(0.01)
    bar.close()
    text = out.getvalue()
    lines = text.splitlines()
    assert "\r" not in text
    assert 2 <= len(lines) <= 6, lines  # about 0.5 s of steps: a line per 0.2 s, and the last state
    assert all(line.startswith("train:") for line in lines)
    assert "50/50" in lines[-1]
