"""The Helm chart (deploy/helm/clipserve) rendered with `helm template` and every object it renders
checked against its schema, strictly: a field the API server does not know fails, as it would fail
`kubectl apply --validate=strict`.

The tools come from scripts/chart-tools.sh (`make chart-tools`, into .tools/): helm, the Kubernetes
JSON schemas of kubernetes-validate (the `-strict` variants, for each of KUBERNETES_VERSIONS) and the schemas
of the custom resources the chart can render (KEDA's ScaledObject, prometheus-operator's
ServiceMonitor), made once from cloudcoil's models of their CRDs with every object closed.

    python scripts/chart_validate.py                       # default values and every ci/*-values.yaml
    python scripts/chart_validate.py -f my-values.yaml     # one values file
    python scripts/chart_validate.py --write-crd-schemas DIR    # (chart-tools.sh) the CRD schemas
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "deploy" / "helm" / "clipserve"
TOOLS = Path(os.environ.get("TOOLS_DIR", ROOT / ".tools"))
HELM = TOOLS / "bin" / "helm"
# Every object is checked against the oldest Kubernetes the chart supports (Chart.yaml's kubeVersion)
# and the one of the kubectl carried with helm.
KUBERNETES_VERSIONS = ("1.29.0", "1.34.0")
SCHEMA_ROOT = TOOLS / "python" / "kubernetes_validate" / "kubernetes-json-schema"
CRD_SCHEMAS = TOOLS / "schemas"
RELEASE = "clipserve"
NAMESPACE = "clipserve"

# (module, class) of cloudcoil's models for each custom resource the chart may render
CRD_MODELS = {
    ("keda.sh/v1alpha1", "ScaledObject"): ("cloudcoil.models.keda.v1alpha1", "ScaledObject"),
    ("keda.sh/v1alpha1", "TriggerAuthentication"): (
        "cloudcoil.models.keda.v1alpha1",
        "TriggerAuthentication",
    ),
    ("monitoring.coreos.com/v1", "ServiceMonitor"): (
        "cloudcoil.models.prometheus_operator.v1",
        "ServiceMonitor",
    ),
}


class ChartError(Exception):
    """helm refused the chart or the values; the message is helm's own."""


@dataclass
class Rendered:
    """What one `helm template` made: its objects, and how long helm took."""

    objects: list[dict[str, Any]]
    seconds: float
    values: list[str] = field(default_factory=list)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name_suffix: str = "") -> dict[str, Any]:
        found = [o for o in self.of_kind(kind) if o["metadata"]["name"].endswith(name_suffix)]
        if len(found) != 1:
            names = [o["metadata"]["name"] for o in self.of_kind(kind)]
            raise LookupError(f"expected one {kind} named *{name_suffix}, found {names}")
        return found[0]


