"""Settings, runtimes, back-pressure through HTTP, JSON logs, and the `clip-serve` command."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from clipserve.contract.bundle import BundleError
from clipserve.service.runtime import RuntimeConfigError, RuntimeOptions, open_runtime
from clipserve.service.settings import Settings
from tests.fixtures.service import b64, free_port, image_bytes


def test_every_setting_is_an_env_var(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CLIPSERVE_MODELS_DIR", str(tmp_path))
    monkeypatch.setenv("CLIPSERVE_MODELS", "tiny,other@3")
    monkeypatch.setenv("CLIPSERVE_API_KEYS", '["a", "b"]')
    monkeypatch.setenv("CLIPSERVE_PROVIDERS", "cuda,cpu")
    monkeypatch.setenv("CLIPSERVE_MAX_BATCH_SIZE_IMAGE", "16")
    monkeypatch.setenv("CLIPSERVE_URL_FETCH_ENABLED", "true")
    monkeypatch.setenv("CLIPSERVE_COLLECTIONS_BACKEND", "pgvector")
    settings = Settings()
    assert settings.models_dir == tmp_path and settings.models == ["tiny", "other@3"]
    assert settings.api_keys == ["a", "b"] and settings.providers == ["cuda", "cpu"]
    assert settings.max_batch_size_image == 16 and settings.url_fetch_enabled
    assert settings.collections_backend == "pgvector" and settings.data_dir == Path("data")
    monkeypatch.setenv("CLIPSERVE_PROVIDERS", "gpu")
    with pytest.raises(ValueError, match="providers"):
        Settings()


def test_a_missing_gpu_provider_fails_loudly(tiny_bundle) -> None:
    with pytest.raises(RuntimeConfigError, match=r"CUDAExecutionProvider.*not active.*silently"):
        open_runtime(tiny_bundle.file_path("image"), RuntimeOptions(providers=("cuda", "cpu")))


def test_app_start_fails_when_a_requested_provider_is_missing(make_client) -> None:
    with pytest.raises(RuntimeConfigError, match="CUDAExecutionProvider"):
        make_client(providers=["cuda"])


def test_tensorrt_engine_without_tensorrt_is_a_clear_error(tmp_path: Path) -> None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("tensorrt is installed; engines are covered on the GPU")
    plan = tmp_path / "image.plan"
    plan.write_bytes(b"engine")
    with pytest.raises(RuntimeConfigError, match="tensorrt"):
        open_runtime(plan, RuntimeOptions(providers=("cuda",)))


@pytest.mark.gpu
def test_cuda_provider_serves_the_same_vectors(tiny_bundle) -> None:
    import numpy as np

    pixels = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    cpu = open_runtime(tiny_bundle.file_path("image"), RuntimeOptions(providers=("cpu",))).run(pixels)
    gpu_runtime = open_runtime(tiny_bundle.file_path("image"), RuntimeOptions(providers=("cuda",)))
    assert gpu_runtime.active_providers[0] == "CUDAExecutionProvider"
    np.testing.assert_allclose(gpu_runtime.run(pixels), cpu, atol=1e-3)


def test_full_queue_gives_429_with_retry_after(make_client) -> None:
    client = make_client(max_queue=2)
    response = client.post("/v1/embed", json={"images": [b64(image_bytes(seed=i)) for i in range(3)]})
    assert response.status_code == 429 and int(response.headers["retry-after"]) >= 1
    assert "queue" in response.json()["error"]["message"]
    assert client.post("/v1/embed", json={"images": [b64(image_bytes())]}).status_code == 200


def test_request_timeout_gives_503(make_client) -> None:
    client = make_client(request_timeout_s=0.3)
    model = client.app.state.registry.resolve(None)
    gate = threading.Event()
    model.text_batcher.executor.submit(gate.wait, 30)
    try:
        response = client.post("/v1/embed", json={"texts": ["stuck behind a busy model"]})
    finally:
        gate.set()
    assert (
        response.status_code == 503 and "did not answer within 0.3 s" in response.json()["error"]["message"]
    )


def test_json_logs_carry_the_request_id(capsys: pytest.CaptureFixture) -> None:
    from clipserve.service.server.logs import configure_logging, request_id_var

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        configure_logging("INFO", "json")
        token = request_id_var.set("req-42")
        logging.getLogger("clipserve.test").info("hello %s", "world")
        request_id_var.reset(token)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert line["message"] == "hello world" and line["request_id"] == "req-42" and line["level"] == "info"


def test_clip_serve_command_serves_an_exported_bundle(tiny_repo: Path, service_redis_url: str) -> None:
    port = free_port()
    env = {
        **os.environ,
        "CLIPSERVE_REDIS_URL": service_redis_url,
        "CLIPSERVE_INTRA_OP_THREADS": "1",
        "CLIPSERVE_PREPROCESS_WORKERS": "1",
        "CLIPSERVE_RELOAD_POLL_S": "0",
    }
    command = [
        sys.executable,
        "-m",
        "clipserve.service.server.cli",
        "--models-dir",
        str(tiny_repo),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    process = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.2)
        response = httpx.post(
            f"http://127.0.0.1:{port}/v1/embed",
            json={"texts": ["hello"]},
            headers={"X-Request-ID": "cli-test"},
        )
        assert response.status_code == 200 and response.json()["dim"] == 32
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=30)
    logs = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert any("serving tiny@1" in entry["message"] for entry in logs)
    access = [e for e in logs if e["logger"] == "clipserve.access" and e["request_id"] == "cli-test"]
    assert len(access) == 1 and access[0]["message"].startswith("POST /v1/embed 200")


def test_clip_serve_refuses_an_empty_repository(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "clipserve.service.server.cli", "--models-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 1 and "no models in" in result.stderr


def test_default_model_among_several(make_client, tiny_repo: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "models"
    shutil.copytree(tiny_repo, root)
    shutil.copytree(root / "tiny" / "1", root / "second" / "1")
    manifest = root / "second" / "1" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"name": "tiny"', '"name": "second"'))
    client = make_client(models_dir=root, default_model="second")
    assert client.post("/v1/embed", json={"texts": ["a"]}).json()["model"] == "second"
    assert client.post("/v1/embed", json={"model": "tiny", "texts": ["a"]}).json()["model"] == "tiny"
    defaults = {m["name"]: m["default"] for m in client.get("/v1/models").json()["data"]}
    assert defaults == {"second": True, "tiny": False}
    with pytest.raises(BundleError, match="default model 'absent'"):
        make_client(models_dir=root, default_model="absent")


@pytest.mark.gpu
def test_tensorrt_engines_serve_close_to_onnx(tiny_model, tmp_path: Path, make_client) -> None:
    pytest.importorskip("tensorrt")
    import numpy as np

    from clipserve.contract.bundle import ModelSource
    from clipserve.export.exporter import export_bundle

    export_bundle(
        tiny_model,
        tmp_path / "models",
        "tiny",
        source=ModelSource(architecture="tiny-clip"),
        tensorrt=True,
        progress=False,
        timing_cache_dir=tmp_path / "timing-cache",
    )
    onnx_client = make_client(models_dir=tmp_path / "models", providers=["cuda"])
    engine_client = make_client(models_dir=tmp_path / "models", providers=["cuda"], engine="tensorrt")
    body = {"texts": ["a photo of a cat"], "images": [b64(image_bytes(seed=3))]}
    reference, engine = (
        onnx_client.post("/v1/embed", json=body).json(),
        engine_client.post("/v1/embed", json=body).json(),
    )
    for kind in ("text_embeddings", "image_embeddings"):
        a, b = np.array(reference[kind]), np.array(engine[kind])
        assert float((a * b).sum()) > 0.999


def test_clip_serve_redis_url_none_means_the_in_process_cache(tiny_repo: Path) -> None:
    from clipserve.service.server.cli import settings_from

    assert settings_from(["--models-dir", str(tiny_repo), "--redis-url", "none"]).redis_url is None
    assert settings_from(["--models-dir", str(tiny_repo), "--redis-url", ""]).redis_url is None
    given = settings_from(["--redis-url", "redis://127.0.0.1:6379/3"])
    assert given.redis_url == "redis://127.0.0.1:6379/3"


def test_free_memory_goes_back_once_per_pause_in_the_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """The idle check runs every tick; memory goes back after work was seen and the service is idle
    again, once per pause, never while work is in hand."""
    import asyncio

    from clipserve.service.inference import loading

    states = iter([True, False, False, True, True, True, False, True, True])
    seen: list[str] = []
    monkeypatch.setattr(loading, "release_free_memory", lambda: seen.append("returned"))

    def idle() -> bool:
        state = next(states, None)
        if state is None:
            raise asyncio.CancelledError
        seen.append("idle" if state else "busy")
        return state

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(loading.return_memory_when_idle(idle, every_s=0))
    assert seen == [
        "idle",  # nothing since start: the loading regime already handed memory back
        "busy",
        "busy",
        "idle",
        "returned",
        "idle",
        "idle",
        "busy",
        "idle",
        "returned",
        "idle",
    ]


def test_a_served_model_is_idle_between_requests(client) -> None:
    registry = client.app.state.registry
    assert registry.idle
    assert client.post("/v1/embed", json={"texts": ["idle again after"]}).status_code == 200
    assert registry.idle
