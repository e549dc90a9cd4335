#!/usr/bin/env bash
# Make sure a Redis answers on 127.0.0.1:6379 for the tests: start it, installing it first if needed.
set -euo pipefail
PORT="${REDIS_PORT:-6379}"
ping() { (exec 3<>"/dev/tcp/127.0.0.1/$PORT" && printf 'PING\r\n' >&3 && timeout 2 head -c 5 <&3 | grep -q PONG) 2>/dev/null; }
if ping; then exit 0; fi
if ! command -v redis-server >/dev/null 2>&1; then
  echo "redis-server not found; installing it with apt" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
fi
echo "starting redis-server on 127.0.0.1:$PORT" >&2
redis-server --daemonize yes --bind 127.0.0.1 --port "$PORT" --save "" --appendonly no --dir /tmp \
  --logfile /tmp/clipserve-redis.log
for _ in $(seq 50); do ping && exit 0; sleep 0.1; done
echo "redis did not answer on 127.0.0.1:$PORT; see /tmp/clipserve-redis.log" >&2
exit 1
