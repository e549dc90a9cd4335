"""What the Helm chart's autoscalers read and what its CPU limits mean to the service:
`clipserve_requests_in_flight` on /metrics (a real uvicorn, requests held open on a raw socket), and
the thread defaults following a cgroup CPU quota (a Kubernetes CPU limit) as well as the affinity."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from clipserve.contract.cli_settings import usable_cores


def in_flight(base: str) -> float:
    text = httpx.get(base + "/metrics", timeout=10).text
    match = re.search(r"^clipserve_requests_in_flight (\S+)$", text, flags=re.M)
    assert match, "no clipserve_requests_in_flight on /metrics"
    return float(match.group(1))


def held_request(base: str) -> socket.socket:
    """A POST whose body never finishes arriving: the app is serving it until the socket closes."""
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(
        b"POST /v1/embed HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b'Content-Length: 1000\r\n\r\n{"texts": ["a'
    )
    return sock


def wait_for(condition: Callable[[], bool], timeout_s: float = 10) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_requests_in_flight_count_open_requests_and_leave_out_probes_and_scrapes(
    live_server: Callable[..., str],
) -> None:
    base = live_server()
    assert httpx.get(base + "/readyz", timeout=10).status_code == 200
    assert in_flight(base) == 0  # the probe and this scrape are not counted
    held = [held_request(base) for _ in range(3)]
    try:
        assert wait_for(lambda: in_flight(base) == 3), f"in flight: {in_flight(base)}"
        answered = httpx.post(base + "/v1/embed", json={"texts": ["a dog"]}, timeout=30)
        assert answered.status_code == 200
        assert in_flight(base) == 3  # a finished request is no longer counted
    finally:
        for sock in held:
            sock.close()
    assert wait_for(lambda: in_flight(base) == 0), f"in flight after the clients left: {in_flight(base)}"


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"cpu.max": "200000 100000\n"}, 2),  # cgroup v2, a limit of 2 cores
        ({"cpu.max": "150000 100000\n"}, 1),  # 1.5 cores: one thread busy, not two half-starved
        ({"cpu.max": "max 100000\n"}, None),  # no limit
        ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3),  # cgroup v1
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),  # no cgroup files at all
    ],
)
def test_usable_cores_follow_a_cgroup_quota_within_the_affinity(
    tmp_path: Path, files: dict[str, str], expected: int | None
) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    cores = usable_cores()
    assert usable_cores(tmp_path) == (cores if expected is None else min(cores, expected))


def test_thread_defaults_are_the_usable_cores() -> None:
    from clipserve.service.settings import Settings

    settings = Settings()
    assert settings.intra_op_threads == settings.preprocess_workers == usable_cores()
