"""What the commands print is true: a printed command runs as printed, export says what it did once and names
its flag, and a resumed run's summary counts the whole run's samples.

The demo case is the one scripts/demo.sh makes: the venv's `flux2-lora` run by full path from a shell whose PATH
does not hold the venv, so a bare `flux2-lora resume ...` would be "command not found".
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flux2_lora_core.config import load_config
from flux2_lora_core.training import train

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = shutil.which("flux2-lora", path=str(Path(sys.executable).parent))   # what scripts/demo.sh runs


def plain_shell_env() -> dict[str, str]:
    """The environment of a user's shell in which the venv is not activated."""
    venv_bin = str(Path(sys.executable).parent)
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != venv_bin)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    return {**env, "PATH": path, "HF_HUB_OFFLINE": "1"}


def cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "flux2_lora_core", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(SCRIPT is None, reason="package not installed in this environment (scripts/test.sh installs it)")
def test_the_demos_printed_resume_command_runs_in_a_plain_shell(tmp_path):
    env = plain_shell_env()
    if subprocess.run(["bash", "-c", "command -v flux2-lora"], env=env, capture_output=True).returncode == 0:
        pytest.skip("a flux2-lora outside the venv is on PATH: the bare name would run that one")
    demo = subprocess.Popen([SCRIPT, "demo", "--output", tmp_path / "demo", "--steps", "10", "data.resolution=64",
                             "sample.steps=0", "train.log_every=1"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "demo" / "runs" / "demo" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and metrics.stat().st_size) and time.monotonic() < deadline:
        time.sleep(0.2)                                 # a step was logged: Ctrl+C now stops and saves
    demo.send_signal(signal.SIGINT)
    out, err = demo.communicate(timeout=240)
    assert demo.returncode == 130, err
    printed = re.search(r"^  resume:  (.+)$", out, re.M)
    assert printed, out
    assert "flux2-lora is not on your PATH" in out and "/bin/activate" in out

    done = subprocess.run(["bash", "-c", printed[1]], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)                  # exactly as printed, as the user's shell runs it
    assert done.returncode == 0, done.stderr
    assert "trained 10 steps;" in done.stdout and "Traceback" not in done.stderr


@pytest.fixture(scope="module")
def stopped_run(training_files, tmp_path_factory, stop_after):
    """A run with samples at steps 0 and 2, stopped after step 2 of 4."""
    root, out = training_files("klein", 4), tmp_path_factory.mktemp("stopped")
    config = load_config(None, [f"model.path={root / 'model'}", f"data.path={root / 'data'}", "data.resolution=64",
                                f"cache.dir={root / 'cache'}", f"output.dir={out}", "lora.rank=2", "train.steps=4",
                                "sample.steps=1", "sample.resolution=64", "sample.at_start=true", "sample.every=2",
                                "sample.prompts=zxq ring"])
    result = train(config, stop_after(2))
    assert result.stopped_early and result.steps == 2
    return result.run_dir


def test_a_resumed_runs_summary_counts_all_its_samples(stopped_run):
    before = sorted(p.name for p in (stopped_run / "samples").iterdir())
    assert before == ["step_000000_0.png", "step_000002_0.png"]
    done = cli("resume", stopped_run, cwd=stopped_run.parent)
    assert done.returncode == 0, done.stderr
    after = sorted((stopped_run / "samples").iterdir())
    assert [p.name for p in after] == [*before, "step_000004_0.png"]
    assert f"samples: {stopped_run / 'samples'} (3 images)" in done.stdout, done.stdout


def test_export_says_it_once_and_names_its_flag(stopped_run, tmp_path):
    done = cli("export", stopped_run, "--format", "kohya", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (done.stdout + done.stderr).count("wrote") == 1, done.stdout + done.stderr
    written = stopped_run / "lora" / "flux2_lora.kohya.safetensors"
    assert done.stdout == f"wrote kohya LoRA {written}\n"

    again = cli("export", stopped_run, "--format", "kohya", cwd=tmp_path)    # never over a file
    assert again.returncode == 1 and "Traceback" not in again.stderr
    assert again.stderr.count("already exists") == 1 and "--out" in again.stderr and "(out=)" not in again.stderr

    blocked = tmp_path / "a-file"
    blocked.write_text("")
    bad = cli("export", stopped_run, "--out", blocked / "lora.safetensors", cwd=tmp_path)   # a file in the way
    assert bad.returncode == 1 and "Traceback" not in bad.stderr and "Errno" not in bad.stderr
    assert bad.stderr.startswith(f"error: {blocked / 'lora.safetensors'}: cannot be written") and "--out" in bad.stderr
