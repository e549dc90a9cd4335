#!/usr/bin/env bash
# `make gpu-image-check`, run by .ci/run after the container smoke: builds docker/Dockerfile.serve-gpu
# and checks it where there is no GPU.
#
#   1. builds the image (GPU_SET=serve-gpu-cuda by default: the TensorRT libraries come only from
#      NVIDIA's package index, which CI does not reach; GPU_SET=serve-gpu builds the full image
#      where that index answers), on the same python base as the CPU image;
#   2. inside it, with no network: `pip check`, the ONNX Runtime distributions installed, and
#      `python -m clipserve.service.runtime.gpu_stack` (one onnxruntime; CUDA and TensorRT providers in the
#      build; ldd of both provider libraries, the TensorRT libraries a cuda image lacks named as
#      expected; the TensorRT API walk, or why it cannot run; real sessions; the gpu test gate's
#      decision and its reason), then the serving side's gpu tests under pytest, which skip saying why;
#   3. the image's own CMD on a tiny random-init model: with CLIPSERVE_PROVIDERS=cuda,cpu it refuses
#      to start, its last line naming the CUDA provider (never a silent CPU fallback), no traceback; with
#      CLIPSERVE_PROVIDERS=cpu it serves, and its HEALTHCHECK turns healthy;
#   4. `docker-compose --profile gpu config`: the compose file's gpu profile, as compose reads it.
#
# Docker when one answers, else podman (scripts/container-engine.sh); the base image comes from
# scripts/container-bases.sh (pulled, or a stand-in where no registry answers). Without an engine:
# "skipped: no container engine", exit 0; with CI=true that fails instead.
# Environment: CONTAINER_ENGINE, GPU_SET (serve-gpu-cuda or serve-gpu), CLIPSERVE_TAG, VENV.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/container-engine.sh
source scripts/container-engine.sh

GPU_SET="${GPU_SET:-serve-gpu-cuda}"
case "$GPU_SET" in
  serve-gpu) CHECK_FLAGS=() ;;
  serve-gpu-cuda) CHECK_FLAGS=(--cuda-only) ;;
  *) echo "container-gpu-check: GPU_SET must be serve-gpu or serve-gpu-cuda, not '$GPU_SET'" >&2; exit 2 ;;
esac
IMAGE="clipserve-${GPU_SET}:${CLIPSERVE_TAG:-latest}"
BASE=python:3.11-slim-bookworm
VENV="${VENV:-.venv}"
# The image is 3.2 GB (serve-gpu-cuda); the build writes the library layer once more while it
# commits it, and pip's downloads (1.6 GB) on top.
BUILD_FREE_GB=10
SERVE_WAIT_S=120
RUN_DIR="" CONTAINER=""
STAGE_WIDTH=46

fail() { echo "gpu image check: FAILED: $*" >&2; exit 1; }

cleanup() {
  local status=$?
  [ -z "$CONTAINER" ] || "$ENGINE" rm -f -v "$CONTAINER" >/dev/null 2>&1 || true
  [ -z "$RUN_DIR" ] || rm -rf "$RUN_DIR"
  exit "$status"
}

# Only the lines that say where the build is (podman's STEP lines, cache hits, pip's summary);
# everything goes to the log, whose end is shown if the build fails.
build_progress() {
  if [ "$ENGINE" = podman ]; then
    grep --line-buffered -E '^(STEP [0-9]+/[0-9]+: (FROM|COPY|RUN)|--> Using cache|Successfully (installed|tagged)|COMMIT)' \
      | cut -c1-160 || true
  else
    cat
  fi
}

