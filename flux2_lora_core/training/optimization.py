"""What updates the LoRA: the optimizer train.optimizer names and the precision train.mixed_precision asks for.

Kept apart from the trainer so its recipe reads as steps; both are chosen once, in setup.
"""

from __future__ import annotations

import torch

# fp16 loss scaling: LoRA runs are 1-3k steps and start with lora_B = 0 (tiny gradients). torch's default
# growth interval (2000) would leave the scale where an early overflow backed it off for the whole run.
GRAD_SCALER_GROWTH_INTERVAL = 200


def make_optimizer(params, t) -> torch.optim.Optimizer:
    """The optimizer over the LoRA parameters for the train section `t`."""
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=0.9, weight_decay=t.weight_decay)
    if t.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=t.lr, weight_decay=t.weight_decay)
    device = params[0].device
    fused = device.type in ("cuda", "cpu", "mps", "xpu")  # fused AdamW: one kernel for all parameters
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, fused=fused)


def mixed_precision(device: torch.device, base_dtype: torch.dtype, mode: str):
    """(autocast dtype or None, GradScaler or None) for train.mixed_precision. "auto": bf16 where the device
    has it (CUDA with bf16, or weights already bf16), fp16 over fp16 weights, else off (fp32 on the CPU)."""
    if mode == "auto":
        bf16 = base_dtype == torch.bfloat16 or (device.type == "cuda" and torch.cuda.is_bf16_supported())
        mode = "bf16" if bf16 and base_dtype != torch.float16 else "fp16" if base_dtype == torch.float16 else "no"
    if mode == "no":
        return None, None
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type, growth_interval=GRAD_SCALER_GROWTH_INTERVAL) if mode == "fp16" else None
    return dtype, scaler
