#!/usr/bin/env bash
# `make serve`: install what is missing, build the demo model on first run, serve on 127.0.0.1:8000.
# Everything after the install lives in scripts/first_run.py (see its docstring for the options).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/clip-serve" ] || [ ! -x "$VENV/bin/python" ]; then
  echo "clipserve: setting up $VENV (once)" >&2
  make --no-print-directory venv VENV="$VENV"
fi
exec "$VENV/bin/python" scripts/first_run.py
