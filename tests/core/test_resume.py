"""Checkpoints in the trainer: exact resume, settings changed on resume, and interruption by signal."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flux2_lora_core.checkpoints.checkpoint import checkpoint_step, find_checkpoints
from flux2_lora_core.config import load_config
from flux2_lora_core.errors import CheckpointError, ConfigError
from flux2_lora_core.resume import resume
from flux2_lora_core.training import trainer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def workspace(training_files):
    return training_files("klein", 4)


def settings(root, out, *overrides):
    # Every source of randomness is on: flips, caption dropout, LoRA dropout, logit-normal timesteps, a warm-up
    # schedule, accumulation over two buckets' batches.
    return [f"model.path={root / 'model'}", f"data.path={root / 'data'}", "data.resolution=64", "data.flip=true",
            f"cache.dir={root / 'cache'}", f"output.dir={out}", "lora.rank=4", "lora.dropout=0.1",
            "train.caption_dropout=0.3", "train.lr=1e-3", "train.lr_scheduler=cosine", "train.warmup_steps=2",
            "train.gradient_accumulation=2", "train.log_every=3", "sample.steps=1", "sample.resolution=64",
            "sample.guidance=1.0", *overrides]


def test_k_steps_then_resume_k_steps_equals_2k_steps(workspace, tmp_path, stop_after):
    straight = trainer.train(load_config(None, settings(workspace, tmp_path / "a", "train.steps=8")))

    first = trainer.train(load_config(None, settings(workspace, tmp_path / "b", "train.steps=8")),
                          stop_after(4))
    assert first.stopped_early and first.steps == 4
    assert [p.name for p in find_checkpoints(first.run_dir)] == ["step_000004"]
    second = resume(first.run_dir)

    assert second.run_dir == first.run_dir and second.steps == 8
    assert first.losses + second.losses == straight.losses          # bit-identical on the CPU in fp32
    a, b = load_file(straight.lora_path), load_file(second.lora_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logged = [json.loads(line)["step"] for line in (first.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 9))                              # each step once, in order


def test_resume_reports_changes_refuses_fixed_ones_and_checks_the_data(workspace, tmp_path, caplog):
    run = trainer.train(load_config(None, settings(workspace, tmp_path, "train.steps=3"))).run_dir
    with pytest.raises(ConfigError) as error:
        resume(run)                                                 # complete: nothing to do without --steps
    assert error.value.problems[0][0] == "train.steps"
    with pytest.raises(ConfigError) as error:
        resume(run, steps=2, overrides=["lora.rank=8", "train.optimizer=sgd"])
    assert [key for key, _ in error.value.problems] == ["lora.rank", "train.optimizer"]

    more = resume(run, steps=2, overrides=["train.lr=5e-4"])
    assert more.steps == 5 and "train.lr: 0.001 in the checkpoint, 0.0005 now: the new value is used" in caplog.text
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    # Cosine after 2 warm-up steps: step 3 ran at the old peak; step 4, resumed with 5 steps in all, runs at the
    # new peak times the schedule's factor there (a third of the way down).
    assert rows[2]["lr"] == pytest.approx(1e-3)
    assert rows[3]["lr"] == pytest.approx(5e-4 * 0.5 * (1 + math.cos(math.pi / 3)))
    older = find_checkpoints(run)[0]
    with pytest.raises(CheckpointError, match="would mix two versions"):
        resume(older, steps=1)                                      # an older checkpoint only into a new folder

    elsewhere = resume(run, steps=1, output=tmp_path / "elsewhere")          # --output: a new run folder
    assert elsewhere.run_dir == tmp_path / "elsewhere" / "flux2_lora" and elsewhere.steps == 6
    assert (run / "lora" / "flux2_lora.safetensors").exists() and len(find_checkpoints(elsewhere.run_dir)) == 1

    logged = (run / "metrics.jsonl").read_text()
    with pytest.raises(CheckpointError, match="changed since this checkpoint"):
        resume(run, steps=1, overrides=["data.trigger_word=xyz"])   # other captions: other training data
    assert (run / "metrics.jsonl").read_text() == logged              # a refused resume changes no file
    caplog.clear()
    assert resume(run, steps=1, overrides=["model.quantization=int8"]).steps == 6   # allowed, but it is another base:
    assert "the continuation is not exact" in caplog.text                         # said, not silently "exact"


@pytest.mark.parametrize("sent, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_finishes_the_step_checkpoints_and_resumes(workspace, tmp_path, sent, code):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "flux2_lora_core", "train", *settings(workspace, tmp_path, "train.steps=100000",
                                                                           "output.name=run")]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.stat().st_size) and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(sent)
    out, err = process.communicate(timeout=120)
    assert process.returncode == code, err
    assert "Traceback" not in err and f"{sys.executable} -m flux2_lora_core resume {tmp_path / 'run'}" in out
    (checkpoint,) = find_checkpoints(tmp_path / "run")
    stopped_at = checkpoint_step(checkpoint)

    done = subprocess.run([sys.executable, "-m", "flux2_lora_core", "resume", tmp_path / "run", "--steps", "2"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"trained {stopped_at + 2} steps" in done.stdout


def test_resume_skips_a_damaged_checkpoint_and_refuses_one_named_directly(workspace, tmp_path):
    run = trainer.train(load_config(None, settings(workspace, tmp_path, "train.steps=4", "checkpoint.every=2"))).run_dir
    older, newest = find_checkpoints(run)
    adapter = newest / "adapter.safetensors"
    data = bytearray(adapter.read_bytes())
    data[len(data) // 2] ^= 0x01                                   # one flipped bit in the LoRA weights
    adapter.write_bytes(bytes(data))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}

    direct = subprocess.run([sys.executable, "-m", "flux2_lora_core", "resume", newest, "--steps", "1"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert direct.returncode == 1 and "Traceback" not in direct.stderr
    assert "adapter.safetensors" in direct.stderr and "must not be used" in direct.stderr

    done = subprocess.run([sys.executable, "-m", "flux2_lora_core", "resume", run, "--steps", "1"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"skipping checkpoint {newest}" in done.stderr and "adapter.safetensors" in done.stderr
    assert f"from step {checkpoint_step(older)} " in done.stderr and "trained 3 steps" in done.stdout