build_image() {
  local free_gb log="$RUN_DIR/build.log" format=() status
  free_gb=$(df --output=avail -BG "$(engine_storage_dir)" | tail -1 | tr -dc 0-9)
  [ "$free_gb" -ge "$BUILD_FREE_GB" ] \
    || fail "building $IMAGE needs ${BUILD_FREE_GB} GB free in $(engine_storage_dir), there are ${free_gb} GB"
  # podman's default OCI format drops HEALTHCHECK; the docker format keeps it.
  [ "$ENGINE" = podman ] && format=(--format docker)
  engine_log "$ENGINE build -f docker/Dockerfile.serve-gpu --build-arg GPU_SET=$GPU_SET -t $IMAGE ."
  set +e
  "$ENGINE" build "${format[@]}" -f docker/Dockerfile.serve-gpu --build-arg "GPU_SET=$GPU_SET" -t "$IMAGE" . 2>&1 \
    | tee "$log" | build_progress
  status=${PIPESTATUS[0]}
  set -e
  if [ "$status" -ne 0 ]; then
    tail -40 "$log" >&2
    ! grep -q 'tensorrt.cu13.libs' "$log" || ! grep -qiE 'pypi\.nvidia\.com.*(not reachable|unreachable)|URLError|Name or service not known' "$log" \
      || fail "the build could not install tensorrt-cu13-libs: the TensorRT libraries come only from NVIDIA's package index, which this machine does not reach; GPU_SET=serve-gpu-cuda builds the CUDA-provider image"
    fail "the build failed (above)"
  fi
  [ "$("$ENGINE" image inspect --format '{{json .Config.Healthcheck}}' "$IMAGE")" != null ] \
    || fail "$IMAGE has no HEALTHCHECK"
  local label
  label=$("$ENGINE" image inspect --format '{{index .Config.Labels "org.clipserve.gpu-set"}}' "$IMAGE")
  [ "$label" = "$GPU_SET" ] || fail "$IMAGE is labelled gpu-set '$label', not $GPU_SET"
  # Earlier builds of this Dockerfile that no tag names any more (its label is set on every layer).
  "$ENGINE" image prune -f --filter "label=org.clipserve.gpu-set" >/dev/null 2>&1 || true
}

# A one-off container from the image: no network (nothing may be fetched at run time), no
# healthcheck timers (podman would ask systemd for them).
in_image() { "$ENGINE" run --rm --network none --no-healthcheck "$IMAGE" "$@"; }

check_stack() {
  local out="$RUN_DIR/gpu-stack.txt" distributions
  engine_log "pip check"
  in_image pip check || fail "pip check found broken requirements in $IMAGE"
  distributions=$(in_image sh -c 'pip list --format=freeze' | grep -icE '^(onnxruntime|ort-nightly)([-_][a-z0-9_-]+)?==' || true)
  engine_log "ONNX Runtime distributions in pip list: $distributions"
  [ "$distributions" = 1 ] || fail "$IMAGE has $distributions ONNX Runtime distributions, not exactly one"
  engine_log "python -m clipserve.service.runtime.gpu_stack ${CHECK_FLAGS[*]}"
  in_image python -m clipserve.service.runtime.gpu_stack "${CHECK_FLAGS[@]}" | tee "$out" \
    || fail "the GPU stack checks failed (above)"
  grep -q '^\[ok\] ldd libonnxruntime_providers_cuda.so: ' "$out" || fail "no ldd report of the CUDA provider"
  grep -qE '^\[(ok|expected)\] ldd libonnxruntime_providers_tensorrt.so: ' "$out" \
    || fail "no ldd report of the TensorRT provider"
  grep -qE '^\[(ok|skip)\] gpu test gate: ' "$out" || fail "no decision of the gpu test gate"
}

