#!/usr/bin/env bash
# `make compose-env`: the passwords docker-compose.yml needs, in the .env file beside it (Compose
# reads that file itself). A password already there is kept; a missing one is generated (48 hex
# digits, safe in a URL). Other lines of the file are left as they are. The file is made readable
# by its owner only, and never enters an image (.dockerignore).
#
# Environment: COMPOSE_ENV_FILE, the file to write (default: .env at the repository's root).
set -euo pipefail
cd "$(dirname "$0")/.."
ENV_FILE="${COMPOSE_ENV_FILE:-.env}"
PASSWORDS=(REDIS_PASSWORD POSTGRES_PASSWORD POSTGRES_APP_PASSWORD)

touch "$ENV_FILE"
chmod 600 "$ENV_FILE"
# a last line without its newline would swallow the first one added
if [ -s "$ENV_FILE" ] && [ -n "$(tail -c 1 "$ENV_FILE")" ]; then echo >>"$ENV_FILE"; fi
for name in "${PASSWORDS[@]}"; do
  if grep -q "^${name}=." "$ENV_FILE"; then
    continue
  fi
  printf '%s=%s\n' "$name" "$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')" >>"$ENV_FILE"
  echo "compose-env: generated $name in $ENV_FILE"
done
