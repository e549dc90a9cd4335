#!/bin/bash
# What the upstream postgres image does with the variables docker-compose.yml sets: on an empty data
# directory, create the cluster (UTF-8, so drivers get text, not bytes) owned by POSTGRES_USER with
# POSTGRES_PASSWORD, create POSTGRES_DB and run /docker-entrypoint-initdb.d/*.sql and *.sh in it;
# then serve on every address, passwords required over the network.
set -euo pipefail
socket_dir=/var/run/postgresql

first_start() {
  local user="${POSTGRES_USER:-postgres}" db
  db="${POSTGRES_DB:-$user}"
  : "${POSTGRES_PASSWORD:?is not set: the server would accept no password over the network}"
  initdb -D "$PGDATA" --username="$user" --pwfile=<(printf '%s\n' "$POSTGRES_PASSWORD") \
    -E UTF8 --locale=C.UTF-8 --auth-local=trust --auth-host=scram-sha-256 >/dev/null
  echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
  pg_ctl -D "$PGDATA" -o "-c listen_addresses='' -k $socket_dir" -w start >/dev/null
  if [ "$db" != postgres ]; then
    psql -v ON_ERROR_STOP=1 -h "$socket_dir" -U "$user" -d postgres -qc "CREATE DATABASE \"$db\""
  fi
  local script
  for script in /docker-entrypoint-initdb.d/*; do
    case "$script" in
      *.sql) psql -v ON_ERROR_STOP=1 -h "$socket_dir" -U "$user" -d "$db" -qf "$script" ;;
      *.sh) # shellcheck disable=SC1090
        . "$script" ;;
    esac
  done
  pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
  echo "first start: cluster created for $user, database $db" >&2
}

if [ "${1:-}" = postgres ]; then
  [ -s "$PGDATA/PG_VERSION" ] || first_start
  shift
  set -- postgres -D "$PGDATA" -c listen_addresses='*' "$@"
fi
exec "$@"
