"""What a run leaves when it ends (finished, or stopped by a request): its last checkpoint, the LoRA in ComfyUI's
form with its metadata, the moving average beside it (train.ema_decay) and the training curves. Every rank calls
write_outputs (a sharded run gathers the weights together); only rank 0 writes."""

from __future__ import annotations

import logging
from pathlib import Path

from .ema import ema_lora_path, ema_state
from .lora import comfyui_dora
from .metrics import plot_training_curves
from .state import save_checkpoint

log = logging.getLogger(__name__)


def write_outputs(s) -> tuple[Path | None, Path | None]:
    """(the LoRA's path, the curves' path) on rank 0; (None, None) on the other ranks."""
    save_checkpoint(s)        # at the end, or where a stop request ended the run: resumable either way
    lora = None
    if s.sharded:
        from ..lora_files import lora_state_dict

        lora = lora_state_dict(s.transformer)   # gathered by every rank, written by rank 0
    averaged = ema_state(s.ema) if s.ema and (s.sharded or s.ranks.main) else None
    if not s.ranks.main:
        return None, None
    lora_path = save_lora_file(s, lora=lora)
    if averaged:
        save_lora_file(s, ema_lora_path(lora_path), lora=averaged, averaged=True)
    curves = plot_training_curves(s.run_dir / "metrics.jsonl", s.run_dir / "training_curves.png",
                                  title=f"{s.config.output.name} ({s.variant.name})")
    return lora_path, curves


def save_lora_file(s, path: Path | None = None, lora: dict | None = None, *, averaged: bool = False) -> Path:
    """The LoRA in ComfyUI-native form (loads in diffusers too) with its metadata: lora/<name>.safetensors
    unless `path` is given. `lora`: its peft tensors when already gathered (a sharded base, or the moving average:
    `averaged`, recorded in the metadata)."""
    from ..lora_files import lora_metadata, lora_state_dict, save_lora

    c = s.config
    metadata = lora_metadata(
        variant=s.variant.name, rank=c.lora.rank, alpha=c.lora.alpha, targets=s.targets,
        extra={"steps": s.step, "resolution": list(c.data.resolution), "trigger_word": c.data.trigger_word,
               "dataset_fingerprint": s.cache.fingerprint, "base_model_fingerprint": s.base_fingerprint,
               "text_conditioning": c.model.text_conditioning, "name": c.output.name, "lr": c.train.lr,
               "batch_size": c.train.batch_size, "images": len(s.cache), "seed": c.train.seed,
               "family": s.variant.family, "max_steps": c.train.steps, "distilled_base": s.distilled or None,
               "lora_type": c.lora.type if c.lora.type != "lora" else None,
               **({"ema_decay": c.train.ema_decay} if averaged else {})})
    tensors = comfyui_dora(s.transformer, lora if lora is not None else lora_state_dict(s.transformer),
                           c.lora.alpha / c.lora.rank)   # a DoRA's magnitudes as ComfyUI's dora_scale
    path = save_lora(path or s.run_dir / "lora" / f"{c.output.name}.safetensors", tensors, fmt="comfyui",
                     rank=c.lora.rank, alpha=c.lora.alpha, metadata=metadata)
    log.info("LoRA written to %s", path)
    return path
