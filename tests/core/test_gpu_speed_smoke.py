"""benchmarks/gpu_speed.py runs end to end on the CPU with tiny configs, so the GPU benchmark cannot rot unseen
between the rare runs on a lent GPU (benchmarks/results/ holds those)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_speed_runs_tiny_on_the_cpu(tmp_path):
    out = tmp_path / "rows.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_speed.py"), "--tiny", "--variants",
                          "klein-4b", "--resolutions", "64", "--checkpointing", "off", "--warmup", "1",
                          "--steps", "1", "--json", str(out)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.read_text())
    # the engine's step and diffusers' loop on the same model: both timed, neither failed
    assert [(r["model"], r["loop"]) for r in rows] == [("klein-4b", "engine"), ("klein-4b", "diffusers")]
    assert all(r["s_per_step"] > 0 and r["tflops"] > 0 and "error" not in r for r in rows)
    assert "| klein-4b | engine | 64 |" in run.stdout


def test_gpu_speed_runs_a_quantized_swapped_base_tiny_on_the_cpu(tmp_path):
    """The settings issue 14's GPU checks need (an nf4 base with blocks swapped) run through the same script, here
    with an edit LoRA's reference tokens."""
    out = tmp_path / "rows.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_speed.py"), "--tiny", "--variants",
                          "klein-4b", "--resolutions", "64", "--checkpointing", "on", "--warmup", "1", "--steps", "1",
                          "--quantization", "nf4", "--blocks-to-swap", "2", "--attention", "native", "--references", "1",
                          "--json", str(out)],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    (row,) = json.loads(out.read_text())   # the engine only: diffusers' loop has no block swap
    assert (row["loop"], row["quantization"], row["blocks_to_swap"], row["checkpointing"], row["references"]) == \
        ("engine", "nf4", 2, True, 1)
    assert row["s_per_step"] > 0 and "error" not in row and "| klein-4b native nf4 swap 2 1 ref | engine | 64 |" in run.stdout
