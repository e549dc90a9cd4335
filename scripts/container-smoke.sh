#!/usr/bin/env bash
# `make container-smoke`, run by .ci/run after the tests: docker-compose.yml for real. Builds the
# serving image, publishes a tiny random-init model into the models volume with clip-export, starts
# the stack with three api replicas, checks it through the proxy (scripts/container_smoke_checks.py
# says what), takes it down with its volumes and checks that nothing is left.
#
# Docker when one answers, else podman (installed with apt where it can be) driven by docker-compose
# through `podman system service`. Where no registry answers, the upstream base images are stood in
# for by scripts/container-bases.sh. With no engine at all: "skipped: no container engine", exit 0;
# with CI=true that fails instead.
#
# Environment: CONTAINER_ENGINE (docker or podman), COMPOSE_PROJECT_NAME (clipserve-smoke),
# CONTAINER_SMOKE_TRAIN=1 also builds docker/Dockerfile.train (a multi-GB CUDA torch from PyPI, so
# not in CI).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/container-engine.sh
source scripts/container-engine.sh

export COMPOSE_PROJECT_NAME="${COMPOSE_PROJECT_NAME:-clipserve-smoke}"
PROJECT=$COMPOSE_PROJECT_NAME
VENV="${VENV:-.venv}"
SERVE_IMAGE="clipserve-serve:${CLIPSERVE_TAG:-latest}"
BASES=(python:3.11-slim-bookworm redis:7.4-alpine pgvector/pgvector:pg17 nginx:1.28-alpine)
TRAIN_BUILD_FREE_GB=20
COMPOSE=()
RUN_DIR="" PODMAN_SERVICE_PID="" HEALTH_DRIVER_PID="" STACK_CREATED=""
STAGE_WIDTH=34

fail() { echo "container smoke: FAILED: $*" >&2; exit 1; }

no_engine() {
  [ "${CI:-}" != true ] || fail "no container engine (docker or podman) and none could be installed; CI needs one"
  echo "skipped: no container engine (no Docker answers, podman is not installed and apt cannot install it)"
  exit 0
}

project_filter() { echo "label=com.docker.compose.project=$PROJECT"; }

# What is left of the project: containers, volumes, networks, one per line.
leftovers() {
  "$ENGINE" ps -a --filter "$(project_filter)" --format 'container {{.Names}}'
  "$ENGINE" volume ls --filter "$(project_filter)" --format 'volume {{.Name}}'
  "$ENGINE" network ls --filter "$(project_filter)" --format 'network {{.Name}}'
}

cleanup() {
  local status=$?
  if [ -n "$STACK_CREATED" ]; then
    if [ "$status" != 0 ]; then  # what each container said last, so a failed run can be read from its log
      for id in $("$ENGINE" ps -aq --filter "$(project_filter)"); do
        echo "--- last lines of $("$ENGINE" inspect --format '{{.Name}}' "$id"):" >&2
        "$ENGINE" logs --tail 15 "$id" 2>&1 | sed 's/^/    /' >&2 || true
      done
    fi
    "${COMPOSE[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
    # A container that keeps restarting can slip through one `down`; remove what is left by name.
    leftovers | while read -r kind name; do
      case "$kind" in
        container) "$ENGINE" rm -f "$name" ;;
        volume) "$ENGINE" volume rm -f "$name" ;;
        network) "$ENGINE" network rm "$name" ;;
      esac >/dev/null 2>&1 || true
    done
  fi
  for pid in "$HEALTH_DRIVER_PID" "$PODMAN_SERVICE_PID"; do
    [ -z "$pid" ] || { kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; } || true
  done
  [ -z "$RUN_DIR" ] || rm -rf "$RUN_DIR"
  exit "$status"
}

find_compose() {
  if [ "$ENGINE" = docker ] && docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
    return
  fi
  command -v docker-compose >/dev/null 2>&1 \
    || as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-compose >/dev/null \
    || fail "no compose: neither \`docker compose\` nor docker-compose, and apt cannot install docker-compose"
  COMPOSE=(docker-compose)
}

# docker-compose speaks the Docker API: podman serves it on a socket of this run's own.
start_podman_service() {
  local socket="$RUN_DIR/podman.sock"
  podman system service --time=0 "unix://$socket" >"$RUN_DIR/podman-service.log" 2>&1 &
  PODMAN_SERVICE_PID=$!
  for _ in $(seq 100); do [ -S "$socket" ] && break; sleep 0.1; done
  [ -S "$socket" ] || fail "podman system service did not start: $(tail -3 "$RUN_DIR/podman-service.log")"
  export DOCKER_HOST="unix://$socket"
}

# podman runs HEALTHCHECKs from systemd timers; without systemd nothing runs them, and
# `depends_on: condition: service_healthy` would wait for ever. This loop stands in for the timers.
drive_healthchecks() {
  while sleep 2; do
    for id in $(podman ps -q --filter "$(project_filter)"); do
      podman healthcheck run "$id" >/dev/null 2>&1 || true
    done
  done
}

