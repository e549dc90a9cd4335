"""docker-compose.yml and deploy/: schema-valid, consistent with the service settings and the proxy.

The file is checked as Compose would check it, without an engine: variables interpolated with their
defaults, then validated against the Compose Specification JSON schema (vendored in
tests/data/compose, see SOURCE.md), then the cross-references Compose resolves at `up` time
(services, volumes, profiles, files), then what the deployment relies on. scripts/container-smoke.sh
runs the stack for real (in CI, after these tests).
"""

from __future__ import annotations

import ast
import copy
import importlib
import inspect
import json
import os
import re
import shlex
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from clipserve.service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
SCHEMA_FILE = ROOT / "tests" / "data" / "compose" / "compose-spec.json"
NGINX_TEMPLATE = ROOT / "deploy" / "nginx.conf.template"
NGINX_RESOLVER = ROOT / "deploy" / "nginx-resolver.envsh"
_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable substitution: ${VAR}, $VAR, ${VAR:-default}, ${VAR-default}, $$."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(4)
        operator, default = match.group(2), match.group(3) or ""
        current = env.get(name)
        missing = current is None if operator in ("-", "?") else not current
        if operator in (":-", "-") and missing:
            return default
        if operator in (":?", "?") and missing:
            raise ValueError(f"required variable {name} is not set: {default}")
        return current or ""

    return _VAR.sub(substitute, value)


# What `make compose-env` writes into .env (generated there; fixed here so the tests can name them)
PASSWORDS = {
    "REDIS_PASSWORD": "redis-secret-0123",
    "POSTGRES_PASSWORD": "superuser-secret-4567",
    "POSTGRES_APP_PASSWORD": "app-secret-89ab",
}


def load_compose(env: dict[str, str] | None = None, passwords: bool = True) -> dict[str, Any]:
    """The file as Compose reads it with `env` (and, unless told, the passwords of .env)."""
    return interpolate(
        yaml.safe_load(COMPOSE_FILE.read_text()), {**(PASSWORDS if passwords else {}), **(env or {})}
    )


def schema_errors(document: dict[str, Any]) -> list[str]:
    schema = json.loads(SCHEMA_FILE.read_text())
    validator = jsonschema.Draft201909Validator(schema)
    return [
        f"{'/'.join(str(p) for p in error.absolute_path) or '<root>'}: {error.message}"
        for error in validator.iter_errors(document)
    ]


def reference_errors(document: dict[str, Any], root: Path = ROOT) -> list[str]:
    """What Compose itself refuses at `up` even when the schema is satisfied."""
    errors: list[str] = []
    services: dict[str, Any] = document["services"]
    declared_volumes = set(document.get("volumes") or {})
    for name, service in services.items():
        depends = service.get("depends_on") or {}
        errors += [f"{name}: depends on unknown service {dep}" for dep in depends if dep not in services]
        if "image" not in service and "build" not in service:
            errors.append(f"{name}: neither image nor build")
        build = service.get("build")
        if isinstance(build, dict):
            dockerfile = root / build.get("context", ".") / build.get("dockerfile", "Dockerfile")
            if not dockerfile.is_file():
                errors.append(f"{name}: Dockerfile {dockerfile} does not exist")
        for mount in service.get("volumes") or []:
            source = mount.split(":")[0]
            if source.startswith((".", "/")):
                if not (root / source).exists():
                    errors.append(f"{name}: bind mount source {source} does not exist")
            elif source not in declared_volumes:
                errors.append(f"{name}: volume {source} is not declared at the top level")
    return errors


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


def test_compose_file_is_valid_against_the_compose_schema(compose: dict[str, Any]) -> None:
    assert schema_errors(compose) == []
    assert reference_errors(compose) == []


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("services", "api", "depends_on", "redis", "condition"), "healthy"),
        (("services", "redis", "healthcheck", "retries"), "ten"),
        (("services", "api", "restart_policy"), "always"),
    ],
    ids=["bad-condition", "bad-type", "unknown-key"],
)
def test_schema_check_rejects_a_broken_compose_file(
    compose: dict[str, Any], path: tuple[str, ...], value: object
) -> None:
    broken = copy.deepcopy(compose)
    target = broken
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    errors = schema_errors(broken)
    assert errors, f"setting {'.'.join(path)} = {value!r} should not validate"
    assert any(path[1] in error for error in errors)


