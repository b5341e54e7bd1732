#!/usr/bin/env bash
# The project's one test command. On a fresh machine it creates .venv, installs torch and the
# package with its test extras (see env.sh) and, where a ComfyUI checkout is at hand, ComfyUI's own
# requirements for the real-server tests (see comfyui_env.sh) and a Chromium for the browser tests (see
# browser_env.sh), then runs the whole suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=test
source scripts/env.sh
source scripts/comfyui_env.sh
source scripts/browser_env.sh
exec "$py" -m pytest "$@"
