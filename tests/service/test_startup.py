"""What `clip-serve` and `make serve` say and check before the models load: the set-up in the first
log lines (secrets hidden), the log format, a taken port found before any model loads, and a
missing or mistyped model repository named as such, never filled with the demo model unasked."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLIP_SERVE = Path(sys.executable).parent / "clip-serve"
sys.path.insert(0, str(ROOT / "scripts"))


def clean_env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPSERVE_")}
    return env | {"CLIPSERVE_INTRA_OP_THREADS": "1", "CLIPSERVE_RELOAD_POLL_S": "0"} | settings


def test_hidden_password() -> None:
    from clipserve.service.server.startup import hidden_password

    assert hidden_password("redis://:s3cret@cache:6380/2") == "redis://:***@cache:6380/2"
    assert hidden_password("postgresql://app:pw@db/clip") == "postgresql://app:***@db/clip"
    assert hidden_password("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    # every form libpq reads: key=value (quoted or not) and a URL's query string
    assert (
        hidden_password("host=db user=app password=s3cret dbname=clip")
        == "host=db user=app password=*** dbname=clip"
    )
    assert (
        hidden_password("host=db password = 'se cr\\'et' dbname=clip") == "host=db password = *** dbname=clip"
    )
    assert hidden_password("postgresql://app@db/clip?password=s3cret&sslmode=require") == (
        "postgresql://app@db/clip?password=***&sslmode=require"
    )
    assert hidden_password("postgresql:///clip?host=/run/pg&sslpassword=s3cret") == (
        "postgresql:///clip?host=/run/pg&sslpassword=***"
    )


def test_the_first_lines_say_models_providers_cache_collections_auth_and_url_fetching(
    tiny_repo: Path, tmp_path: Path
) -> None:
    from clipserve.service.server.startup import startup_summary
    from clipserve.service.settings import Settings

    lines = startup_summary(
        Settings(
            models_dir=tiny_repo,
            redis_url="redis://:s3cret@127.0.0.1:6393/4",
            api_keys=["k1", "k2"],
            data_dir=tmp_path,
        )
    )
    text = "\n".join(lines)
    assert lines[0].startswith("models      tiny@1 (newest of 1")
    assert "providers   cpu" in text
    assert "cache       Redis at redis://:***@127.0.0.1:6393/4" in text and "s3cret" not in text
    assert f"collections embedded (SQLite + FAISS in {tmp_path})" in text
    assert "auth        on; /docs, /redoc and the demo page stay open; admin API off" in text
    assert "keys by scope: read 2, write 2" in text
    assert "browsers    Host localhost, 127.0.0.1, [::1]; cross-origin pages allowed: none" in text
    assert "image URLs  off" in text
    quiet = "\n".join(startup_summary(Settings(models_dir=tiny_repo, redis_url="none", host="0.0.0.0")))
    assert "cache       in-process only" in quiet and "auth        off" in quiet
    assert "browsers    Host any;" in quiet
    dsn = Settings(
        collections_backend="pgvector", postgres_dsn="host=db password=s3cret", models_dir=tiny_repo
    )
    assert "collections pgvector at host=db password=***" in startup_summary(dsn)


def test_clip_serve_logs_its_setup_first_as_json_when_asked(tiny_repo: Path, tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = clean_env(
        CLIPSERVE_MODELS_DIR=str(tiny_repo),
        CLIPSERVE_PORT=str(port),
        CLIPSERVE_REDIS_URL="none",
        CLIPSERVE_DATA_DIR=str(tmp_path / "data"),
        CLIPSERVE_LOG_FORMAT="json",
    )
    process = subprocess.Popen([str(CLIP_SERVE)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines: list[dict] = []
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(json.loads(line))
            if lines[-1]["message"].startswith("serving "):
                break
    finally:
        process.terminate()
        process.wait(timeout=30)
    messages = [entry["message"] for entry in lines]
    assert messages[0] == "clip-serve starting"
    assert [m.split()[0] for m in messages[1:8]] == [
        "models",
        "providers",
        "cache",
        "collections",
        "auth",
        "browsers",
        "image",
    ]
    assert messages[-1] == "serving tiny@1 (providers CPUExecutionProvider; text cache local)"


def test_log_format_is_text_on_a_terminal_and_json_otherwise() -> None:
    from clipserve.service.settings import Settings

    assert Settings().resolved_log_format(on_terminal=True) == "text"
    assert Settings().resolved_log_format(on_terminal=False) == "json"
    assert Settings(log_format="json").resolved_log_format(on_terminal=True) == "json"
    assert Settings(log_format="text").resolved_log_format(on_terminal=False) == "text"


def test_clip_serve_names_a_taken_port_in_one_line_without_loading(tiny_repo: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        result = subprocess.run(
            [str(CLIP_SERVE), "--models-dir", str(tiny_repo), "--port", str(port), "--redis-url", "none"],
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        elapsed = time.monotonic() - started
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"clip-serve: error: port {port} on 127.0.0.1 is already in use (is clipserve already running?). "
        f"Stop what uses it, or pick another port: clip-serve --port {port + 1}"
    )
    assert "loaded" not in result.stdout + result.stderr, f"models were loaded first ({elapsed:.1f} s)"


def test_clip_serve_names_a_missing_repository(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(CLIP_SERVE), "--models-dir", str(tmp_path / "modles")],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert f"model repository {tmp_path / 'modles'} does not exist" in result.stderr


@pytest.mark.parametrize("exists", [False, True])
def test_make_serve_names_a_mistyped_models_dir_and_builds_nothing_there(
    tmp_path: Path, exists: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import first_run

    mistyped = tmp_path / "modles"
    if exists:
        mistyped.mkdir()
    monkeypatch.delenv("CLIPSERVE_BUILD_DEMO", raising=False)
    monkeypatch.setenv("CLIPSERVE_MODELS_DIR", str(mistyped))
    options = first_run.load_settings(first_run.FirstRunSettings, [], first_run.PROG)
    service = first_run.validated(first_run.Settings, {})
    assert service.models_dir == mistyped and options.build_demo is False
    with pytest.raises(first_run.FirstRunError) as refused:
        first_run.check_models_dir(service.models_dir, options.build_demo)
    message = str(refused.value)
    expected = "does not exist" if not exists else "no published bundle in"
    assert expected in message and "CLIPSERVE_BUILD_DEMO=1 make serve" in message
    assert not exists or list(mistyped.iterdir()) == []
    # asked for, or the default models/: the demo is to be built
    monkeypatch.setenv("CLIPSERVE_BUILD_DEMO", "1")
    options = first_run.load_settings(first_run.FirstRunSettings, [], first_run.PROG)
    assert first_run.check_models_dir(service.models_dir, options.build_demo) is True


def test_make_serve_keeps_a_repository_that_holds_a_bundle(tiny_repo: Path) -> None:
    import first_run

    assert first_run.check_models_dir(tiny_repo, build_demo=True) is False
    assert first_run.check_models_dir(tiny_repo, build_demo=False) is False


def test_progress_redraws_become_a_few_lines_in_a_file() -> None:
    import first_run

    redraws = b"".join(f"\rtraining {i:3d}%|{'#' * (i // 10)}".encode() for i in range(101))
    source = io.BufferedReader(io.BytesIO(b"building the teacher\n" + redraws + b"\ndone\n"))
    out = io.StringIO()
    first_run.relay_progress(source, out, every_s=3600)
    assert out.getvalue().splitlines() == ["building the teacher", "training 100%|##########", "done"]


def test_clip_serve_help_lists_every_setting_with_its_default_and_variable() -> None:
    from clipserve.service.settings import Settings

    result = subprocess.run([str(CLIP_SERVE), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for name in Settings.model_fields:
        flag = "--" + name.replace("_", "-")
        assert flag in text, flag
        assert f"env CLIPSERVE_{name.upper()}]" in text, name
    assert text.count("[default: ") + text.count("[required;") == len(Settings.model_fields)
    for limit in (
        "--api-keys",
        "--admin-key",
        "--max-body-bytes",
        "--max-images-per-request",
        "--log-format",
    ):
        assert limit in text
