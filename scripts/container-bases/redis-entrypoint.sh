#!/bin/sh
# The upstream image's redis-server is built with protected mode off, so that the other containers
# of the network may connect without a password; Debian's starts with it on. Arguments given
# after it (compose's `command`) still win.
set -eu
if [ "${1:-}" = redis-server ]; then
  shift
  set -- redis-server --protected-mode no "$@"
fi
exec "$@"
