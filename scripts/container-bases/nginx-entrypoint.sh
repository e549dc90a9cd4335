#!/bin/sh
# The parts of the upstream nginx image's entry point that deploy/ relies on:
# - with NGINX_ENTRYPOINT_LOCAL_RESOLVERS set, NGINX_LOCAL_RESOLVERS holds the nameservers of
#   /etc/resolv.conf (IPv6 ones in brackets), as nginx's `resolver` wants them;
# - each /etc/nginx/templates/*.template is written to /etc/nginx/conf.d/ without the suffix, with
#   the environment's variables substituted (only variables that are set: nginx's own `$host` stays).
set -eu
if [ -n "${NGINX_ENTRYPOINT_LOCAL_RESOLVERS:-}" ]; then
  NGINX_LOCAL_RESOLVERS=$(awk '$1 == "nameserver" { printf "%s%s", sep, ($2 ~ /:/ ? "[" $2 "]" : $2); sep = " " }' /etc/resolv.conf)
  export NGINX_LOCAL_RESOLVERS
fi
defined=$(env | sed -n 's/^\([A-Za-z_][A-Za-z0-9_]*\)=.*/${\1}/p' | tr '\n' ' ')
for template in /etc/nginx/templates/*.template; do
  [ -e "$template" ] || continue
  target="/etc/nginx/conf.d/$(basename "$template" .template)"
  envsubst "$defined" <"$template" >"$target"
  echo "$0: $template -> $target" >&2
done
exec "$@"