def test_reference_check_rejects_unknown_service_and_undeclared_volume(compose: dict[str, Any]) -> None:
    broken = copy.deepcopy(compose)
    broken["services"]["api"]["depends_on"]["cache"] = {"condition": "service_healthy"}
    broken["services"]["api"]["volumes"].append("weights:/weights")
    errors = reference_errors(broken)
    assert "api: depends on unknown service cache" in errors
    assert "api: volume weights is not declared at the top level" in errors


def test_interpolation_uses_defaults_and_environment() -> None:
    assert load_compose()["services"]["proxy"]["ports"] == ["127.0.0.1:8000:8080"]
    env = {"CLIPSERVE_BIND": "0.0.0.0", "CLIPSERVE_PUBLIC_PORT": "9000", "POSTGRES_APP_PASSWORD": "s3cret"}
    document = load_compose(env)
    assert document["services"]["proxy"]["ports"] == ["0.0.0.0:9000:8080"]
    assert "clipserve:s3cret@postgres" in document["services"]["api"]["environment"]["CLIPSERVE_POSTGRES_DSN"]
    assert interpolate("$${literal} ${MISSING-x} ${EMPTY-y} ${EMPTY:-z}", {"EMPTY": ""}) == "${literal} x  z"
    with pytest.raises(ValueError, match="NEEDED"):
        interpolate("${NEEDED:?set it}", {})


def test_api_replicas_can_scale_behind_the_proxy(compose: dict[str, Any]) -> None:
    api = compose["services"]["api"]
    # A published host port or a fixed container name makes `--scale api=3` fail.
    assert "ports" not in api
    assert "container_name" not in api
    assert api["depends_on"]["redis"] == {"condition": "service_healthy"}
    assert api["depends_on"]["postgres"] == {"condition": "service_healthy"}
    assert "models:/models:ro" in api["volumes"]
    assert compose["services"]["proxy"]["depends_on"] == {"api": {"condition": "service_started"}}


