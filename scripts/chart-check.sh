#!/usr/bin/env bash
# `make chart-check`, run by .ci/run after the container smoke: the Helm chart (deploy/helm/clipserve)
# proved as far as a machine without a cluster can.
#
#   1. tools: helm, kubectl and the schemas (scripts/chart-tools.sh, into .tools/)
#   2. helm lint, default values and every ci/*-values.yaml
#   3. helm template of each, every object validated strictly against the Kubernetes schemas
#      (scripts/chart_validate.py)
#   4. pytest over the rendered YAML (tests/deploy/test_chart.py): probes, security, PDB beside HPA, refusals
#   5. podman kube play of the rendered pods with the real images (scripts/chart_podman.py says what):
#      the serving image (the smoke's: built again from its cache), the training image
#      (docker/Dockerfile.train) and a model image (docker/Dockerfile.model around a tiny bundle)
#
# Steps 1-4 need no container engine. Without one, step 5 prints "skipped: no container engine" and
# the script exits 0; with CI=true it fails instead (as the container smoke does).
# Environment: CONTAINER_ENGINE (podman; Docker has no `kube play`), VENV, CHART_CHECK_PODMAN=0 skips
# step 5 (the machine's other checks then carry it).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/container-engine.sh
source scripts/container-engine.sh

VENV="${VENV:-.venv}"
PY="$VENV/bin/python"
CHART=deploy/helm/clipserve
HELM=.tools/bin/helm
SERVE_IMAGE="docker.io/library/clipserve-serve:${CLIPSERVE_TAG:-latest}"
TRAIN_IMAGE="localhost/clipserve-train:${CLIPSERVE_TAG:-latest}"
BASES=(python:3.11-slim-bookworm redis:7.4-alpine pgvector/pgvector:pg17 busybox:1.37)
TRAIN_BUILD_FREE_GB=20
STAGE_WIDTH=46
RUN_DIR=""

fail() { echo "chart check: FAILED: $*" >&2; exit 1; }

cleanup() {
  local status=$?
  [ -z "$RUN_DIR" ] || rm -rf "$RUN_DIR"
  exit "$status"
}

free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# Each values case of the chart: the defaults, then chart-testing's ci/*-values.yaml.
values_cases() {
  echo ""
  ls "$CHART"/ci/*-values.yaml
}

lint() {
  local values
  while read -r values; do
    "$HELM" lint --strict "$CHART" ${values:+-f "$values"} >"$RUN_DIR/lint.log" 2>&1 \
      || { cat "$RUN_DIR/lint.log" >&2; fail "helm lint ${values:-(default values)}"; }
    engine_log "helm lint ${values:-(default values)}: ok"
  done < <(values_cases)
}

# The images step 5 runs. The serving image is the smoke's when it is there (CI runs the smoke first).
build_images() {
  local format=(--format docker)
  scripts/container-bases.sh "${BASES[@]}"
  # after the smoke (CI) every layer is cached: this only makes sure the image is this tree's
  engine_log "building $SERVE_IMAGE (docker/Dockerfile.serve; cached layers are reused)"
  "$ENGINE" build -q "${format[@]}" -f docker/Dockerfile.serve -t "$SERVE_IMAGE" . >/dev/null
  # The libraries' layer (several GB of torch and CUDA wheels) is keyed on pyproject.toml alone:
  # cached, a build costs the project's own layer.
  if ! "$ENGINE" image inspect "$TRAIN_IMAGE" >/dev/null 2>&1; then
    local free_gb
    free_gb=$(df --output=avail -BG "$(engine_storage_dir)" | tail -1 | tr -dc 0-9)
    [ "$free_gb" -ge "$TRAIN_BUILD_FREE_GB" ] \
      || fail "building docker/Dockerfile.train (6.5 GB) needs ${TRAIN_BUILD_FREE_GB} GB free in $(engine_storage_dir), there are ${free_gb} GB"
  fi
  engine_log "building $TRAIN_IMAGE (docker/Dockerfile.train; cached layers are reused)"
  "$ENGINE" build -q "${format[@]}" -f docker/Dockerfile.train -t "$TRAIN_IMAGE" . >/dev/null
  # The model image holds a tiny random-init bundle exported here; it is tagged with a hash of what
  # made it (the exporter and the bundle contract, wherever the package keeps them, and the tiny
  # config), so an unchanged exporter reuses it.
  local tag
  tag=$(find . \( -path ./.venv -o -path ./.tools -o -path ./.git \) -prune -o \
    \( -path '*/export/*.py' -o -path '*/contract/*.py' \) -print | LC_ALL=C sort \
    | xargs cat scripts/container-engine.sh | sha256sum | cut -c1-12)
  MODEL_IMAGE="localhost/clipserve-chart-model:$tag"
  if ! "$ENGINE" image inspect "$MODEL_IMAGE" >/dev/null 2>&1; then
    write_tiny_model_config "$RUN_DIR/tiny.json"
    "$VENV/bin/clip-export" --config "$RUN_DIR/tiny.json" --pretrained none --name shapes-demo \
      --models-dir "$RUN_DIR/models" --seed 0 --quiet
    "$ENGINE" build -q "${format[@]}" -f docker/Dockerfile.model --build-arg MODEL=shapes-demo \
      --build-arg VERSION=1 -t "$MODEL_IMAGE" "$RUN_DIR/models" >/dev/null
    engine_log "built $MODEL_IMAGE ($(image_size_mb "$MODEL_IMAGE") MB) from docker/Dockerfile.model"
  fi
}

main() {
  trap cleanup EXIT
  RUN_DIR=$(mktemp -d "${TMPDIR:-/tmp}/clipserve-chart-check.XXXXXX")

  stage "tools (helm, kubectl, schemas)"
  PYTHON="$PY" scripts/chart-tools.sh

  stage "helm lint"
  lint

  stage "helm template + strict validation"
  "$PY" scripts/chart_validate.py || fail "a values case did not render or validate (above)"

  stage "pytest over the rendered YAML"
  "$PY" -m pytest -q -p no:cacheprovider tests/deploy/test_chart.py || fail "tests/deploy/test_chart.py (above)"

  if [ "${CHART_CHECK_PODMAN:-1}" = 0 ]; then
    engine_log "podman kube play: not run (CHART_CHECK_PODMAN=0)"
  elif [ "${CONTAINER_ENGINE:-podman}" != podman ] || ! CONTAINER_ENGINE=podman engine_find; then
    [ "${CI:-}" != true ] || fail "no podman (kube play is podman's) and none could be installed; CI needs it"
    engine_log "podman kube play: skipped: no container engine"
  else
    # the pods' infra containers need podman's pause binary
    command -v catatonit >/dev/null 2>&1 || as_root env DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq --no-install-recommends catatonit >/dev/null || fail "cannot install catatonit"
    stage "images (serving, training, model)"
    build_images

    stage "podman kube play"
    "$PY" scripts/chart_podman.py --serve-image "$SERVE_IMAGE" --train-image "$TRAIN_IMAGE" \
      --model-image "$MODEL_IMAGE" --api-port "$(free_port)" --image-api-port "$(free_port)" \
      || fail "the podman check failed (above)"
  fi
  stage_done

  echo
  echo "chart check: passed in $SECONDS s"
  printf '  %s\n' "${STAGES[@]}"
}

main "$@"
