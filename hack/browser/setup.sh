#!/usr/bin/env bash
# Makes the browser test's tools present: Debian's chromium (installed with apt-get when missing, which
# needs root) and playwright-core from npm at the version package-lock.json pins (no browser download).
# Skipped when both are there. Prints what it does.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
exec 9> "$here/.setup.lock"
flock 9
chromium=${CHROMIUM:-/usr/bin/chromium}
if [ ! -x "$chromium" ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "chromium is missing at $chromium and installing it needs root: apt-get install chromium" >&2
    exit 1
  fi
  echo "installing Debian's chromium" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium > /dev/null
fi
command -v node > /dev/null || { echo "Node.js is required by the browser test and is not installed" >&2; exit 1; }
stamp=$(sha256sum "$here/package-lock.json" | cut -c1-16)
if [ ! -f "$here/node_modules/.stamp" ] || [ "$(cat "$here/node_modules/.stamp")" != "$stamp" ]; then
  echo "installing playwright-core (npm ci)" >&2
  (cd "$here" && npm ci --no-audit --no-fund --loglevel=error > /dev/null)
  echo "$stamp" > "$here/node_modules/.stamp"
fi
"$chromium" --version 2> /dev/null | sed -n 1p >&2
