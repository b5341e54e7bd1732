"""What keeps a config from training, found before anything loads (audit 3.3, 4.2).

Kept apart from the trainer so the CLI and the resume command can check a config, and report every problem
in one message, without importing the training machinery. Every path is checked here, by its key: the model
files (located, headers read), the dataset, and the folders a run writes (output.dir, cache.dir), because the
trainer would otherwise meet an unusable one minutes in, after the encoders ran or the transformer loaded.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path

from .config import Config, check_paths
from .errors import ConfigError, ModelError

log = logging.getLogger(__name__)

EFFECTIVE_BATCH_WARNING = 64   # audit 4.2: beyond this, LoRA training rarely improves and steps get slow


def training_problems(config: Config, *, run_dir=None) -> list[tuple[str, str]]:
    """What keeps a valid config from training: missing paths, settings that contradict each other.
    `run_dir`: the run folder a resume writes into, checked instead of output.dir (which it does not use)."""
    problems = check_paths(config, needs=("model", "data"))
    if not any(key.startswith("model.") for key, _ in problems):
        problems += model_problems(config)
    problems += folder_problems(config, run_dir=run_dir)
    t, s = config.train, config.sample
    if t.warmup_steps >= t.steps and t.warmup_steps:
        problems.append(("train.warmup_steps", f"{t.warmup_steps} is not below train.steps={t.steps}: "
                                               "the learning rate would never reach train.lr"))
    if t.warmup_steps and t.lr_scheduler == "constant":
        problems.append(("train.lr_scheduler", "'constant' ignores train.warmup_steps: use constant_with_warmup"))
    d = config.data
    if d.validation_path and not Path(d.validation_path).is_dir():
        problems.append(("data.validation_path", f"{d.validation_path!r} is not a folder: give one of held-out "
                                                 "images with their captions"))
    if d.validation_path and d.validation_split:
        problems.append(("data.validation_split", "set with data.validation_path: use one of them"))
    if config.lora.init_from and config.lora.type in ("lokr", "loha"):
        problems.append(("lora.init_from", f"continues a LoRA, not a {config.lora.type}: use lora.type=lora or dora"))
    if config.lora.init_from and not Path(config.lora.init_from).is_file():
        problems.append(("lora.init_from", f"{config.lora.init_from!r} is not a file: give a LoRA .safetensors"))
    targets = config.lora.targets.strip()
    if not targets:
        problems.append(("lora.targets", "empty: use attention_mlp (default), attention, names or 'regex:...'"))
    elif targets.startswith("regex:"):
        try:
            re.compile(targets[len("regex:"):])
        except re.error as exc:
            problems.append(("lora.targets", f"{targets!r} is not a valid regular expression: {exc}"))
    if s.resolution % 16:
        problems.append(("sample.resolution", f"{s.resolution} must be a multiple of 16 (or 0)"))
    if t.optimizer == "adamw8bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            problems.append(("train.optimizer", "adamw8bit needs bitsandbytes: pip install bitsandbytes, "
                                                "or use train.optimizer=adamw"))
    if len(config.data.resolution) > t.steps:
        problems.append(("data.resolution", f"{len(config.data.resolution)} resolutions for {t.steps} steps: "
                                            "each stage of the schedule needs at least one step"))
    return problems


def model_problems(config: Config) -> list[tuple[str, str]]:
    """Each model part located and the transformer's headers read, no weight loaded: a folder without weights, a
    pickled or truncated transformer file or a missing part fails here, by its key, not after the encoders ran."""
    from .models import probe_variant, resolve_sources

    m = config.model
    try:
        sources = resolve_sources(m.path, vae=m.vae, text_encoder=m.text_encoder, tokenizer=m.tokenizer)
        probe_variant(sources.transformer, m.variant)
    except ConfigError as exc:
        return exc.problems
    except ModelError as exc:  # resolve_sources lists "model.<part>: why" lines under a heading: keep their keys
        heading, *lines = str(exc).splitlines()
        keyed = [line.strip().partition(": ") for line in lines]
        if heading.endswith(":") and keyed and all(k.startswith("model.") and why for k, _, why in keyed):
            return [(key, why) for key, _, why in keyed]
        return [("model.variant" if "model.variant is" in str(exc) else "model.path", str(exc))]
    return []


def folder_problems(config: Config, *, run_dir=None) -> list[tuple[str, str]]:
    """The folders a run writes: output.dir (or a resumed run's own folder) and cache.dir. Creating them would
    fail only after the encoders ran or the transformer loaded, as a bare OS error naming no key."""
    problems = cache_dir_problems(config)
    if run_dir is not None:
        why = _unwritable(Path(run_dir))
        if why:
            problems.append(("", f"the run folder: {why}: continue it into a new run folder instead "
                                 "(flux2-lora resume --output DIR)"))
        return problems
    why = _unwritable(Path(config.output.dir))
    if why:
        problems.append(("output.dir", f"{why}: set output.dir to a folder you can write to (it is created if "
                                       "missing)"))
    elif os.path.isfile(Path(config.output.dir, config.output.name)):
        problems.append(("output.name", f"{str(Path(config.output.dir, config.output.name))!r} is a file, not a "
                                        "run folder: choose another output.name"))
    return problems


def cache_dir_problems(config: Config) -> list[tuple[str, str]]:
    """cache.dir, for every command that writes the cache (`cache` as well as `train`)."""
    default = "" if config.cache.dir else " (cache.dir is empty: the default from $FLUX2_LORA_CACHE, else " \
                                          "$XDG_CACHE_HOME/flux2-lora, else ~/.cache/flux2-lora)"
    why = _unwritable(config.cache.resolved_dir)
    return [("cache.dir", f"{why}{default}: set cache.dir to a folder you can write to")] if why else []


def _unwritable(folder: Path) -> str | None:
    """Why files cannot be written in `folder` (created if missing), or None. The nearest existing part of the
    path decides, by a real try (an empty folder made and removed at once): permission bits, read-only mounts
    and kernel folders all answer truly, also for root, which os.access would wave through."""
    where = "" if folder.is_absolute() else f" (relative to {os.getcwd()!r})"
    shown, nearest = f"{str(folder)!r}{where}", Path(os.path.abspath(folder))
    while not os.path.exists(nearest):
        if os.path.lexists(nearest):
            return f"{shown} cannot be created: {str(nearest)!r} is a broken link"
        nearest = nearest.parent
    if not os.path.isdir(nearest):
        return f"{shown} is a file, not a folder" if nearest == Path(os.path.abspath(folder)) else \
            f"{shown} cannot be created: {str(nearest)!r} is a file, not a folder"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".flux2-lora-check-", dir=nearest))
    except OSError as exc:
        inside = "" if nearest == Path(os.path.abspath(folder)) else f" in {str(nearest)!r}"
        return f"{shown} is not writable: cannot create a folder{inside} ({exc.strerror or exc})"
    return None


def check_training_config(config: Config, *, run_dir=None) -> None:
    """Every problem with a training config at once, before anything loads (audit 3.3); warnings logged.
    `run_dir`: see training_problems."""
    problems = training_problems(config, run_dir=run_dir)
    if problems:
        raise ConfigError(problems)
    t = config.train
    effective = t.batch_size * t.gradient_accumulation
    if effective > EFFECTIVE_BATCH_WARNING:
        log.warning("effective batch %d (train.batch_size=%d x train.gradient_accumulation=%d) is above %d: "
                    "each step averages that many images, so learning is slow per image; lower "
                    "train.gradient_accumulation unless you mean it", effective, t.batch_size,
                    t.gradient_accumulation, EFFECTIVE_BATCH_WARNING)
