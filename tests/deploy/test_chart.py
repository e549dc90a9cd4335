"""The Helm chart (deploy/helm/clipserve) over its rendered YAML: `helm template` of the default
values and of each ci/*-values.yaml, every object strictly valid for Kubernetes 1.29 and 1.34 (an
unknown field fails), and what a platform team checks before accepting a chart: probes, security
contexts, a PodDisruptionBudget beside every autoscaler, graceful shutdown, where keys, stores and
models come from, and the refusals (replicas or autoscaling with the embedded collections backend).

helm and the schemas come from `make chart-tools` (scripts/chart-tools.sh, which `make test` runs);
where helm cannot be installed these tests skip, saying so. The pods themselves run under podman in
`make chart-check` (scripts/chart_podman.py); its conversion of the rendered objects is tested here.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import chart_podman  # noqa: E402
import chart_validate  # noqa: E402
from chart_validate import CHART, KUBERNETES_VERSIONS, ChartError, Rendered, Validator  # noqa: E402

_missing = chart_validate.helm_available()
pytestmark = pytest.mark.skipif(_missing is not None, reason=f"no helm: {_missing}")

CASES = {
    "default": None,
    **{p.name.removesuffix("-values.yaml"): p for p in sorted((CHART / "ci").glob("*-values.yaml"))},
}
REQUEST_TIMEOUT_S = 30.0  # service/settings.py's request_timeout_s default


@pytest.fixture(scope="module")
def rendered() -> dict[str, Rendered]:
    return {case: chart_validate.render([path] if path else []) for case, path in CASES.items()}


@pytest.fixture(scope="module")
def validators() -> list[Validator]:
    return [Validator(version) for version in KUBERNETES_VERSIONS]


def render(*set_values: str, values: str | None = None) -> Rendered:
    return chart_validate.render([CASES[values]] if values else [], set_values)


def pod_specs(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every pod template the objects hold, by `Kind/name`."""
    specs = {}
    for obj in objects:
        spec = obj.get("spec", {})
        if obj["kind"] in ("Deployment", "StatefulSet"):
            specs[f"{obj['kind']}/{obj['metadata']['name']}"] = spec["template"]["spec"]
        elif obj["kind"] == "CronJob":
            specs[f"CronJob/{obj['metadata']['name']}"] = spec["jobTemplate"]["spec"]["template"]["spec"]
    return specs


def api_container(result: Rendered) -> dict[str, Any]:
    (container,) = [
        c for c in result.one("Deployment")["spec"]["template"]["spec"]["containers"] if c["name"] == "api"
    ]
    return container


def config(result: Rendered) -> dict[str, str]:
    return result.one("ConfigMap", "clipserve")["data"]


def refusal(*set_values: str) -> str:
    with pytest.raises(ChartError) as caught:
        render(*set_values)
    return chart_validate.helm_error_line(str(caught.value))


# ---- validity -------------------------------------------------------------------------------------


def test_the_chart_ships_the_values_cases_of_the_issue() -> None:
    assert {"gpu", "keda", "external-stores", "model-image"} <= set(CASES)


@pytest.mark.parametrize("case", list(CASES))
def test_every_object_is_strictly_valid_kubernetes(
    case: str, rendered: dict[str, Rendered], validators: list[Validator]
) -> None:
    objects = rendered[case].objects
    assert objects, f"{case}: nothing rendered"
    problems = [f"[{v.version}] {line}" for v in validators for line in v.check(objects)]
    assert problems == []


