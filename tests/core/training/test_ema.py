"""train.ema_decay: the moving average of the LoRA weights, written beside the LoRA as <name>_ema.safetensors.
Checked against the average computed by hand from every step's weights (each step's checkpoint), with diffusers'
decay warm-up min(decay, (1 + n) / (10 + n)); and a resumed run ends at the straight run's average, bit for bit."""

from __future__ import annotations

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from flux2_lora_core.checkpoints.checkpoint import find_checkpoints, read_checkpoint
from flux2_lora_core.lora_files import to_format
from flux2_lora_core.resume import resume
from flux2_lora_core.training import trainer

from .test_trainer import make_config

DECAY = 0.2   # below the warm-up's 3/12 from the third update on: both branches of min() are used


def test_the_average_is_the_ema_of_every_steps_weights_and_resumes_exactly(training_files, tmp_path):
    root = training_files("klein", 4)
    result = trainer.train(make_config(root, tmp_path / "a", "train.steps=4", f"train.ema_decay={DECAY}",
                                       "sample.steps=0", "checkpoint.every=1", "checkpoint.keep=0", "train.lr=1e-2"))
    weights = [read_checkpoint(c)[0]["adapter"] for c in find_checkpoints(result.run_dir)]
    assert len(weights) == 4
    expected = dict(weights[0])                   # the first update copies the weights (decay 0)
    for updates, step in enumerate(weights[1:], start=2):
        decay = min(DECAY, updates / (9 + updates))
        expected = {k: decay * expected[k] + (1 - decay) * step[k] for k in expected}
    averaged = result.lora_path.with_name(f"{result.lora_path.stem}_ema.safetensors")
    saved = load_file(averaged)
    wanted = to_format(expected, fmt="comfyui", rank=4, alpha=16.0)
    assert saved.keys() == wanted.keys() == load_file(result.lora_path).keys()
    assert max(float((saved[k] - wanted[k]).abs().max()) for k in wanted) <= 1e-6
    assert max(float((saved[k] - load_file(result.lora_path)[k]).abs().max()) for k in saved) > 1e-5  # not the last
    with safe_open(str(averaged), "pt") as f:
        assert f.metadata()["flux2_lora.ema_decay"] == str(DECAY)

    again = resume(find_checkpoints(result.run_dir)[1], output=str(tmp_path / "b"))   # from step 2 to 4
    resumed = load_file(again.lora_path.with_name(f"{again.lora_path.stem}_ema.safetensors"))
    assert all(torch.equal(resumed[k], saved[k]) for k in saved)
