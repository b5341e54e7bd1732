"""`flux2-lora resume`: continue a run from its newest intact checkpoint, exactly.

The checkpoint's resolved config is the starting point; `--steps N` trains N more (else the run goes
on to its original train.steps) and key=value overrides may change settings, each change reported with
its old and new value (the new one is used). Settings that define the LoRA or the optimizer state
cannot change. The dataset and its cache must be what the checkpoint was trained on (fingerprint).
With unchanged settings the continuation is exact: the same losses and LoRA as an uninterrupted run.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .checkpoint import newest_intact, read_checkpoint
from .config import config_from_dict, load_config
from .errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

# What the checkpoint's tensors are shaped by: changing these cannot continue the same training.
FIXED = ("lora.rank", "lora.alpha", "lora.targets", "train.optimizer")


def _flat(config) -> dict:
    return {f"{section}.{key}": value for section, values in config.to_dict().items() for key, value in values.items()}


def resume_config(saved, step: int, *, steps: int | None, overrides=(), output: str | None = None):
    """(config, changes): the saved config with the overrides applied; changes are (key, old, new)."""
    from .trainer import training_problems

    config = load_config(None, overrides, base=saved, check=training_problems)
    updates = {}
    if steps:
        updates["train.steps"] = step + steps
    if output:
        updates["output.dir"] = str(output)
    if updates:
        config = config.replace(updates)
    if step >= config.train.steps:
        raise ConfigError([("train.steps", f"the checkpoint is at step {step} of {config.train.steps}: the run is "
                                           "complete; give --steps N to train N more")])
    before, after = _flat(saved), _flat(config)
    changes = [(key, before[key], after[key]) for key in after if before.get(key) != after[key]]
    fixed = [(key, f"was {old!r} in the checkpoint, cannot become {new!r}: start a new run to change it")
             for key, old, new in changes if key in FIXED]
    if fixed:
        raise ConfigError(fixed)
    return config, changes


def resume(path, *, steps: int | None = None, output=None, overrides=(), callbacks=None, encoders=None,
           transformer=None):
    """Continue the run at `path` (a checkpoint folder, a run folder or its checkpoints/); returns TrainingResult."""
    from .trainer import new_run_dir, train

    chosen, skipped = newest_intact(path)
    for folder, why in skipped:
        log.warning("skipping checkpoint %s: %s", folder, why)
    tensors, documents = read_checkpoint(chosen)
    try:
        saved = config_from_dict(documents["config"])
        step = int(documents["state"]["step"])
    except (KeyError, TypeError, ValueError, ConfigError) as exc:
        raise CheckpointError(f"{chosen}: its config or state cannot be read ({exc}): resume an earlier "
                              "checkpoint") from None
    config, changes = resume_config(saved, step, steps=steps, overrides=overrides, output=output)
    for key, old, new in changes:
        log.warning("%s: %r in the checkpoint, %r now: the new value is used%s", key, old, new,
                    "" if key in ("train.steps", "output.dir") else " (the continuation is no longer exact)")
    run_dir = new_run_dir(config) if output else Path(chosen).parent.parent
    log.info("resuming %s from step %d of %d (%s)", run_dir, step, config.train.steps, chosen.name)
    return train(config, callbacks, encoders=encoders, transformer=transformer,
                 resume=(run_dir, tensors, documents))
