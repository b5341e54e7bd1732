"""An exponential moving average of the LoRA weights (`train.ema_decay`), written beside the LoRA as
<name>_ema.safetensors: the average of the last few hundred steps is often smoother than the last step's weights,
and costs one more copy of the adapter (a few MB), not of the model.

diffusers' EMAModel does the averaging, with its decay warm-up min(decay, (1 + n) / (10 + n)) after n updates,
so the first steps do not freeze the average at the random init. Its shadow weights are in every checkpoint
(resume stays exact), under the LoRA's peft names; with a sharded base they are sharded like the weights and
gathered whole to be written.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .sharding import full, shard_like

log = logging.getLogger(__name__)


def ema_lora_path(lora_path: Path) -> Path:
    """Where the run's averaged LoRA lies beside its LoRA file (what Save LoRA's "moving average" copies)."""
    return lora_path.with_name(f"{lora_path.stem}_ema.safetensors")


def make_ema(transformer, params: list[torch.nn.Parameter], decay: float):
    """The average of `params` (the trainable LoRA weights), or None when train.ema_decay is 0."""
    if not decay:
        return None
    from diffusers.training_utils import EMAModel

    ema = EMAModel(params, decay=decay, foreach=True)
    ema.names = _peft_names(transformer, params)
    return ema


def _peft_names(transformer, params) -> list[str]:
    """The name peft's own get_peft_model_state_dict gives each of `params` (matched by identity, so neither
    peft's renaming rules for LoRA, DoRA, LoKr or LoHa nor its key order are copied here)."""
    from peft import get_peft_model_state_dict

    named = {name: p for name, p in transformer.named_parameters() if p.requires_grad}
    by_id = {id(tensor): name for name, tensor in get_peft_model_state_dict(transformer, state_dict=named).items()}
    return [by_id[id(p)] for p in params]


def ema_state(ema) -> dict[str, torch.Tensor]:
    """The averaged LoRA as lora_state_dict gives the trained one: peft names, float32 CPU copies (every rank of a
    sharded run must call it: the shards are gathered)."""
    return {name: full(t).detach().to(device="cpu", dtype=torch.float32, copy=True).contiguous()
            for name, t in zip(ema.names, ema.shadow_params)}


def restore_ema(ema, tensors: dict[str, torch.Tensor] | None, updates: int) -> None:
    """Put a checkpoint's average back; a checkpoint without one (EMA turned on at resume) starts it from the
    current weights."""
    if not tensors:
        log.info("train.ema_decay: the checkpoint has no average, so it starts from the resumed weights")
        return
    missing = [name for name in ema.names if name not in tensors]
    if missing:
        raise KeyError(f"the checkpoint's average lacks {missing[0]}")
    with torch.no_grad():
        for name, shadow in zip(ema.names, ema.shadow_params):
            shadow.copy_(shard_like(tensors[name].to(shadow.dtype), shadow))
    ema.optimization_step = updates
