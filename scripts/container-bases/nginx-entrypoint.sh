#!/bin/sh
# What the upstream nginx image's entry point does that deploy/ relies on, when the command is nginx:
# source each executable /docker-entrypoint.d/*.envsh and run each executable *.sh, in order; then
# write each /etc/nginx/templates/*.template to /etc/nginx/conf.d/ without the suffix, with the
# environment's variables substituted (only those that are set: nginx's own `$host` stays).
set -eu
if [ "${1:-}" = nginx ]; then
  for script in /docker-entrypoint.d/*; do
    [ -f "$script" ] && [ -x "$script" ] || continue
    case "$script" in
      *.envsh) . "$script" ;;
      *.sh) "$script" ;;
    esac
  done
  defined=$(env | sed -n 's/^\([A-Za-z_][A-Za-z0-9_]*\)=.*/${\1}/p' | tr '\n' ' ')
  for template in /etc/nginx/templates/*.template; do
    [ -e "$template" ] || continue
    target="/etc/nginx/conf.d/$(basename "$template" .template)"
    envsubst "$defined" <"$template" >"$target"
    echo "$0: $template -> $target" >&2
  done
fi
exec "$@"
