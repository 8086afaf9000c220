#!/usr/bin/env bash
# Install what the real-browser test needs: Debian's chromium and PyPI's playwright. Idempotent.
# Never `playwright install`: it downloads its own browser builds from a CDN; the tests drive
# Debian's chromium through playwright's `executable_path` instead.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" -eq 0 ]; then
    as_root=()
  elif command -v sudo >/dev/null 2>&1; then
    as_root=(sudo)
  else
    echo "install_browser.sh: /usr/bin/chromium is missing and installing it needs root" >&2
    echo "(run this script as root, or install sudo)" >&2
    exit 1
  fi
  "${as_root[@]}" apt-get update
  # Through env: sudo drops the caller's environment.
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y --no-install-recommends chromium
fi

if [ ! -x .venv/bin/python ]; then
  echo "install_browser.sh: no .venv here; run scripts/install.sh first" >&2
  exit 1
fi
if ! .venv/bin/python -c "import playwright.sync_api" 2>/dev/null; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check playwright
fi

# Debian's launcher prints a harmless /dev/shm size warning in containers; keep the output clean.
/usr/bin/chromium --version 2>/dev/null
.venv/bin/python -c "from importlib.metadata import version; print('playwright', version('playwright'))"
