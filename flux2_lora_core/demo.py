"""`flux2-lora demo`: the whole job on a fresh machine, offline, in about a minute on two CPU cores.

It writes a tiny random-weight FLUX.2 [klein] model and a small generated dataset (an orange ring,
captioned with the trigger "zxq ring"), trains a LoRA on them with samples before and after, and
leaves the run folder as a real run would: run.json, metrics.jsonl, training_curves.png, samples/
and lora/demo.safetensors. Re-running reuses the model, dataset and latent cache and starts a new run
folder. The tiny model's weights are random, so "after" differs from "before" in the direction of the
training images without looking like them: the demo shows the machinery, not image quality.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .config import load_config
from .data import TRIGGER, write_demo_dataset
from .models import write_tiny_model

log = logging.getLogger(__name__)

DEMO_STEPS = 600          # ~50 ms per step on 2 CPU cores at 128 px (64 image + 512 prompt tokens)
DEMO_RESOLUTION = 128
DEMO_IMAGES = 8


def demo_config(output: Path, steps: int = DEMO_STEPS, overrides=()):
    """The demo's settings, as a user would write them: every one can be overridden with key=value."""
    return load_config(None, [
        f"model.path={output / 'model'}", f"data.path={output / 'dataset'}", f"data.resolution={DEMO_RESOLUTION}",
        f"cache.dir={output / 'cache'}", f"output.dir={output / 'runs'}", "output.name=demo",
        "lora.rank=8", "lora.alpha=8", f"train.steps={steps}", "train.lr=1e-3", "train.log_every=5",
        f"train.warmup_steps={min(10, steps // 5)}", "train.lr_scheduler=constant_with_warmup", "train.seed=0",
        "sample.at_start=true", "sample.steps=8", "sample.guidance=1.0",
        f"sample.prompts={TRIGGER}, a big bold orange ring in the centre, on a teal background", *overrides])


def prepare_demo(output: Path) -> None:
    """The tiny model and the dataset, written once."""
    if not (output / "model" / "model_index.json").exists():
        log.info("writing a tiny random FLUX.2 [klein] model to %s", output / "model")
        write_tiny_model(output / "model", variant="klein")
    if not (output / "dataset").exists():
        write_demo_dataset(output / "dataset", count=DEMO_IMAGES, size=256)


def run_demo(output="flux2-lora-demo", *, steps: int | None = None, callbacks=None, overrides=()):
    from .training import train

    output, steps = Path(output), steps or DEMO_STEPS
    prepare_demo(output)
    return train(demo_config(output, steps, overrides), callbacks)
