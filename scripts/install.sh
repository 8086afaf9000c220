#!/usr/bin/env bash
# Create ./.venv (if missing) and install EMC with its pinned dependencies. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
# torch first and pinned: an unpinned torch resolves to a multi-GB CUDA build.
.venv/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
# The attribution-graph viewer's JavaScript: pinned npm tarballs, sha512-checked, cached once.
.venv/bin/emc graph assets