# The gpu tests of the serving side, collected by pytest inside the image (tests/ and pyproject.toml
# mounted read-only; pytest from wheels fetched on the host, the image itself has none): where no
# CUDA session starts, the gate skips each of them, and says why.
check_pytest_gate() {
  local out="$RUN_DIR/pytest-gate.txt" version status=0
  if grep -q '^\[ok\] gpu test gate: ' "$RUN_DIR/gpu-stack.txt"; then
    engine_log "pytest -m gpu not run in the image: a CUDA session starts here, and the gpu tests build their models with torch (make test-gpu runs them)"
    return
  fi
  version=$("$VENV/bin/python" -c 'import pytest; print(pytest.__version__)')
  "$VENV/bin/python" -m pip download -q --disable-pip-version-check --only-binary=:all: \
    -d "$RUN_DIR/wheels" "pytest==$version" 2>/dev/null || fail "pip download of pytest $version failed"
  engine_log "pytest $version -m gpu -rs tests/service/test_gpu_runtimes.py tests/service/test_service_app.py, in the image"
  "$ENGINE" run --rm --network none --no-healthcheck -v "$RUN_DIR/wheels:/wheels:ro" \
    -v "$PWD/tests:/check/tests:ro" -v "$PWD/pyproject.toml:/check/pyproject.toml:ro" -w /check "$IMAGE" \
    sh -c 'pip install -q --no-index --find-links /wheels --target /tmp/pytest pytest \
      && PYTHONPATH=/tmp/pytest python -m pytest -p no:cacheprovider -q -m gpu -rs tests/service/test_gpu_runtimes.py tests/service/test_service_app.py' \
    >"$out" 2>&1 || status=$?
  grep -E '^SKIPPED|passed|failed|error' "$out" | cut -c1-220
  [ "$status" = 0 ] || { cat "$out" >&2; fail "pytest -m gpu in the image exited $status"; }
  grep -q '^SKIPPED .*needs a CUDA GPU: ' "$out" && ! grep -qE '[0-9]+ (passed|failed)' "$out" \
    || { cat "$out" >&2; fail "the gpu tests in the image did not skip with the gate's reason"; }
}

write_tiny_model() {
  write_tiny_model_config "$RUN_DIR/tiny.json"
  [ -x "$VENV/bin/clip-export" ] || make --no-print-directory venv VENV="$VENV"
  "$VENV/bin/clip-export" --config "$RUN_DIR/tiny.json" --pretrained none --name tiny --models-dir "$RUN_DIR/models" \
    --seed 0 --quiet >/dev/null
  engine_log "a tiny random-init model (clip-export) in $RUN_DIR/models"
  chmod -R a+rX "$RUN_DIR/models"
}

serve_run() {
  # The image's CMD as it is; only the providers and the stores (none here) are set.
  "$ENGINE" run "$@" --network none -v "$RUN_DIR/models:/models:ro" \
    -e CLIPSERVE_REDIS_URL=none -e CLIPSERVE_RELOAD_POLL_S=0 "$IMAGE"
}

check_refuses_a_missing_provider() {
  local err="$RUN_DIR/refusal.txt" status=0
  serve_run --rm --no-healthcheck -e CLIPSERVE_PROVIDERS=cuda,cpu >/dev/null 2>"$err" || status=$?
  # The service's log lines and ONNX Runtime's own warnings come first; the last line says why.
  engine_log "CLIPSERVE_PROVIDERS=cuda,cpu: exit $status: $(tail -1 "$err")"
  [ "$status" = 1 ] || { tail -20 "$err" >&2; fail "with CLIPSERVE_PROVIDERS=cuda,cpu and no GPU the service exited $status, not 1"; }
  tail -1 "$err" | grep -q '^clip-serve: error: .*CUDAExecutionProvider.*not active' && ! grep -q Traceback "$err" \
    || { cat "$err" >&2; fail "the refusal does not end in one line naming CUDAExecutionProvider (above)"; }
}

health_status() {
  if [ "$ENGINE" = podman ]; then
    # No systemd here runs podman's healthcheck timers: run the image's HEALTHCHECK directly.
    podman healthcheck run "$CONTAINER" >/dev/null 2>&1 && echo healthy || echo unhealthy
  else
    docker inspect --format '{{.State.Health.Status}}' "$CONTAINER"
  fi
}