def test_every_api_variable_is_a_valid_service_setting(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    for service in ("api", "api-gpu"):
        environment: dict[str, str | None] = compose["services"][service]["environment"]
        for key in list(Settings.model_fields):
            monkeypatch.delenv(f"CLIPSERVE_{key.upper()}", raising=False)
        for key, value in environment.items():
            assert key.startswith("CLIPSERVE_"), f"{service}: {key} is not a service setting"
            field = key.removeprefix("CLIPSERVE_").lower()
            assert field in Settings.model_fields, (
                f"{service}: {key} matches no field of clipserve.service.settings"
            )
            if value is not None:
                monkeypatch.setenv(key, str(value))
        settings = Settings()
        assert settings.models_dir == Path("/models")
        assert settings.redis_url == f"redis://:{PASSWORDS['REDIS_PASSWORD']}@redis:6379/0"
        assert settings.collections_backend == "pgvector"
        assert settings.api_keys == []
        assert settings.allowed_hosts == ["localhost", "127.0.0.1", "[::1]"]  # the proxy's loopback port
    assert settings.providers == ["tensorrt", "cuda", "cpu"]


def test_redis_has_a_memory_policy_and_persistence(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    args = redis["command"]
    options = dict(zip(args[1::2], args[2::2], strict=True))
    assert options["--maxmemory"] == "1gb"
    # Only keys with a TTL (text vectors) may be evicted: label sets have none and must stay.
    assert options["--maxmemory-policy"] == "volatile-lru"
    assert options["--appendonly"] == "yes"
    assert any(mount.endswith(":/data") for mount in redis["volumes"])


def test_redis_needs_the_password_of_env(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    args = redis["command"]
    assert args[args.index("--requirepass") + 1] == PASSWORDS["REDIS_PASSWORD"]
    api_env = compose["services"]["api"]["environment"]
    assert urlsplit(api_env["CLIPSERVE_REDIS_URL"]).password == PASSWORDS["REDIS_PASSWORD"]
    assert urlsplit(api_env["CLIPSERVE_REDIS_URL"]).hostname == "redis"
    # the healthcheck authenticates through redis-cli's own variable, and checks the answer
    assert redis["environment"]["REDISCLI_AUTH"] == PASSWORDS["REDIS_PASSWORD"]
    assert redis["healthcheck"]["test"] == ["CMD-SHELL", "redis-cli ping | grep -q PONG"]
    # the stale claim that label sets live in Redis is gone: they are PostgreSQL's
    assert "live only here" not in COMPOSE_FILE.read_text()


def test_compose_without_the_passwords_says_to_run_make_compose_env() -> None:
    with pytest.raises(
        ValueError,
        match=r"REDIS_PASSWORD is not set: run make compose-env \(it writes the passwords into \.env\)",
    ):
        load_compose(passwords=False)


def test_postgres_is_pgvector_and_the_api_connects_as_its_own_role(compose: dict[str, Any]) -> None:
    postgres = compose["services"]["postgres"]
    assert postgres["image"].startswith("pgvector/pgvector:")
    dsn = urlsplit(compose["services"]["api"]["environment"]["CLIPSERVE_POSTGRES_DSN"])
    env = postgres["environment"]
    assert (dsn.hostname, dsn.port, dsn.path) == ("postgres", 5432, f"/{env['POSTGRES_DB']}")
    # not the superuser of the image: the role deploy/postgres-init.sql makes, with its own password
    assert dsn.username == "clipserve" != env["POSTGRES_USER"]
    assert dsn.password == PASSWORDS["POSTGRES_APP_PASSWORD"] == env["POSTGRES_APP_PASSWORD"]
    assert env["POSTGRES_PASSWORD"] == PASSWORDS["POSTGRES_PASSWORD"]
    init = next(m for m in postgres["volumes"] if "docker-entrypoint-initdb.d" in m)
    script = (ROOT / init.split(":")[0]).read_text()
    assert "CREATE EXTENSION IF NOT EXISTS vector" in script
    assert re.search(r"CREATE ROLE clipserve LOGIN .*\n\s+NOSUPERUSER", script)


HARDENED = ("redis", "postgres", "api", "proxy", "api-gpu")


def test_every_long_running_container_is_hardened(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in HARDENED:
        service = services[name]
        assert service["read_only"] is True, name
        assert service["cap_drop"] == ["ALL"], name
        assert service["security_opt"] == ["no-new-privileges:true"], name
        assert service.get("cap_add", []) == (["CHOWN", "SETGID", "SETUID"] if name == "proxy" else []), name
    # where each program writes, a tmpfs
    tmpfs = {name: [entry.split(":")[0] for entry in services[name]["tmpfs"]] for name in HARDENED}
    assert "/tmp" in tmpfs["postgres"]
    # PostgreSQL's socket folder is a volume: it starts owned by the image's postgres user
    assert "postgres-socket:/run/postgresql" in services["postgres"]["volumes"]
    assert {"/etc/nginx/conf.d", "/var/cache/nginx", "/run"} <= set(tmpfs["proxy"])
    assert "/tmp" in tmpfs["api"] and tmpfs["api"] == tmpfs["api-gpu"]
    # Redis and PostgreSQL start as their images' own users: no capability needed to switch
    assert services["redis"]["user"] == "redis" and services["postgres"]["user"] == "postgres"
    trainer = services["trainer"]
    assert trainer["cap_drop"] == ["ALL"] and trainer["security_opt"] == ["no-new-privileges:true"]


def test_make_compose_env_generates_missing_passwords_and_keeps_the_rest(tmp_path: Path) -> None:
    env_file = tmp_path / "compose.env"
    env_file.write_text("CLIPSERVE_API_KEYS=k1\nPOSTGRES_PASSWORD=mine")  # no newline at the end
    run = {**os.environ, "COMPOSE_ENV_FILE": str(env_file)}
    script = ROOT / "scripts" / "compose-env.sh"
    first = subprocess.run(["bash", str(script)], env=run, capture_output=True, text=True, timeout=30)
    assert first.returncode == 0, first.stderr
    values = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
    assert values["CLIPSERVE_API_KEYS"] == "k1" and values["POSTGRES_PASSWORD"] == "mine"
    for name in ("REDIS_PASSWORD", "POSTGRES_APP_PASSWORD"):
        assert re.fullmatch(r"[0-9a-f]{48}", values[name]), name
    assert values["REDIS_PASSWORD"] != values["POSTGRES_APP_PASSWORD"]
    assert oct(env_file.stat().st_mode & 0o777) == "0o600"
    again = subprocess.run(["bash", str(script)], env=run, capture_output=True, text=True, timeout=30)
    assert again.returncode == 0 and again.stdout == ""
    assert dict(line.split("=", 1) for line in env_file.read_text().splitlines()) == values
    # what it wrote is what compose needs
    document = load_compose(values, passwords=False)
    assert schema_errors(document) == []
    for ignore in (ROOT / ".gitignore", ROOT / ".dockerignore"):
        assert ".env" in ignore.read_text().split(), f"{ignore.name} lets the passwords through"
    assert "scripts/compose-env.sh" in (ROOT / "scripts" / "container-smoke.sh").read_text()


def test_postgres_init_makes_a_role_that_serves_without_being_superuser(postgres_server_uri: str) -> None:
    """deploy/postgres-init.sql run as the image runs it (psql, as the superuser, in a new database),
    then the stores used through the role it made: collections and label sets are created and
    written; the role can do nothing a superuser could."""
    import uuid

    import numpy as np
    import pgserver
    import psycopg
    from psycopg.conninfo import make_conninfo

    from clipserve.service.stores.collection_store import IndexParams, ModelBinding
    from clipserve.service.stores.labelset_store import LabelSet, open_labelsets
    from clipserve.service.stores.pgvector import PgVectorStore
    from tests.fixtures.retrieval import POSTGRES_DSN_ENV

    if os.environ.get(POSTGRES_DSN_ENV):
        pytest.skip("makes a role of the whole cluster: runs on the tests' own PostgreSQL only")
    psql = Path(pgserver.__file__).parent / "pginstall" / "bin" / "psql"
    database = f"init_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(postgres_server_uri, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {database}")
    superuser = make_conninfo(postgres_server_uri, dbname=database)
    try:
        done = subprocess.run(
            [
                str(psql),
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                superuser,
                "-f",
                str(ROOT / "deploy" / "postgres-init.sql"),
            ],
            env={**os.environ, "POSTGRES_APP_PASSWORD": "app-secret"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        app = make_conninfo(superuser, user="clipserve", password="app-secret")
        with psycopg.connect(app, autocommit=True) as conn:
            assert conn.execute(
                "SELECT rolsuper, rolcreaterole, rolcreatedb FROM pg_roles WHERE rolname = current_user"
            ).fetchone() == (False, False, False)
            for forbidden in (
                "CREATE ROLE intruder",
                "CREATE DATABASE other",
                "ALTER SYSTEM SET work_mem = '1GB'",
            ):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(forbidden)
        store = PgVectorStore(app)
        try:
            binding = ModelBinding("tiny", 1, "0" * 64, 4)
            store.create_collection("c", binding, IndexParams())
            vectors = np.eye(4, dtype=np.float32)[:2]
            assert store.upsert("c", ["a", "b"], vectors, content_hash="0" * 64) == 2
            assert store.count("c") == 2
            store.drop_collection("c")
        finally:
            store.close()
        labelsets = open_labelsets("pgvector", dsn=app)
        try:
            labelsets.put(LabelSet("s", "tiny", ["a cat"], ("{}",), "d" * 64))
            assert labelsets.names() == ["s"]
        finally:
            labelsets.close()
        # without the password the script refuses to make a role at all
        refused = subprocess.run(
            [
                str(psql),
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                superuser,
                "-f",
                str(ROOT / "deploy" / "postgres-init.sql"),
            ],
            env={k: v for k, v in os.environ.items() if k != "POSTGRES_APP_PASSWORD"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert (
            refused.returncode != 0
            and "POSTGRES_APP_PASSWORD is not set: run make compose-env" in refused.stderr
        )
    finally:
        with psycopg.connect(postgres_server_uri, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
            admin.execute("DROP ROLE IF EXISTS clipserve")


def test_trainer_and_gpu_profiles(compose: dict[str, Any]) -> None:
    services = compose["services"]
    trainer, gpu = services["trainer"], services["api-gpu"]
    assert trainer["profiles"] == ["trainer"]
    assert "models:/models" in trainer["volumes"]
    program, flag, code, *args = trainer["command"]
    assert (program, flag, args) == ("python", "-c", ["/models", "shapes-demo"])
    # The job runs training's demo recipe: it must exist and take (repository, name).
    tree = ast.parse(code)
    imported = {
        alias.name: importlib.import_module(node.module)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module
        for alias in node.names
    }
    (call,) = [node for node in ast.walk(tree) if isinstance(node, ast.Call)]
    function = getattr(imported[call.func.id], call.func.id)
    inspect.signature(function).bind(*args)
    assert gpu["profiles"] == ["gpu"]
    assert gpu["build"]["dockerfile"] == "docker/Dockerfile.serve-gpu"
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "api" in gpu["networks"]["default"]["aliases"]
    # Services without a profile are what a plain `docker compose up` starts.
    assert {name for name, s in services.items() if "profiles" not in s} == {
        "redis",
        "postgres",
        "api",
        "proxy",
    }


def test_gpu_replicas_run_as_the_cpu_replicas_do(compose: dict[str, Any]) -> None:
    """api-gpu: the same stores, settings and read-only models as api; the engine cache in a named
    volume; the image's own HEALTHCHECK (the same /readyz probe), overridden by neither."""
    services = compose["services"]
    api, gpu = services["api"], services["api-gpu"]
    assert "models:/models:ro" in api["volumes"] and "models:/models:ro" in gpu["volumes"]
    assert not [m for m in gpu["volumes"] if m.startswith("models:") and not m.endswith(":ro")]
    (data,) = [m for m in gpu["volumes"] if m.split(":")[1] == gpu["environment"]["CLIPSERVE_DATA_DIR"]]
    assert data.split(":")[0] in compose["volumes"] and not data.endswith(":ro")
    assert "healthcheck" not in api and "healthcheck" not in gpu
    assert gpu["depends_on"] == api["depends_on"]
    shared = {k: v for k, v in api["environment"].items() if k != "CLIPSERVE_INTRA_OP_THREADS"}
    assert {k: gpu["environment"][k] for k in shared} == shared
    assert gpu["expose"] == api["expose"] and gpu["stop_grace_period"] == api["stop_grace_period"]
    for key in ("read_only", "cap_drop", "security_opt", "tmpfs"):
        assert gpu[key] == api[key], key
    # The build argument picks one of the GPU sets; either name is an extra of pyproject.toml.
    assert gpu["build"]["args"] == {"GPU_SET": "serve-gpu"}
    cuda_only = load_compose({"CLIPSERVE_GPU_SET": "serve-gpu-cuda", "CLIPSERVE_GPU_PROVIDERS": "cuda,cpu"})
    assert cuda_only["services"]["api-gpu"]["build"]["args"] == {"GPU_SET": "serve-gpu-cuda"}
    assert cuda_only["services"]["api-gpu"]["environment"]["CLIPSERVE_PROVIDERS"] == "cuda,cpu"
    assert schema_errors(cuda_only) == []


def test_docker_compose_reads_the_gpu_profile(tmp_path: Path) -> None:
    """`docker-compose --profile gpu config`, the real parser, where it is installed (no engine needed)."""
    import shutil

    compose_bin = shutil.which("docker-compose")
    if compose_bin is None:
        pytest.skip("docker-compose is not installed here (scripts/container-gpu-check.sh runs this in CI)")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), **PASSWORDS}
    done = subprocess.run(
        [compose_bin, "-f", str(COMPOSE_FILE), "--profile", "gpu", "config"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    gpu = yaml.safe_load(done.stdout)["services"]["api-gpu"]
    mounts = {}
    for volume in gpu["volumes"]:
        if isinstance(volume, str):
            source, target, *mode = volume.split(":")
            mounts[target] = (source, "ro" in mode)
        else:
            mounts[volume["target"]] = (volume.get("source"), bool(volume.get("read_only")))
    assert mounts == {"/models": ("models", True), "/data": ("gpu-data", False)}
    assert gpu["environment"]["CLIPSERVE_PROVIDERS"] == "tensorrt,cuda,cpu"
    assert gpu["build"]["args"] == {"GPU_SET": "serve-gpu"}


def nginx_directives(text: str) -> list[list[str]]:
    """Each directive's words; a template's `${VAR}` stays one word (its braces open no block)."""
    cleaned = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    protected = re.sub(r"\$\{(\w+)\}", r"$<\1>", cleaned)
    statements = re.split(r"[;{}]", protected)
    return [
        [re.sub(r"\$<(\w+)>", r"${\1}", word) for word in shlex.split(statement)]
        for statement in statements
        if statement.strip()
    ]


def test_proxy_targets_the_api_service_and_accepts_the_largest_body(compose: dict[str, Any]) -> None:
    directives = nginx_directives(NGINX_TEMPLATE.read_text())
    # `api` sits in a variable, so nginx resolves it per request: no upstream block (addresses fixed
    # at start) and no `resolve` parameter (nginx >= 1.27.3 only).
    assert not [d for d in directives if d[0] == "upstream" or "resolve" in d[1:]]
    variables = {d[1]: d[2] for d in directives if d[0] == "set"}
    (proxy_pass,) = [d[1] for d in directives if d[0] == "proxy_pass"]
    target = urlsplit(variables[proxy_pass])
    assert target.hostname == "api"
    assert str(target.port) in compose["services"]["api"]["expose"]
    resolver = next(d for d in directives if d[0] == "resolver")
    assert resolver[1] == "${NGINX_CONTAINER_RESOLVER}" and "valid=5s" in resolver
    listen = next(d[1] for d in directives if d[0] == "listen")
    assert compose["services"]["proxy"]["ports"][0].endswith(f":{listen}")
    body_limit = next(d[1] for d in directives if d[0] == "client_max_body_size")
    assert int(body_limit.removesuffix("m")) * 1024 * 1024 >= Settings().max_body_bytes


def test_proxy_mounts_what_the_nginx_entry_point_renders(compose: dict[str, Any]) -> None:
    """The nginx image sources the executable /docker-entrypoint.d/*.envsh in name order, then
    renders /etc/nginx/templates/*.template into /etc/nginx/conf.d/ (its 20-envsubst-on-templates.sh)."""
    mounts = {
        (ROOT / source).resolve(): target
        for source, target, *_ in (m.split(":") for m in compose["services"]["proxy"]["volumes"])
    }
    assert mounts[NGINX_TEMPLATE] == "/etc/nginx/templates/default.conf.template"
    script = PurePosixPath(mounts[NGINX_RESOLVER])
    assert script.parent == PurePosixPath("/docker-entrypoint.d") and script.suffix == ".envsh"
    assert script.name < "20-envsubst-on-templates.sh", "the variable must be set before the templates render"
    assert os.access(NGINX_RESOLVER, os.X_OK), "the entry point ignores scripts that are not executable"


@pytest.mark.parametrize(
    ("resolv_conf", "resolver"),
    [
        ("nameserver 127.0.0.11\noptions ndots:0\n", "127.0.0.11"),  # Docker's embedded DNS
        ("search dns.podman\nnameserver 10.89.0.1\nnameserver 10.255.255.53\n", "10.89.0.1"),  # podman
        ("# generated\nnameserver fd00::1\nnameserver 10.0.0.1\n", "[fd00::1]"),
        ("search example.org\n", "127.0.0.11"),
    ],
    ids=["docker", "podman", "ipv6", "none"],
)
def test_resolver_script_takes_the_first_nameserver(tmp_path: Path, resolv_conf: str, resolver: str) -> None:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(resolv_conf)
    script = NGINX_RESOLVER.read_text().replace("/etc/resolv.conf", str(resolv))
    assert str(resolv) in script
    done = subprocess.run(
        ["sh", "-c", f'set -eu\n{script}\nprintf %s "$NGINX_CONTAINER_RESOLVER"'],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == resolver
