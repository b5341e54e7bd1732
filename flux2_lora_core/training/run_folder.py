"""A run's folder: output.dir/output.name, never an existing run's, and its run.json.

run.json records what a run was: its resolved config, the model and dataset it trained on (by fingerprint) and
every library version, so a LoRA found later can be traced and its run repeated.
"""

from __future__ import annotations

import json
import logging
import platform
from pathlib import Path

import torch

from .. import __version__
from ..config import Config

log = logging.getLogger(__name__)


def new_run_dir(config: Config) -> Path:
    """output.dir/output.name, or name-2, name-3... when that already holds a run: never overwrite one."""
    parent, name = Path(config.output.dir), config.output.name
    candidate, n = parent / name, 1
    while candidate.exists() and any(candidate.iterdir()):
        n += 1
        candidate = parent / f"{name}-{n}"
    if n > 1:
        log.warning("%s already holds a run: this one goes to %s", parent / name, candidate)
    candidate.mkdir(parents=True, exist_ok=True)
    return candidate


def write_run_json(s) -> None:
    """run.json of a trainer Session: the resolved config, what it trained on (model and dataset fingerprints) and
    the library versions."""
    import diffusers
    import peft
    import transformers

    record = {"config": s.config.to_dict(), "variant": s.variant.name, "family": s.variant.family,
              "base_model_fingerprint": s.base_fingerprint, "dataset_fingerprint": s.cache.fingerprint,
              "cache": str(s.cache.root), "lora_targets": s.targets, "images": len(s.cache),
              "device": str(s.device), "dtype": str(s.dtype).removeprefix("torch."),
              "versions": {"flux2_lora": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
                           "transformers": transformers.__version__, "peft": peft.__version__,
                           "python": platform.python_version()}}
    (s.run_dir / "run.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
