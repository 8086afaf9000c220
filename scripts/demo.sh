#!/usr/bin/env bash
# Install (idempotent) and run the main job: the full pipeline on the built-in model organism.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/emc demo "$@"
