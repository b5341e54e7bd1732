"""Will the picked model fit? Load Training Model's note, from the transformer file's header alone.

A user picks files and settings on Load Training Model long before anything loads; this says, at that moment,
what a training step will need on the GPU: the transformer's weights as they will sit on the device (an fp8 or
GGUF file at its stored size, `quantization` applied to the blocks' full-precision linears, block swap taking
its blocks off), plus the LoRA, the optimizer state and the activations at 512 and 1024 px with gradient
checkpointing off and on (memory_plan.py), and the text encoder while captions are cached.
"""

from __future__ import annotations

import re

from .memory_plan import GiB, HEADROOM_GIB, QUANTIZATIONS, SPEED_ORDER, parameter_count, plan_memory, swap_saving

_BLOCK_WEIGHT = re.compile(r"(.*\.)?(double_blocks|single_blocks|transformer_blocks|single_transformer_blocks)\.\d+\..*"
                           r"\.weight$")
_WIDE = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}   # floating types that load as the compute dtype (bf16: 2 bytes)


def stored_weights_gib(path: str, quantization: str) -> float | None:
    """The transformer's weights on the device once loaded in bf16, from a single file's header (None for a
    diffusers folder: its parameters are counted from the config instead)."""
    from pathlib import Path

    from ..models import read_transformer_header

    if not Path(path).is_file():
        return None
    file = read_transformer_header(Path(path))
    total = 0.0
    for key, (start, end) in file.offsets.items():
        size = _WIDE.get(file.dtypes[key])
        if size is None:          # fp8, GGUF blocks, integers: kept as stored
            total += end - start
            continue
        count = (end - start) // size
        linear = len(file.shapes[key]) == 2 and _BLOCK_WEIGHT.match(key)
        total += count * (QUANTIZATIONS[quantization] if linear and quantization != "none" else 2)
    return total / GiB


def model_note(model, *, vram_gib: float | None = None) -> str:
    """What Load Training Model shows: the picked model's predicted peaks (see the module doc)."""
    from ..models import probe_variant

    if not model.path:
        return ""
    variant = probe_variant(model.path, model.variant)
    config, q, swapped = variant.transformer_config, model.quantization, model.blocks_to_swap
    stored = stored_weights_gib(model.path, q)
    lines = [f"{variant.name}: predicted peak GiB of a training step (rank 16, batch 1, AdamW), gradient_checkpointing "
             f"off / on" + (f"; this GPU has {vram_gib:.0f} GiB" if vram_gib else "") + ":"]
    weights = stored if stored is not None else plan_memory(config, 1024, quantizations=(q,)).estimate(q, True).weights
    weights -= swap_saving(config, swapped, weights * GiB / parameter_count(config))

    def fits(gib: float) -> str:
        return "" if not vram_gib else " (fits)" if gib + HEADROOM_GIB <= vram_gib else " (does NOT fit)"

    for px in (512, 1024):
        plan = plan_memory(config, px, name=variant.name, quantizations=(q,))
        off, on = (weights + row.lora + row.activations for row in (plan.estimate(q, False), plan.estimate(q, True)))
        lines.append(f"  {px} px: " + (f"on {on:.1f}{fits(on)} (block swap turns it on)" if swapped else
                                        f"off {off:.1f}{fits(off)} / on {on:.1f}{fits(on)}"))
    lines.append(f"  of which weights {weights:.1f} (quantization={q}" + (f", blocks_to_swap={swapped}" if swapped
                                                                          else "") + ")")
    encoder = dict(plan.text_encoder_settings)
    te = {"none": plan.text_encoder_gib, "nf4": encoder.get("model.text_encoder_quantization=nf4")}.get(
        model.text_encoder_quantization, encoder.get("model.text_encoder_quantization=fp8/int8"))
    lines.append(f"  text encoder while caching ({plan.text_encoder}, text_encoder_quantization="
                 f"{model.text_encoder_quantization}): {te:.1f}{fits(te)}; cache.text_encoder_offload=auto runs it "
                 f"layer by layer where it does not fit")
    lines.append(f"plus ~{HEADROOM_GIB:g} GiB for the GPU's context; `flux2-lora plan` compares every setting "
                 f"({', '.join(SPEED_ORDER)}, block swap)")
    return "\n".join(lines)


def gpu_memory_gib() -> float | None:
    """The current CUDA device's total memory (the note's "fits" is against it), None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GiB