def helm_available() -> str | None:
    """None when helm runs, else why not (the tools are installed by `make chart-tools`)."""
    if not HELM.exists():
        return f"{HELM} is not installed: run `make chart-tools`"
    try:
        subprocess.run([str(HELM), "version", "--short"], capture_output=True, check=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{HELM} does not run here: {exc}"
    return None


def helm(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    # helm keeps caches and settings under $HOME by default; a fresh folder each time keeps
    # the renders independent of whatever the machine's user has set up
    env = {**os.environ, "HELM_CACHE_HOME": str(TOOLS / "helm-home" / "cache")}
    env |= {
        "HELM_CONFIG_HOME": str(TOOLS / "helm-home" / "config"),
        "HELM_DATA_HOME": str(TOOLS / "helm-home" / "data"),
    }
    return subprocess.run([str(HELM), *args], capture_output=True, text=True, env=env, timeout=timeout)


def render(
    values_files: Sequence[Path | str] = (),
    set_values: Sequence[str] = (),
    *,
    release: str = RELEASE,
    namespace: str = NAMESPACE,
    chart: Path = CHART,
) -> Rendered:
    """`helm template` of the chart: its objects, parsed. Raises ChartError with helm's message."""
    args = ["template", release, str(chart), "--namespace", namespace]
    for values in values_files:
        args += ["-f", str(values)]
    for pair in set_values:
        args += ["--set", pair]
    started = time.perf_counter()
    result = helm(*args)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise ChartError(result.stderr.strip())
    objects = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return Rendered(objects, seconds, [str(v) for v in values_files])


def helm_error_line(message: str) -> str:
    """The chart's own words in a helm failure (a template's `fail`), without helm's prefix."""
    lines = (
        [line for line in message.splitlines() if line.startswith("Error:")] or message.splitlines() or [""]
    )
    return re.sub(r"^Error: (?:execution error at \([^)]*\): )?", "", lines[0]).strip()


def schema_name(api_version: str, kind: str) -> str:
    """kubernetes-json-schema's file name: apps/v1 Deployment -> deployment-apps-v1.json."""
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    return f"{kind.lower()}-{group_version}.json"


class Validator:
    """Strict JSON-schema validation of Kubernetes objects, built-in kinds and the chart's CRDs."""

    def __init__(self, version: str = KUBERNETES_VERSIONS[-1], crd_schemas: Path = CRD_SCHEMAS) -> None:
        from referencing import Registry, Resource

        self.version = version
        self.k8s_schemas = k8s_schemas = SCHEMA_ROOT / f"v{version}-local-strict"
        self.crd_schemas = crd_schemas
        if not (k8s_schemas / "_definitions.json").exists():
            raise FileNotFoundError(f"no Kubernetes schemas in {k8s_schemas}: run `make chart-tools`")
        definitions = json.loads((k8s_schemas / "_definitions.json").read_text())
        self.registry = Registry().with_resource(definitions["$id"], Resource.from_contents(definitions))
        self._validators: dict[tuple[str, str], Any] = {}

    def _validator(self, api_version: str, kind: str) -> Any:
        import jsonschema

        key = (api_version, kind)
        if key not in self._validators:
            name = schema_name(api_version, kind)
            path = self.crd_schemas / name if key in CRD_MODELS else self.k8s_schemas / name
            if not path.exists():
                raise LookupError(f"no schema for {kind} {api_version} (looked for {path})")
            schema = json.loads(path.read_text())
            self._validators[key] = jsonschema.Draft202012Validator(schema, registry=self.registry)
        return self._validators[key]

    def errors(self, obj: dict[str, Any]) -> list[str]:
        """Every way `obj` breaks its schema, one line each ('' path for the top level)."""
        try:
            validator = self._validator(obj.get("apiVersion", ""), obj.get("kind", ""))
        except LookupError as exc:
            return [str(exc)]
        return [
            f"{'.'.join(str(p) for p in error.absolute_path) or '(top)'}: {error.message}"
            for error in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))
        ]

    def check(self, objects: Iterable[dict[str, Any]]) -> list[str]:
        """`Kind/name: problem` for every problem of every object."""
        return [
            f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}: {line}"
            for obj in objects
            for line in self.errors(obj)
        ]


def closed(schema: Any) -> Any:
    """The schema with every object that lists its properties closed to any other."""
    if isinstance(schema, dict):
        schema = {key: closed(value) for key, value in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [closed(item) for item in schema]
    return schema


def write_crd_schemas(folder: Path) -> list[Path]:
    """Strict JSON schemas of CRD_MODELS, from cloudcoil's pydantic models of the upstream CRDs."""
    import importlib

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for (api_version, kind), (module_name, class_name) in CRD_MODELS.items():
        model = getattr(importlib.import_module(module_name), class_name)
        schema = closed(model.model_json_schema(by_alias=True))
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        path = folder / schema_name(api_version, kind)
        path.write_text(json.dumps(schema, indent=1))
        written.append(path)
    return written


def values_files() -> list[Path | None]:
    """The chart's default values (None) and each of its ci/*-values.yaml (chart-testing's set)."""
    return [None, *sorted((CHART / "ci").glob("*-values.yaml"))]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "-f", "--values", action="append", type=Path, help="values files (default: each case)"
    )
    parser.add_argument("--write-crd-schemas", type=Path, metavar="DIR", help="write the CRD schemas there")
    args = parser.parse_args(argv)
    if args.write_crd_schemas:
        for path in write_crd_schemas(args.write_crd_schemas):
            print(f"wrote {path}")
        return 0
    problem = helm_available()
    if problem:
        print(f"chart: {problem}", file=sys.stderr)
        return 1
    validators = [Validator(version) for version in KUBERNETES_VERSIONS]
    cases: list[list[Path]] = [args.values] if args.values else [[v] if v else [] for v in values_files()]
    failed = False
    for case in cases:
        label = (
            ", ".join(str(p.relative_to(ROOT) if p.is_relative_to(ROOT) else p) for p in case)
            or "default values"
        )
        try:
            rendered = render(case)
        except ChartError as exc:
            print(f"render {label}: FAILED: {helm_error_line(str(exc))}", file=sys.stderr)
            failed = True
            continue
        started = time.perf_counter()
        problems = [f"[{v.version}] {line}" for v in validators for line in v.check(rendered.objects)]
        kinds = sorted({o["kind"] for o in rendered.objects})
        print(
            f"{label}: {len(rendered.objects)} objects ({', '.join(kinds)}); helm template "
            f"{rendered.seconds:.2f} s, strict validation against Kubernetes {' and '.join(KUBERNETES_VERSIONS)} "
            f"{time.perf_counter() - started:.2f} s: {'ok' if not problems else 'FAILED'}"
        )
        for line in problems:
            print(f"  {line}", file=sys.stderr)
        failed |= bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
