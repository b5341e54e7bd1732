"""`flux2-lora resume`: continue a run from its newest intact checkpoint, exactly.

The checkpoint's resolved config is the starting point; `--steps N` trains N more (else the run goes
on to its original train.steps) and key=value overrides may change settings, each change reported with
its old and new value (the new one is used). Settings that define the LoRA or the optimizer state
cannot change. The dataset and its cache must be what the checkpoint was trained on (fingerprint).
With unchanged settings the continuation is exact: the same losses and LoRA as an uninterrupted run.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from .checkpoints import checkpoint_step, newest_intact, read_checkpoint
from .config import config_from_dict, load_config
from .errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

# What the checkpoint's tensors are shaped by: changing these cannot continue the same training.
FIXED = ("lora.rank", "lora.alpha", "lora.targets", "train.optimizer")


def _flat(config) -> dict:
    return {f"{section}.{key}": value for section, values in config.to_dict().items() for key, value in values.items()}


def resume_config(saved, step: int, *, steps: int | None, overrides=(), updates=None, output: str | None = None,
                  run_dir=None):
    """(config, changes): the saved config with the overrides (key=value texts) and `updates` ({key: value},
    from a ComfyUI graph) applied; changes are (key, old, new). Every path of the result is checked with the
    overrides' problems, before anything loads: the folder written is `run_dir` (resuming in place) or, with
    `output`, a new run folder there."""
    from .preflight import training_problems

    updates = dict(updates or {})
    if steps:
        updates["train.steps"] = step + steps
    if output:
        updates["output.dir"] = str(output)

    def problems(config) -> list:   # of the config as it will run: with the graph's and the flags' values
        try:
            return training_problems(config.replace(updates) if updates else config, run_dir=run_dir)
        except ConfigError as exc:
            return exc.problems

    config = load_config(None, overrides, base=saved, check=problems)
    if updates:
        config = config.replace(updates)
    if step >= config.train.steps:
        raise ConfigError([("train.steps", f"the checkpoint is at step {step} of {config.train.steps}: the run is "
                                           "complete; train more steps (flux2-lora resume --steps N, or a larger "
                                           "train.steps)")])
    before, after = _flat(saved), _flat(config)
    changes = [(key, before[key], after[key]) for key in after if before.get(key) != after[key]]
    fixed = [(key, f"was {old!r} in the checkpoint, cannot become {new!r}: start a new run to change it")
             for key, old, new in changes if key in FIXED]
    if fixed:
        raise ConfigError(fixed)
    return config, changes


def _exact_despite(key: str, config) -> bool:
    """Changing train.steps keeps the continuation exact only where the schedule does not depend on it."""
    if key == "output.dir":
        return True
    return key == "train.steps" and config.train.lr_scheduler in ("constant", "constant_with_warmup") and \
        len(config.data.resolution) == 1


def run_folder_of(checkpoint: Path) -> Path:
    """The run a checkpoint belongs to: <run>/checkpoints/step_N."""
    checkpoint = Path(checkpoint).resolve()
    if checkpoint.parent.name != "checkpoints":
        raise CheckpointError(f"{checkpoint} is not inside a run's checkpoints/ folder: give --output DIR to "
                              "continue it into a new run folder")
    return checkpoint.parent.parent


def resume(path, *, steps: int | None = None, output=None, overrides=(), updates=None, callbacks=None,
           encoders=None, transformer=None):
    """Continue the run at `path` (a checkpoint folder, a run folder or its checkpoints/); returns TrainingResult."""
    from .training import new_run_dir, train

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
    in_place = None if output else run_folder_of(chosen)
    config, changes = resume_config(saved, step, steps=steps, overrides=overrides, updates=updates, output=output,
                                    run_dir=in_place)
    for key, old, new in changes:
        log.warning("%s: %r in the checkpoint, %r now: the new value is used%s", key, old, new,
                    "" if _exact_despite(key, config) else " (the continuation is no longer exact)")
    if output:
        run_dir = new_run_dir(config)
    else:
        run_dir = in_place
        newest = newest_intact(run_dir)[0]
        if checkpoint_step(newest) > step:  # continuing in place would interleave two versions of the run
            raise CheckpointError(f"{newest.name} is newer than {Path(chosen).name}: resuming the older one in place "
                                  f"would mix two versions of {run_dir}; give --output DIR to continue it into a new "
                                  "run folder")
    log.info("resuming %s from step %d of %d (%s)", run_dir, step, config.train.steps, Path(chosen).name)
    result = train(config, callbacks, encoders=encoders, transformer=transformer,
                   resume=(run_dir, tensors, documents))
    result.samples = earlier_samples(run_dir, step, result.samples) + result.samples
    return result


def earlier_samples(run_dir: Path, step: int, new) -> list[Path]:
    """The run's samples from before the checkpoint at `step`, so that a resumed run's summary counts the whole
    run's samples, not only this call's. Later ones belong to steps that were redone (or left behind)."""
    new = set(new)
    found = ((p, re.fullmatch(r"step_(\d+)_\d+\.png", p.name)) for p in sorted(Path(run_dir, "samples").glob("*.png")))
    return [p for p, match in found if match and int(match[1]) <= step and p not in new]