def test_validation_refuses_an_unknown_field_a_wrong_type_and_an_unknown_kind(
    rendered: dict[str, Rendered], validators: list[Validator]
) -> None:
    deployment = yaml.safe_load(yaml.safe_dump(rendered["default"].one("Deployment")))
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    deployment["spec"]["revisionHistoryLimit"] = "five"
    for validator in validators:
        errors = "\n".join(validator.errors(deployment))
        assert "'imagePullPolcy' was unexpected" in errors and "revisionHistoryLimit" in errors
    scaled = yaml.safe_load(yaml.safe_dump(rendered["keda"].one("ScaledObject")))
    scaled["spec"]["triggers"][0]["metadata"]["threshold"] = 6  # KEDA's trigger metadata is all strings
    scaled["spec"]["minReplicas"] = 1  # it is minReplicaCount
    errors = "\n".join(validators[-1].errors(scaled))
    assert "threshold" in errors and "'minReplicas' was unexpected" in errors
    assert validators[-1].errors(
        {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    )


def test_helm_lint_passes_strictly_for_every_case() -> None:
    for path in CASES.values():
        result = chart_validate.helm("lint", "--strict", str(CHART), *(["-f", str(path)] if path else []))
        assert result.returncode == 0, result.stdout + result.stderr


def test_the_values_schema_refuses_wrong_types_and_unknown_keys() -> None:
    for pair, named in [
        ("replicaCount=two", "replicaCount"),
        ("autoscalling.enabled=false", "autoscalling"),
        ("autoscaling.mode=memory", "mode"),
        ("models.source=s3", "source"),
        ("auth.apiKeys[0].key=short", "key"),
    ]:
        with pytest.raises(ChartError) as caught:
            render(pair)
        assert named in str(caught.value), (pair, str(caught.value))


# ---- the API pods -----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_api_probes_startup_readiness_liveness(case: str, rendered: dict[str, Rendered]) -> None:
    api = api_container(rendered[case])
    assert api["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert api["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert api["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    startup = api["startupProbe"]
    # sized for model loading: minutes, not the seconds a liveness probe allows
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    assert api["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert config(rendered[case])["CLIPSERVE_PORT"] == "8000"
    assert config(rendered[case])["CLIPSERVE_HOST"] == "0.0.0.0"


@pytest.mark.parametrize("case", list(CASES))
def test_every_pod_runs_non_root_read_only_without_capabilities_or_a_token(
    case: str, rendered: dict[str, Rendered]
) -> None:
    specs = pod_specs(rendered[case].objects)
    assert specs
    for name, spec in specs.items():
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] > 0, name
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert spec["automountServiceAccountToken"] is False, name
        mounts_of = {v["name"]: v for v in spec["volumes"]}
        for container in spec.get("initContainers", []) + spec["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, (name, container["name"])
            assert context["allowPrivilegeEscalation"] is False, (name, container["name"])
            assert context["capabilities"]["drop"] == ["ALL"], (name, container["name"])
            assert "resources" in container, (name, container["name"])
        for container in spec["containers"]:
            # a writable /tmp where the root is read-only (uvicorn's workers, torch, pip caches)
            tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert tmp and "emptyDir" in mounts_of[tmp[0]["name"]], (name, container["name"])


def test_api_pods_spread_over_nodes_and_shut_down_gracefully(rendered: dict[str, Rendered]) -> None:
    spec = rendered["default"].one("Deployment")["spec"]["template"]["spec"]
    keys = {c["topologyKey"] for c in spec["topologySpreadConstraints"]}
    assert keys == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    api = api_container(rendered["default"])
    pre_stop = int(api["lifecycle"]["preStop"]["exec"]["command"][1])
    # the endpoints drop the pod, then in-flight requests (bounded by request_timeout_s) finish
    assert spec["terminationGracePeriodSeconds"] > pre_stop + REQUEST_TIMEOUT_S
    strategy = rendered["default"].one("Deployment")["spec"]["strategy"]
    assert strategy["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}


@pytest.mark.parametrize("case", list(CASES))
def test_a_disruption_budget_stands_beside_every_autoscaler(case: str, rendered: dict[str, Rendered]) -> None:
    result = rendered[case]
    scalers = result.of_kind("HorizontalPodAutoscaler") + result.of_kind("ScaledObject")
    if not scalers:
        assert "replicas" in result.one("Deployment")["spec"]
        return
    (scaler,) = scalers
    (budget,) = result.of_kind("PodDisruptionBudget")
    deployment = result.one("Deployment")
    assert budget["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    lowest = scaler["spec"].get("minReplicas", scaler["spec"].get("minReplicaCount"))
    # at the autoscaler's minimum a drain may still evict a pod
    if "minAvailable" in budget["spec"]:
        assert budget["spec"]["minAvailable"] < lowest, "the budget would block every drain at the minimum"
    else:
        assert budget["spec"]["maxUnavailable"] >= 1
    assert (
        render("podDisruptionBudget.minAvailable=1").one("PodDisruptionBudget")["spec"].get("maxUnavailable")
        is None
    )
    assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"


def test_cpu_autoscaling_by_default_in_flight_requests_through_keda_or_the_adapter(
    rendered: dict[str, Rendered],
) -> None:
    hpa = rendered["default"].one("HorizontalPodAutoscaler")
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert hpa["spec"]["scaleTargetRef"]["name"] == rendered["default"].one("Deployment")["metadata"]["name"]
    keda = rendered["keda"]
    assert keda.of_kind("HorizontalPodAutoscaler") == []  # KEDA makes its own
    trigger = keda.one("ScaledObject")["spec"]["triggers"][0]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    assert "clipserve_requests_in_flight" in trigger["metadata"]["query"]
    assert trigger["metadata"]["threshold"] == "4"
    adapter = rendered["external-stores"].one("HorizontalPodAutoscaler")["spec"]["metrics"][0]
    assert adapter["type"] == "Pods" and adapter["pods"]["metric"]["name"] == "clipserve_requests_in_flight"


def test_metrics_are_scrapable_with_a_key_when_keys_are_on(rendered: dict[str, Rendered]) -> None:
    annotations = rendered["default"].one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == "/metrics" and annotations["prometheus.io/port"] == "8000"
    endpoint = rendered["keda"].one("ServiceMonitor")["spec"]["endpoints"][0]
    assert endpoint["port"] == "http" and endpoint["path"] == "/metrics"
    assert endpoint["authorization"] == {
        "type": "Bearer",
        "credentials": {"name": "clipserve-metrics-key", "key": "metrics-key"},
    }


# ---- keys, stores, models ----------------------------------------------------------------------------


def test_api_keys_are_a_mounted_file_that_rotates_without_a_restart(rendered: dict[str, Rendered]) -> None:
    result = rendered["external-stores"]
    secret = result.one("Secret", "-auth")
    assert secret["stringData"]["api-keys"].split("\n")[0] == "replace-me-with-a-long-random-key read,write"
    spec = result.one("Deployment")["spec"]["template"]
    volume = next(v for v in spec["spec"]["volumes"] if v["name"] == "api-keys")
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    mount = next(m for m in api_container(result)["volumeMounts"] if m["name"] == "api-keys")
    assert "subPath" not in mount, "a subPath mount is never updated by the kubelet"
    assert config(result)["CLIPSERVE_API_KEYS_FILE"] == f"{mount['mountPath']}/api-keys"
    assert not any("auth" in key or "secret" in key for key in spec["metadata"]["annotations"])
    # a Secret of the user's own: mounted by name, the chart makes none
    existing = rendered["keda"]
    assert existing.of_kind("Secret") == [] or all(
        not s["metadata"]["name"].endswith("-auth") for s in existing.of_kind("Secret")
    )
    volume = next(
        v
        for v in existing.one("Deployment")["spec"]["template"]["spec"]["volumes"]
        if v["name"] == "api-keys"
    )
    assert volume["secret"]["secretName"] == "clipserve-api-keys"
    # no keys: auth off, nothing mounted
    assert "CLIPSERVE_API_KEYS_FILE" not in config(rendered["default"])


def test_settings_become_service_variables_and_the_charts_own_are_refused() -> None:
    result = render(
        "settings.max_batch_size_image=16", "settings.cors_origins={https://a.example,https://b.example}"
    )
    data = config(result)
    assert data["CLIPSERVE_MAX_BATCH_SIZE_IMAGE"] == "16"
    assert data["CLIPSERVE_CORS_ORIGINS"] == "https://a.example,https://b.example"
    assert data["CLIPSERVE_RELOAD_POLL_S"] == "10"
    from clipserve.service.settings import Settings

    unknown = (
        {k.removeprefix("CLIPSERVE_").lower() for k in data} - set(Settings.model_fields) - {"api_keys_file"}
    )
    assert unknown == set(), "the chart sets variables the service does not read"
    assert "settings.host is set by the chart" in refusal("settings.host=127.0.0.1")


def test_in_chart_stores_by_default_external_ones_from_secrets(rendered: dict[str, Rendered]) -> None:
    default = rendered["default"]
    stores = default.one("Secret", "-stores")["stringData"]
    assert stores["redis-url"] == "redis://clipserve-redis:6379/0"
    assert (
        stores["postgres-dsn"].startswith("postgresql://clipserve:")
        and "@clipserve-postgresql:5432/" in stores["postgres-dsn"]
    )
    password = default.one("Secret", "-postgresql")["stringData"]["password"]
    assert f":{password}@" in stores["postgres-dsn"], "one password for the server and the DSN"
    assert {s["metadata"]["name"] for s in default.of_kind("StatefulSet")} == {
        "clipserve-redis",
        "clipserve-postgresql",
    }
    external = rendered["external-stores"]
    assert external.of_kind("StatefulSet") == []
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in api_container(external)["env"]}
    assert env["CLIPSERVE_REDIS_URL"] == {"name": "clipserve-stores", "key": "redis-url"}
    assert env["CLIPSERVE_POSTGRES_DSN"] == {"name": "clipserve-stores", "key": "postgres-dsn"}
    no_redis = render("redis.enabled=false")
    assert config(no_redis)["CLIPSERVE_REDIS_URL"] == "none"


def test_models_from_a_volume_read_only_in_the_api_written_by_the_training_job(
    rendered: dict[str, Rendered],
) -> None:
    result = render("training.enabled=true")
    claim = result.one("PersistentVolumeClaim", "-models")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    api_spec = result.one("Deployment")["spec"]["template"]["spec"]
    job_spec = pod_specs(result.objects)["CronJob/clipserve-train"]
    for spec in (api_spec, job_spec):
        volume = next(v for v in spec["volumes"] if v["name"] == "models")
        assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert next(m for m in api_container(result)["volumeMounts"] if m["name"] == "models")["readOnly"] is True
    train = job_spec["containers"][0]
    assert not next(m for m in train["volumeMounts"] if m["name"] == "models").get("readOnly", False)
    assert train["command"] == ["clip-distill"]
    options = result.one("ConfigMap", "-train")["data"]
    assert options["CLIP_DISTILL_MODELS_DIR"] == "/models"
    assert options["CLIP_DISTILL_NAME"] == "shapes-demo"
    from clipserve.training.settings import TrainSettings

    fields = {k.removeprefix("CLIP_DISTILL_").lower() for k in options}
    assert fields <= set(TrainSettings.model_fields), "options clip-distill does not have"
    cron = result.one("CronJob")
    assert cron["spec"]["suspend"] is True and cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert api_spec["initContainers"][0]["name"] == "wait-for-model"


def test_models_from_an_oci_image_copied_in_by_an_init_container(rendered: dict[str, Rendered]) -> None:
    result = rendered["model-image"]
    spec = result.one("Deployment")["spec"]["template"]["spec"]
    (init,) = spec["initContainers"]
    assert init["image"] == "registry.example.com/clipserve-model-shapes-demo:3"
    assert init["command"] == ["cp", "-R", "/clipserve-models/.", "/models/"]
    assert next(v for v in spec["volumes"] if v["name"] == "models") == {"name": "models", "emptyDir": {}}
    assert result.of_kind("PersistentVolumeClaim")[0]["metadata"]["name"].endswith("-data")
    assert result.one("Deployment")["spec"]["strategy"] == {"type": "Recreate"}
    assert config(result)["CLIPSERVE_COLLECTIONS_BACKEND"] == "embedded"
    assert config(result)["CLIPSERVE_MODELS"] == "shapes-demo"


def test_gpu_values_place_the_api_on_gpu_nodes_with_an_engine_cache(rendered: dict[str, Rendered]) -> None:
    result = rendered["gpu"]
    spec = result.one("Deployment")["spec"]["template"]["spec"]
    api = api_container(result)
    assert api["image"] == "registry.example.com/clipserve-serve-gpu:0.1.0"
    assert api["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert spec["runtimeClassName"] == "nvidia"
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert next(m for m in api["volumeMounts"] if m["name"] == "engine-cache")["mountPath"] == "/engine-cache"
    cache = next(v for v in spec["volumes"] if v["name"] == "engine-cache")
    assert (
        cache["persistentVolumeClaim"]["claimName"]
        == result.one("PersistentVolumeClaim", "-engine-cache")["metadata"]["name"]
    )
    data = config(result)
    assert data["CLIPSERVE_ENGINE_CACHE_DIR"] == "/engine-cache"
    assert data["CLIPSERVE_PROVIDERS"] == "tensorrt,cuda,cpu"


# ---- refusals ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("set_values", "says"),
    [
        (["collections.backend=embedded", "autoscaling.enabled=false"], "replicaCount must be 1 (it is 2)"),
        (["collections.backend=embedded", "replicaCount=1"], "it cannot autoscale"),
        (["postgresql.enabled=false", "collections.backend=pgvector"], "needs a PostgreSQL"),
        (["postgresql.dsn=postgresql://x@db/clip"], "choose one"),
        (["models.source=image"], "needs models.image.repository"),
        (["autoscaling.mode=keda"], "needs autoscaling.keda.serverAddress"),
    ],
)
def test_settings_that_cannot_work_fail_to_render_with_one_line(set_values: list[str], says: str) -> None:
    line = refusal(*set_values)
    assert says in line
    assert "\n" not in line and len(line) < 250


def test_the_embedded_backend_renders_with_one_replica_and_no_autoscaler() -> None:
    result = render("collections.backend=embedded", "replicaCount=1", "autoscaling.enabled=false")
    assert result.one("Deployment")["spec"]["replicas"] == 1
    assert result.of_kind("HorizontalPodAutoscaler") == []


# ---- what podman plays (scripts/chart_podman.py) -------------------------------------------------------


def test_podman_gets_pods_configmaps_and_claims_only_the_api_port_published(
    rendered: dict[str, Rendered],
) -> None:
    result = render(
        "training.enabled=true", "auth.apiKeys[0].key=a-key-long-enough-0001", "auth.apiKeys[0].scopes={read}"
    )
    played = chart_podman.playable(result, api_port=18000)
    assert {o["kind"] for o in played.shared} == {"ConfigMap", "PersistentVolumeClaim"}
    assert set(played.pods) == {"clipserve", "clipserve-redis", "clipserve-postgresql"}
    assert played.job is not None and played.job["spec"]["restartPolicy"] == "Never"
    assert sorted(played.not_played) == sorted(
        f"{o['kind']}/{o['metadata']['name']}" for o in result.objects if o["kind"] in chart_podman.NOT_PLAYED
    )
    text = yaml.safe_dump_all([*played.shared, *played.pods.values(), played.job])
    assert "secretKeyRef" not in text and "secretName" not in text
    claims = {c["metadata"]["name"] for c in played.claims}
    assert {"clipserve-models", "data-clipserve-redis-0", "data-clipserve-postgresql-0"} <= claims
    ports = {
        name: [p for c in pod["spec"]["containers"] for p in c["ports"]] for name, pod in played.pods.items()
    }
    assert ports == {
        "clipserve": [
            {
                "name": "http",
                "containerPort": 8000,
                "protocol": "TCP",
                "hostPort": 18000,
                "hostIP": "127.0.0.1",
            }
        ],
        "clipserve-redis": [],
        "clipserve-postgresql": [],
    }
    for name, pod in played.pods.items():
        assert pod["spec"]["restartPolicy"] == "OnFailure"
        empty = [v["name"] for v in pod["spec"]["volumes"] if "emptyDir" in v]
        assert empty and all(v.startswith(f"{name}-") for v in empty), "emptyDirs named after their pod"
        mounted = {
            m["name"]
            for c in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]
            for m in c["volumeMounts"]
        }
        assert mounted <= {v["name"] for v in pod["spec"]["volumes"]}
    api_volumes = {v["name"]: v for v in played.pods["clipserve"]["spec"]["volumes"]}
    assert api_volumes["api-keys"]["configMap"]["name"] == "clipserve-auth"
    keys = next(o for o in played.shared if o["metadata"]["name"] == "clipserve-auth")["data"]["api-keys"]
    assert keys.strip() == "a-key-long-enough-0001 read"


def test_ci_runs_the_chart_check_after_the_container_smoke_and_make_test_installs_helm() -> None:
    steps = [
        line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith(("make", "CI="))
    ]
    smoke = steps.index('CI="${CI:-true}" make container-smoke')
    assert steps[smoke + 1] == 'CI="${CI:-true}" make chart-check'
    makefile = (ROOT / "Makefile").read_text()
    test_recipe = makefile.split("\ntest:", 1)[1].split("\n\n", 1)[0]
    assert "scripts/chart-tools.sh" in test_recipe
    assert (
        "\n.tools" in (ROOT / ".dockerignore").read_text() and "\n.tools" in (ROOT / ".gitignore").read_text()
    )


@pytest.mark.parametrize("case", ["default", "model-image", "external-stores"])
def test_install_notes_render_and_say_how_to_publish_a_model(case: str) -> None:
    values = ["-f", str(CASES[case])] if CASES[case] else []
    result = chart_validate.helm("install", "clip", str(CHART), "-n", "clip", "--dry-run=client", *values)
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    assert "port-forward svc/clip-clipserve" in notes
    assert ("models.image.tag=" in notes) == (case == "model-image")
    assert ("create job --from=cronjob/clip-clipserve-train" in notes) == (case == "external-stores")
