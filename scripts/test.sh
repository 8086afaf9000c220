#!/usr/bin/env bash
# Install (idempotent) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# The dashboard's end-to-end test drives Debian's chromium through playwright.
bash scripts/install_browser.sh
export HF_HUB_OFFLINE=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
.venv/bin/python -m pytest --durations=25 "$@"
