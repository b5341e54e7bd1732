#!/usr/bin/env bash
# The one-command demo on a fresh machine: sets up the repository's .venv like test.sh (see env.sh), then
# trains a LoRA on a tiny FLUX.2 model and a generated dataset, offline, into ./flux2-lora-demo of the
# directory you run it from. Arguments go to `flux2-lora demo` (--output DIR, --steps N, key=value).
# The venv is not activated in your shell, so the commands the demo prints (e.g. the resume command after
# Ctrl+C) name the venv's flux2-lora by its full path, and it says how to activate the venv instead.
set -euo pipefail
here="$PWD"
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
extras=
source scripts/env.sh
cd "$here"
case "$venv" in /*) ;; *) venv="$root/$venv" ;; esac
exec "$venv/bin/flux2-lora" demo "$@"
