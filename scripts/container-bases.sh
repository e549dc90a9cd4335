#!/usr/bin/env bash
# The upstream images the project builds on and runs, on machines that reach no container registry
# (CI's): each one missing locally is pulled where that works, else a stand-in is built from
# Debian's archive (debootstrap, then scripts/container-bases/<recipe>.Dockerfile) and tagged with
# the upstream name, so docker/ and docker-compose.yml build and run unchanged. Only CI uses the
# stand-ins; the images users get stay the upstream ones.
#
#   scripts/container-bases.sh                             # every image in STANDINS below
#   scripts/container-bases.sh python:3.11-slim-bookworm   # only these
#
# A new stand-in is one line in STANDINS (upstream name -> Debian suite and recipe) and its
# Dockerfile, which starts `ARG ROOTFS` / `FROM ${ROOTFS}`; the build context is the recipe folder
# plus host-ca/ (the host's extra CA certificates, for builds behind a TLS-intercepting proxy).
# Environment: CONTAINER_ENGINE (docker or podman), DEBIAN_MIRROR.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/container-engine.sh
source scripts/container-engine.sh

RECIPES=scripts/container-bases
STANDIN_LABEL=org.clipserve.stand-in
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
declare -A STANDINS=(
  [docker.io/library/python:3.11-slim-bookworm]="bookworm python"
  [docker.io/library/redis:7.4-alpine]="trixie redis"
  [docker.io/pgvector/pgvector:pg17]="trixie pgvector"
  [docker.io/library/nginx:1.28-alpine]="bookworm nginx"
  [docker.io/library/busybox:1.37]="bookworm busybox"
)

# `redis:7.4-alpine` -> `docker.io/library/redis:7.4-alpine`, as Docker and podman's compat API read it.
qualified() {
  local name=$1 first=${1%%/*}
  if [[ $name != */* ]]; then
    name="docker.io/library/$name"
  elif [[ $first != *.* && $first != *:* && $first != localhost ]]; then
    name="docker.io/$name"
  fi
  echo "$name"
}

image_present() { "$ENGINE" image inspect "$1" >/dev/null 2>&1; }

standin_note() {
  local recipe
  recipe=$("$ENGINE" image inspect --format "{{index .Config.Labels \"$STANDIN_LABEL\"}}" "$1" 2>/dev/null || true)
  [ -z "$recipe" ] || [ "$recipe" = "<no value>" ] || echo " (stand-in: $recipe)"
}

# A minimal Debian tree imported as localhost/clipserve-rootfs:<suite>, once per machine.
rootfs() {
  local suite=$1 image="localhost/clipserve-rootfs:$1" tree started=$SECONDS
  if image_present "$image"; then echo "$image"; return; fi
  command -v debootstrap >/dev/null 2>&1 || as_root env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
  mkdir -p "$CONTAINER_STATE_DIR"
  tree=$(mktemp -d "$CONTAINER_STATE_DIR/rootfs-$suite.XXXXXX")
  engine_log "debootstrap $suite from $DEBIAN_MIRROR"
  as_root debootstrap --variant=minbase "$suite" "$tree" "$DEBIAN_MIRROR" >"$tree.log" 2>&1 \
    || { tail -20 "$tree.log" >&2; as_root rm -rf "$tree"; return 1; }
  # As Debian's own container images are: no daemons started by package scripts, no
  # recommended packages, no documentation.
  as_root sh -c "printf '#!/bin/sh\nexit 101\n' > '$tree/usr/sbin/policy-rc.d' && chmod 755 '$tree/usr/sbin/policy-rc.d'
    printf 'APT::Install-Recommends \"false\";\n' > '$tree/etc/apt/apt.conf.d/90no-recommends'
    printf 'path-exclude=/usr/share/doc/*\npath-exclude=/usr/share/man/*\npath-exclude=/usr/share/locale/*\n' \
      > '$tree/etc/dpkg/dpkg.cfg.d/90no-docs'
    rm -rf '$tree'/var/cache/apt/archives/*.deb '$tree'/var/lib/apt/lists/*"
  as_root tar -C "$tree" -c . | "$ENGINE" import - "$image" >/dev/null
  as_root rm -rf "$tree" "$tree.log"
  engine_log "$image: $(image_size_mb "$image") MB in $((SECONDS - started)) s"
  echo "$image"
}

standin() {
  local image=$1 suite recipe base context started=$SECONDS
  read -r suite recipe <<<"${STANDINS[$image]}"
  base=$(rootfs "$suite")
  context=$(mktemp -d "$CONTAINER_STATE_DIR/context-$recipe.XXXXXX")
  cp -a "$RECIPES/." "$context/"
  mkdir -p "$context/host-ca"
  find /usr/local/share/ca-certificates -name '*.crt' -exec cp {} "$context/host-ca/" \; 2>/dev/null || true
  local format=()
  [ "$ENGINE" = podman ] && format=(--format docker)
  engine_log "building stand-in $image ($recipe on $suite)"
  "$ENGINE" build -q "${format[@]}" --build-arg "ROOTFS=$base" --label "$STANDIN_LABEL=$recipe on $suite" \
    -f "$context/$recipe.Dockerfile" -t "$image" "$context" >/dev/null || { rm -rf "$context"; return 1; }
  rm -rf "$context"
  engine_log "$image: stand-in, $(image_size_mb "$image") MB in $((SECONDS - started)) s"
}

main() {
  engine_find || { echo "container-bases: no container engine (docker or podman) here" >&2; exit 1; }
  mkdir -p "$CONTAINER_STATE_DIR"
  local wanted=("$@") missing=() suites=() pids=() name image suite
  [ ${#wanted[@]} -gt 0 ] || wanted=("${!STANDINS[@]}")
  for name in "${wanted[@]}"; do
    image=$(qualified "$name")
    [ -n "${STANDINS[$image]:-}" ] || { echo "container-bases: no stand-in recipe for $image" >&2; exit 1; }
    if image_present "$image"; then
      engine_log "$image: present$(standin_note "$image")"
    elif timeout 120 "$ENGINE" pull -q "$image" >/dev/null 2>&1; then
      engine_log "$image: pulled, $(image_size_mb "$image") MB"
    else
      missing+=("$image")
      suites+=("${STANDINS[$image]%% *}")
    fi
  done
  [ ${#missing[@]} -gt 0 ] || return 0
  engine_log "not pullable here, building stand-ins: ${missing[*]}"
  # The Debian trees download and unpack side by side; the stand-ins then build on them.
  for suite in $(printf '%s\n' "${suites[@]}" | sort -u); do
    rootfs "$suite" >/dev/null &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || { echo "container-bases: a Debian tree failed (above)" >&2; exit 1; }; done
  for image in "${missing[@]}"; do standin "$image"; done
}

main "$@"