check_serves_on_the_cpu() {
  CONTAINER="clipserve-gpu-check-$$"
  serve_run -d --name "$CONTAINER" -e CLIPSERVE_PROVIDERS=cpu >/dev/null 2>"$RUN_DIR/run.err" \
    || fail "the container did not start: $(cat "$RUN_DIR/run.err")"
  local started=$SECONDS status=""
  while [ $((SECONDS - started)) -lt "$SERVE_WAIT_S" ]; do
    status=$(health_status)
    [ "$status" = healthy ] && break
    [ "$("$ENGINE" inspect --format '{{.State.Running}}' "$CONTAINER")" = true ] || break
    sleep 2
  done
  if [ "$status" != healthy ]; then
    "$ENGINE" logs "$CONTAINER" 2>&1 | tail -20 >&2
    fail "CLIPSERVE_PROVIDERS=cpu: the HEALTHCHECK did not pass in ${SERVE_WAIT_S} s (logs above)"
  fi
  engine_log "CLIPSERVE_PROVIDERS=cpu: healthy after $((SECONDS - started)) s; $("$ENGINE" exec "$CONTAINER" python -c '
import json, urllib.request
models = json.load(urllib.request.urlopen("http://127.0.0.1:8000/v1/models"))["data"]
print("serving", [(m["id"], m.get("providers")) for m in models], "as uid", __import__("os").getuid())')"
  "$ENGINE" rm -f -v "$CONTAINER" >/dev/null 2>&1
  CONTAINER=""
}

check_compose_profile() {
  command -v docker-compose >/dev/null 2>&1 \
    || as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-compose >/dev/null \
    || fail "no docker-compose, and apt cannot install it"
  local resolved="$RUN_DIR/compose-gpu.yml"
  docker-compose --profile gpu config >"$resolved" || fail "docker-compose --profile gpu config refused the file (above)"
  engine_log "docker-compose --profile gpu config: services $(docker-compose --profile gpu config --services | tr '\n' ' ')"
  "$VENV/bin/python" - "$resolved" <<'EOF' || fail "the resolved gpu profile is not what the deployment needs (above)"
import sys

import yaml

service = yaml.safe_load(open(sys.argv[1]))["services"]["api-gpu"]
mounts = {}
for volume in service["volumes"]:
    if isinstance(volume, str):
        source, target, *mode = volume.split(":")
        mounts[target] = (source, "ro" in mode)
    else:
        mounts[volume["target"]] = (volume.get("source"), bool(volume.get("read_only")))
assert mounts["/models"] == ("models", True), mounts
assert mounts["/data"][0] and not mounts["/data"][1], mounts
assert service["environment"]["CLIPSERVE_DATA_DIR"] == "/data", service["environment"]
print(f"api-gpu: /models <- {mounts['/models'][0]} (read-only), /data <- {mounts['/data'][0]}, "
      f"providers {service['environment']['CLIPSERVE_PROVIDERS']}, build arg GPU_SET={service['build']['args']['GPU_SET']}")
EOF
}

no_engine() {
  [ "${CI:-}" != true ] || fail "no container engine (docker or podman) and none could be installed; CI needs one"
  echo "skipped: no container engine (no Docker answers, podman is not installed and apt cannot install it)"
  exit 0
}

main() {
  trap cleanup EXIT
  stage "engine"
  engine_find || no_engine
  mkdir -p "$CONTAINER_STATE_DIR"
  RUN_DIR=$(mktemp -d "$CONTAINER_STATE_DIR/gpu-check.XXXXXX")
  engine_log "engine: $("$ENGINE" --version)"

  stage "base image"
  scripts/container-bases.sh "$BASE"

  stage "build docker/Dockerfile.serve-gpu ($GPU_SET)"
  build_image

  stage "checks in the image"
  check_stack
  check_pytest_gate

  stage "the image's CMD, no GPU"
  write_tiny_model
  check_refuses_a_missing_provider
  check_serves_on_the_cpu

  stage "compose --profile gpu config"
  check_compose_profile
  stage_done

  echo
  echo "gpu image check: passed in $SECONDS s ($ENGINE)"
  printf '  %s\n' "${STAGES[@]}"
  printf '  image %s: %s MB (gpu-set %s)\n' "$IMAGE" "$(image_size_mb "$IMAGE")" "$GPU_SET"
}

main "$@"
