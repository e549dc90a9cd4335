#!/usr/bin/env bash
# Make sure Debian's headless-capable Chromium is installed for the browser test of the demo page.
# The Python `playwright` package drives it through `executable_path`; we never download a browser build.
set -euo pipefail
BROWSER="${CLIPSERVE_CHROMIUM:-/usr/bin/chromium}"
if [ -x "$BROWSER" ]; then exit 0; fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "no $BROWSER and no apt-get: install Chromium and set CLIPSERVE_CHROMIUM to its path" >&2
  exit 1
fi
echo "installing chromium and chromium-driver with apt (once)" >&2
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  chromium chromium-driver fonts-dejavu-core >/dev/null
test -x "$BROWSER" || { echo "chromium installed but $BROWSER is missing" >&2; exit 1; }
