#!/usr/bin/env bash
# Issue 14's GPU memory checks in one run (about 6-8 minutes on an H100/H200): each line measures the peak of the
# engine's step (torch.cuda.max_memory_allocated over the timed steps, weights included) for a setting that
# `flux2-lora plan` says fits, with random weights built from the shipped configs (nothing downloaded).
#   klein-9B, 1024 px, NF4 base                      target <= 24 GB
#   [dev], 1024 px, fp8 base, checkpointing          target <= 80 GB
#   [dev], 1024 px, NF4 base + 10 blocks swapped     target <= 24 GB (the plan's fewest blocks for 24 GiB)
# Usage: benchmarks/memory_checks.sh OUT_DIR   (rows as JSON in OUT_DIR, the tables on stdout)
set -euo pipefail
out="${1:?usage: benchmarks/memory_checks.sh OUT_DIR}"
mkdir -p "$out"
cd "$(dirname "$0")"
common=(--resolutions 1024 --no-baseline --warmup 2 --steps 3 --budget-s 600)
python gpu_speed.py --variants klein-9b --checkpointing off,on --quantization nf4 "${common[@]}" --json "$out/klein9b-nf4.json"
python gpu_speed.py --variants dev --checkpointing on --quantization fp8 "${common[@]}" --json "$out/dev-fp8.json"
python gpu_speed.py --variants dev --checkpointing on --quantization nf4 --blocks-to-swap 10 "${common[@]}" \
    --json "$out/dev-nf4-swap10.json"
