"""A run's folder: output.dir/output.name, never an existing run's, its run.json and its config.yaml.

run.json records what a run was: its resolved config, the model and dataset it trained on (by fingerprint) and
every library version, so a LoRA found later can be traced and its run repeated. config.yaml is that config as
`--config` reads it, headed by the commands that run it again: so a run set up in a ComfyUI graph can be handed
to a cluster (`torchrun`), on the same files.
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
    write_config(s.config, s.run_dir, world=s.ranks.world)


def cluster_command(config_path: Path, gpus: str = "N") -> str:
    """The torchrun line that runs a run folder's config.yaml (output.dir given anew: the run's own is a folder of
    the machine it was set up on)."""
    return f"torchrun --nproc-per-node {gpus} -m flux2_lora_core train --config {config_path} output.dir=runs"


def write_config(config: Config, run_dir: Path, *, world: int = 1) -> Path:
    """run_dir/config.yaml: the resolved config, loadable by `--config`, headed by how to run it again."""
    import yaml

    path = run_dir / "config.yaml"
    batch = config.train.batch_size * world
    header = [f"The resolved config of the run in {run_dir.name}. Run it again on the same files (same paths),",
              "in one process or on a cluster (torchrun, on every machine; --nnodes M --node-rank R",
              "--master-addr HOST for several machines):",
              f"  python -m flux2_lora_core train --config {path.name} output.dir=runs",
              f"  {cluster_command(path.name)}",
              f"train.batch_size is per GPU: this run's global batch was {batch}; on N GPUs set train.batch_size",
              f"to {batch}/N to keep it (and the run's result). A bigger model: add train.fsdp=true."]
    text = "".join(f"# {line}\n" for line in header) + yaml.safe_dump(config.to_dict(), sort_keys=False)
    path.write_text(text, encoding="utf-8")
    return path
