#!/usr/bin/env bash
# Set everything up and run the whole test suite headless (a virtual X server for napari's canvas).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1  # never wait on a hub download
exec xvfb-run -a -s "-screen 0 1280x1024x24" .venv/bin/python -m pytest "$@"