# The compose commands a user runs, exactly as README.md's deployment section gives them (a test
# keeps the two in step), through whichever compose this machine has.
compose_as_documented() {
  engine_log "docker compose $*"
  "${COMPOSE[@]}" "$@"
}

free_port() { "$VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

image_line() {
  local note=""
  note=$("$ENGINE" image inspect --format '{{index .Config.Labels "org.clipserve.stand-in"}}' "$1" 2>/dev/null || true)
  case "$note" in
    "" | "<no value>") note="" ;;
    *) [ "$1" = "$SERVE_IMAGE" ] && note=" (built on the stand-in python base)" || note=" (stand-in: $note)" ;;
  esac
  printf '%-45s %6s MB%s\n' "$1" "$(image_size_mb "$1")" "$note"
}

main() {
  trap cleanup EXIT
  stage "engine"
  engine_find || no_engine
  mkdir -p "$CONTAINER_STATE_DIR"
  RUN_DIR=$(mktemp -d "$CONTAINER_STATE_DIR/smoke.XXXXXX")
  find_compose
  if [ "$ENGINE" = podman ]; then
    start_podman_service
    if [ ! -d /run/systemd/system ]; then
      drive_healthchecks &
      HEALTH_DRIVER_PID=$!
    fi
  fi
  engine_log "engine: $("$ENGINE" --version); compose: ${COMPOSE[*]} ($("${COMPOSE[@]}" version --short 2>/dev/null || echo '?'))"
  [ -z "$(leftovers)" ] || fail "project $PROJECT already has containers, volumes or networks: $(leftovers | tr '\n' ' ')"

  stage "base images"
  scripts/container-bases.sh "${BASES[@]}"

  stage "passwords (.env)"
  scripts/compose-env.sh

  stage "venv (clip-export)"
  [ -x "$VENV/bin/clip-export" ] || make --no-print-directory venv VENV="$VENV"

  stage "build docker/Dockerfile.serve"
  compose_as_documented build
  [ "$("$ENGINE" image inspect --format '{{json .Config.Healthcheck}}' "$SERVE_IMAGE")" != null ] \
    || fail "$SERVE_IMAGE has no HEALTHCHECK (podman keeps it only in the docker image format)"

  if [ "${CONTAINER_SMOKE_TRAIN:-}" = 1 ]; then
    stage "build docker/Dockerfile.train"
    # The image is 6.3 GB; pip's downloads and a second copy of the layer, written while the build
    # commits it, come on top (a build here with 25 GB free ran out of space).
    local free_gb
    free_gb=$(df --output=avail -BG "$(engine_storage_dir)" | tail -1 | tr -dc 0-9)
    [ "$free_gb" -ge "$TRAIN_BUILD_FREE_GB" ] \
      || fail "building docker/Dockerfile.train needs ${TRAIN_BUILD_FREE_GB} GB free in $(engine_storage_dir), there are ${free_gb} GB"
    "${COMPOSE[@]}" --profile trainer build trainer
  else
    engine_log "docker/Dockerfile.train not built: its torch from PyPI is a multi-GB CUDA build (README, Deployment); CONTAINER_SMOKE_TRAIN=1 builds it"
  fi

  stage "publish model version 1"
  CLIPSERVE_PUBLIC_PORT=$(free_port)
  export CLIPSERVE_PUBLIC_PORT
  STACK_CREATED=1
  compose_as_documented up --no-start
  local models_dir export_command
  models_dir=$("$ENGINE" volume inspect --format '{{ .Mountpoint }}' "${PROJECT}_models")
  write_tiny_model_config "$RUN_DIR/tiny.json"
  export_command="$VENV/bin/clip-export --config $RUN_DIR/tiny.json --pretrained none --name smoke --models-dir $models_dir --quiet"
  $export_command --seed 0

  stage "up --scale api=3"
  compose_as_documented up -d --scale api=3

  stage "checks"
  "$VENV/bin/python" scripts/container_smoke_checks.py --url "http://127.0.0.1:$CLIPSERVE_PUBLIC_PORT" \
    --engine "$ENGINE" --compose "${COMPOSE[*]}" --project "$PROJECT" --export-command "$export_command" \
    || fail "a check failed (above)"

  stage "down -v"
  compose_as_documented down -v
  local left
  left=$(leftovers)
  [ -z "$left" ] || fail "\`down -v\` left: $(echo "$left" | tr '\n' ' ')"
  STACK_CREATED=""
  engine_log "down -v: no container, volume or network of $PROJECT left"
  stage_done

  echo
  echo "container smoke: passed in $SECONDS s ($ENGINE, ${COMPOSE[*]})"
  printf '  %s\n' "${STAGES[@]}"
  echo "images:"
  for image in "$SERVE_IMAGE" "${BASES[@]}"; do printf '  %s' "$(image_line "$image")"; echo; done
}

main "$@"
