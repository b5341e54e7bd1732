"""The keys ComfyUI's loaders read for adapters other than a plain LoRA: DoRA's dora_scale beside the LoRA keys, and
LoKr / LoHa in LyCORIS's own names. Split from export.py, which writes the plain LoRA in every layout."""

from __future__ import annotations

import torch

from ..errors import ExportError
from . import lora_keys

LYCORIS = ("lokr_", "hada_")   # peft's (and LyCORIS's) parameter-name prefixes of LoKr and LoHa


def is_lycoris(keys) -> bool:
    """Whether these state keys hold a LoKr or LoHa."""
    return any(key.rpartition(".")[2].startswith(LYCORIS) for key in keys)


def is_dora(keys) -> bool:
    """Whether these state keys hold a DoRA (ComfyUI's dora_scale or peft's magnitudes)."""
    return any(key.endswith((".dora_scale", ".lora_magnitude_vector")) for key in keys)


def dora_split(state: dict[str, torch.Tensor], fmt: str):
    """(the LoRA's A/B entries, {peft module: ComfyUI dora_scale (out,)}) of a canonical state. A DoRA LoRA is
    written in ComfyUI's form only, from training.lora.comfyui_dora's scales (they need the base weights)."""
    scales = {k[:-len(".dora_scale")]: v for k, v in state.items() if k.endswith(".dora_scale")}
    magnitude = next((k for k in state if k.endswith(".lora_magnitude_vector")), None)
    if magnitude or (scales and fmt != "comfyui"):
        raise ExportError(f"a DoRA LoRA ({magnitude or next(iter(scales))}) is written in ComfyUI's form only, by "
                          "the trainer (its dora_scale needs the base model's weights): use the run's LoRA file")
    return {k: v for k, v in state.items() if not k.endswith(".dora_scale")}, scales


def lycoris_keys(state: dict[str, torch.Tensor], fmt: str, rank: int, alpha: float) -> dict[str, torch.Tensor]:
    """A LoKr or LoHa (peft's names: `<module>.lokr_w1`, `.hada_w1_a`, ..., LyCORIS's own) in the keys ComfyUI's
    LoKr and LoHa loaders read: `transformer.<diffusers module>.<name>`, which ComfyUI maps onto its FLUX.2 layers
    (q, k and v onto their thirds of the fused qkv). peft scales by alpha / rank everywhere; ComfyUI by alpha / the
    rank of a decomposed factor, and by 1 without one: then the scale is baked into lokr_w2 and no alpha written."""
    if fmt != "comfyui":
        raise ExportError("a LoKr or LoHa is written in ComfyUI's keys only (format comfyui, the default)")
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        module, _, name = key.rpartition(".")
        if not name.startswith(LYCORIS) or lora_keys.bfl_target(module) is None:
            raise ExportError(f"not a FLUX.2 transformer LoKr/LoHa in peft names: {key!r}")
        modules.setdefault(module, {})[name] = tensor
    out = {}
    for module, tensors in modules.items():
        name = f"transformer.{module}"
        decomposed = any(k in tensors for k in ("lokr_w1_a", "lokr_w2_a", "hada_w1_a"))
        for key, tensor in tensors.items():
            baked = not decomposed and key == "lokr_w2"
            out[f"{name}.{key}"] = (tensor * (alpha / rank) if baked else tensor).contiguous()
        if decomposed:
            out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return out
