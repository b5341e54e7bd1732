"""What keeps a config from training, found before anything loads (audit 3.3, 4.2).

Kept apart from the trainer so the CLI and the resume command can check a config, and report every problem
in one message, without importing the training machinery.
"""

from __future__ import annotations

import logging
import re

from .config import Config, check_paths
from .errors import ConfigError

log = logging.getLogger(__name__)

EFFECTIVE_BATCH_WARNING = 64   # audit 4.2: beyond this, LoRA training rarely improves and steps get slow


def training_problems(config: Config) -> list[tuple[str, str]]:
    """What keeps a valid config from training: missing paths, settings that contradict each other."""
    problems = check_paths(config, needs=("model", "data"))
    t, s = config.train, config.sample
    if t.warmup_steps >= t.steps and t.warmup_steps:
        problems.append(("train.warmup_steps", f"{t.warmup_steps} is not below train.steps={t.steps}: "
                                               "the learning rate would never reach train.lr"))
    if t.warmup_steps and t.lr_scheduler == "constant":
        problems.append(("train.lr_scheduler", "'constant' ignores train.warmup_steps: use constant_with_warmup"))
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


def check_training_config(config: Config) -> None:
    """Every problem with a training config at once, before anything loads (audit 3.3); warnings logged."""
    problems = training_problems(config)
    if problems:
        raise ConfigError(problems)
    t = config.train
    effective = t.batch_size * t.gradient_accumulation
    if effective > EFFECTIVE_BATCH_WARNING:
        log.warning("effective batch %d (train.batch_size=%d x train.gradient_accumulation=%d) is above %d: "
                    "each step averages that many images, so learning is slow per image; lower "
                    "train.gradient_accumulation unless you mean it", effective, t.batch_size,
                    t.gradient_accumulation, EFFECTIVE_BATCH_WARNING)
