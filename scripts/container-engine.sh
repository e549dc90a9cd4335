# Sourced by scripts/container-bases.sh, container-smoke.sh and container-gpu-check.sh: find a container engine
# (a running Docker, else podman, installed with apt where that is possible) and set podman up for
# machines like CI's: no systemd, limits that root cannot raise, cgroup v1 with a crun too old for it.
#
# After `engine_find`: ENGINE is `docker` or `podman`; with podman, CONTAINERS_CONF points at the
# settings written for this machine (see podman_configure). Nothing here changes /etc/containers.
# Also what those scripts share: timed stages and the tests' tiny model config.

CONTAINER_STATE_DIR="${CONTAINER_STATE_DIR:-${TMPDIR:-/tmp}/clipserve-containers}"
PODMAN_PACKAGES=(podman runc netavark aardvark-dns iptables docker-compose debootstrap)

engine_log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

write_tiny_model_config() {
  # The tests' tiny CLIP (tests/fixtures/models.py): exports in seconds, random init, no download.
  cat >"$1" <<'JSON'
{"embed_dim": 32,
 "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
JSON
}

# Timed stages of a long script: `stage NAME` logs it and ends the one before, `stage_done` ends the
# last; STAGES collects "name  seconds" lines (names padded to STAGE_WIDTH) for the script's summary.
STAGES=() STAGE_NAME="" STAGE_STARTED=0 STAGE_WIDTH=34

stage() {
  stage_done
  STAGE_NAME=$1 STAGE_STARTED=$SECONDS
  engine_log "== $STAGE_NAME"
}

stage_done() {
  [ -z "$STAGE_NAME" ] || STAGES+=("$(printf "%-${STAGE_WIDTH}s %5d s" "$STAGE_NAME" $((SECONDS - STAGE_STARTED)))")
  STAGE_NAME=""
}

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null 2>&1; then sudo "$@"; else return 1; fi
}

docker_engine_answers() { command -v docker >/dev/null 2>&1 && timeout 20 docker info >/dev/null 2>&1; }

# podman and what the smoke uses with it (docker-compose, debootstrap for the stand-in bases), from
# the distribution's archive. Fails when there is no apt or no way to become root.
install_podman() {
  command -v apt-get >/dev/null 2>&1 || return 1
  [ "$(id -u)" -eq 0 ] || sudo -n true 2>/dev/null || return 1
  engine_log "installing ${PODMAN_PACKAGES[*]} with apt"
  as_root apt-get update -qq || return 1
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${PODMAN_PACKAGES[@]}" >/dev/null || return 1
}

# The open-file and process limits podman gives itself, "nofile nproc" (hard limits): no
# container may have more. podman asks for more than root may have on some machines and settles
# for less, but its default for containers stays the higher figure, and they fail to start.
podman_own_limits() {
  local socket="$CONTAINER_STATE_DIR/limits-probe.sock" pid limits=""
  podman system service --time=0 "unix://$socket" >/dev/null 2>&1 &
  pid=$!
  for _ in $(seq 50); do [ -S "$socket" ] && break; sleep 0.1; done
  [ -S "$socket" ] && limits=$(awk '/^Max open files/ { f = $5 } /^Max processes/ { p = $4 } END { print f, p }' "/proc/$pid/limits")
  kill "$pid" 2>/dev/null
  wait "$pid" 2>/dev/null
  rm -f "$socket"
  echo "${limits:-$(ulimit -Hn) $(ulimit -Hu)}"
}

# Settings this machine needs, and only those: container limits within podman's own (above), and
# runc where cgroups are v1 or hybrid, which crun before 1.9 refuses.
podman_configure() {
  mkdir -p "$CONTAINER_STATE_DIR"
  local conf="$CONTAINER_STATE_DIR/containers.conf" nofile nproc
  read -r nofile nproc <<<"$(podman_own_limits)"
  {
    echo "# Written by scripts/container-engine.sh for this machine."
    echo "[containers]"
    if [ "$nofile" != unlimited ] && [ "$nproc" != unlimited ]; then
      echo "default_ulimits = [\"nofile=$nofile:$nofile\", \"nproc=$nproc:$nproc\"]"
    fi
    echo "[engine]"
    if [ "$(stat -fc %T /sys/fs/cgroup)" != cgroup2fs ] && command -v runc >/dev/null 2>&1; then
      echo 'runtime = "runc"'
    fi
    command -v netavark >/dev/null 2>&1 && echo "[network]" && echo 'network_backend = "netavark"'
  } >"$conf"
  export CONTAINERS_CONF="$conf"
}

# ENGINE=docker when a Docker engine answers, else podman (installed if need be). CONTAINER_ENGINE
# forces one. Returns 1 when neither can be had.
engine_find() {
  local wanted="${CONTAINER_ENGINE:-}"
  if [ "$wanted" = docker ] || { [ -z "$wanted" ] && docker_engine_answers; }; then
    docker_engine_answers || return 1
    ENGINE=docker
    return 0
  fi
  command -v podman >/dev/null 2>&1 || install_podman || return 1
  ENGINE=podman
  podman_configure
  podman info >/dev/null 2>&1 || { engine_log "podman is installed but does not work: $(podman info 2>&1 | tail -1)"; return 1; }
}

# Where the engine keeps images and containers.
engine_storage_dir() {
  if [ "$ENGINE" = podman ]; then podman info --format '{{.Store.GraphRoot}}'; else docker info --format '{{.DockerRootDir}}'; fi
}

# An image's size in MB, as the engine reports it.
image_size_mb() {
  "$ENGINE" image inspect --format '{{.Size}}' "$1" 2>/dev/null | awk '{printf "%.0f", $1 / 1e6}'
}
