#!/usr/bin/env bash
# `make serve`: install what is missing, build the demo model on first run, serve on 127.0.0.1:8000.
# Everything after the install lives in scripts/first_run.py (see its docstring for the options).
# Only the serve extra is installed here: first_run.py adds the train extra (torch, several GB)
# when, and only when, it has to build the demo model.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
HASH="$(sha256sum pyproject.toml | cut -c1-12)"
if [ ! -x "$VENV/bin/clip-serve" ] || [ ! -x "$VENV/bin/python" ] || ! compgen -G "$VENV/.installed-$HASH-*" >/dev/null; then
  echo "clipserve: setting up $VENV (once)" >&2
  make --no-print-directory venv VENV="$VENV" EXTRAS="${EXTRAS:-serve}"
fi
exec "$VENV/bin/python" scripts/first_run.py "$@"
