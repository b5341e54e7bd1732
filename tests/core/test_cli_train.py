"""`flux2-lora train / find-lr / export / demo` as users run them: real subprocesses, real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]


def cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "flux2_lora_core", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def workspace(training_files):
    return training_files("dev", 3)


def test_train_then_export_every_format(workspace, tmp_path):
    done = cli("train", "--preset", "style", "model.path=model", "data.path=data", "data.resolution=64",
               "cache.dir=cache", f"output.dir={tmp_path}", "output.name=ring", "train.steps=3", "lora.rank=2",
               "sample.steps=1", "sample.prompts=zxq ring, bold | a ring: on teal", "sample.guidance=3.5",
               cwd=workspace)
    assert done.returncode == 0, done.stderr
    run = tmp_path / "ring"
    assert f"LoRA:    {run / 'lora' / 'ring.safetensors'}" in done.stdout
    config = json.loads((run / "run.json").read_text())["config"]
    assert config["lora"]["rank"] == 2 and config["lora"]["alpha"] == 32.0 and config["data"]["flip"] is True
    assert config["sample"]["prompts"] == ["zxq ring, bold", "a ring: on teal"]
    assert len(list((run / "samples").glob("step_000003_*.png"))) == 2
    # The run folder's config.yaml runs the same run again (what a cluster gets handed, with torchrun).
    assert "torchrun --nproc-per-node N -m flux2_lora_core train --config config.yaml" in \
        (run / "config.yaml").read_text()
    again = cli("train", "--config", run / "config.yaml", f"output.dir={tmp_path / 'again'}", cwd=workspace)
    assert again.returncode == 0, again.stderr
    first, second = (load_file(where / "ring" / "lora" / "ring.safetensors") for where in (tmp_path, tmp_path / "again"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)

    for fmt in ("diffusers", "kohya"):
        done = cli("export", run, "--format", fmt, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    exported = sorted(p.name for p in (run / "lora").iterdir())
    assert len(exported) == 3, exported
    with safe_open(run / "lora" / "ring.safetensors", "pt") as f:
        assert f.metadata()["modelspec.architecture"]

    again = cli("export", run, "--format", "kohya", cwd=tmp_path)   # never writes over a file
    assert again.returncode == 1 and "Traceback" not in again.stderr and "exists" in again.stderr


def test_bad_settings_are_listed_together_without_a_traceback(workspace, tmp_path):
    done = cli("train", "lora.rank=0", "train.lr=fast", "train.optimizer=adam", "data.resolution=100",
               "sample.every=-1", "lora.alpah=3", "model.path=missing", "train.steps=2", "train.warmup_steps=5",
               cwd=workspace)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    keys = ("lora.rank", "train.lr", "train.optimizer", "data.resolution", "sample.every", "lora.alpah",
            "model.path", "data.path")     # bad values and paths at once; no contradiction judged on a default
    reported = [line.split(":")[0].strip() for line in done.stderr.splitlines()[1:]]
    assert sorted(reported) == sorted(keys), done.stderr
    assert "did you mean `lora.alpha`?" in done.stderr

    done = cli("train", "model.path=missing", "lora.rank=0", "train.steps=2", "train.warmup_steps=5", cwd=workspace)
    reported = [line.split(":")[0].strip() for line in done.stderr.splitlines()[1:]]
    assert sorted(reported) == ["data.path", "lora.rank", "model.path", "train.lr_scheduler", "train.warmup_steps"]


def test_find_lr_writes_the_plot_and_a_suggestion(workspace, tmp_path):
    done = cli("find-lr", "model.path=model", "data.path=data", "data.resolution=64", "cache.dir=cache",
               f"output.dir={tmp_path}", "lora.rank=2", "--steps", "12", "--min-lr", "1e-5", "--max-lr", "1",
               cwd=workspace)
    assert done.returncode == 0, done.stderr
    run = tmp_path / "flux2_lora-find-lr"
    result = json.loads((run / "lr_range_test.json").read_text())
    assert 1 <= len(result["losses"]) <= 12 and (run / "lr_range_test.png").stat().st_size > 1000
    assert "suggested train.lr=" in done.stdout or "no suggestion" in done.stdout


def test_demo_runs_offline_and_reuses_its_setup(tmp_path):
    done = cli("demo", "--output", tmp_path / "demo", "--steps", "4", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    run = tmp_path / "demo" / "runs" / "demo"
    assert (run / "lora" / "demo.safetensors").exists() and (run / "training_curves.png").exists()
    assert {p.name for p in (run / "samples").iterdir()} == {"step_000000_0.png", "step_000004_0.png"}
    again = cli("demo", "--output", tmp_path / "demo", "--steps", "2", cwd=tmp_path)
    assert again.returncode == 0 and (tmp_path / "demo" / "runs" / "demo-2" / "lora" / "demo.safetensors").exists()
    assert "loading the text encoder" not in again.stderr    # cache reused: no caption or prompt re-encoded
