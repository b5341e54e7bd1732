"""Where each LoRA'd Linear layer of a FLUX.2 transformer lives in the three LoRA file layouts.

peft/diffusers name the layers of `Flux2Transformer2DModel` ("transformer_blocks.3.attn.to_k"); ComfyUI
and kohya/musubi-tuner name the layers of BFL's model ("double_blocks.3.img_attn.qkv", as
"diffusion_model.double_blocks.3.img_attn.qkv" and "lora_unet_double_blocks_3_img_attn_qkv"). The
mapping is not written a second time here: it is read from single_file's transformer table, the one
`transformer_to_bfl` converts whole models with, so a LoRA always lands where that layer's weight does.
Two of its rules change more than the name, and LoRAs follow them:
- part "q"/"k"/"v": the layer is one third of BFL's fused qkv Linear (rows q, then k, then v);
- part "swap": BFL stores the layer's output rows with their halves swapped (norm_out.linear).
Block indices are carried over from the names, never counted. A fused qkv layer gets one LoRA of rank 3r
that is exactly the sum of the three: A = cat(A_q, A_k, A_v), B = blockdiag(B_q, B_k, B_v).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..errors import ExportError
from ..models import TRANSFORMER_RENAMES, compile_template

PARTS = ("q", "k", "v")      # order of the thirds in a fused qkv layer, as transformer_to_bfl concatenates them
SWAP = "swap"
KOHYA_PREFIX = "lora_unet_"  # kohya's and musubi-tuner's prefix for the diffusion model's layers


class BflTarget(NamedTuple):
    module: str  # BFL module name, e.g. "double_blocks.3.img_attn.qkv"
    part: str    # "q" | "k" | "v" | "swap" | "" (the whole layer, unchanged)


def _linear_rules() -> list[tuple[str, str, str]]:
    """(diffusers module template, BFL module template, part) for every Linear layer: the table's rules that
    carry a `{p}` (weight or bias) slot. Norm scales have no `{p}` and are never LoRA targets."""
    rules = []
    for src, dst in TRANSFORMER_RENAMES:
        dst, _, part = dst.partition("#")
        if src.endswith(".{p}") and dst.endswith(".{p}"):
            rules.append((src[: -len(".{p}")], dst[: -len(".{p}")], part))
    return rules


_RULES = _linear_rules()
_TO_BFL = [(compile_template(src), dst, part) for src, dst, part in _RULES]
_BFL_TEMPLATES = list(dict.fromkeys(dst for _, dst, _ in _RULES))
_FROM_BFL = [(compile_template(dst), dst) for dst in _BFL_TEMPLATES]
_FROM_KOHYA = [(compile_template(dst.replace(".", "_")), dst) for dst in _BFL_TEMPLATES]


def bfl_target(module: str) -> BflTarget | None:
    """The BFL layer a diffusers layer belongs to, or None when `module` is no FLUX.2 Linear layer."""
    for pattern, dst, part in _TO_BFL:
        if m := pattern.fullmatch(module):
            return BflTarget(dst.format(**m.groupdict()), part)
    return None


def diffusers_modules(bfl_module: str) -> dict[str, str] | None:
    """{part: diffusers module} making up a BFL layer ({"q": ..., "k": ..., "v": ...} for a fused qkv, one entry
    with part "" or "swap" otherwise), or None when `bfl_module` is no FLUX.2 Linear layer."""
    for pattern, template in _FROM_BFL:
        if m := pattern.fullmatch(bfl_module):
            slots = m.groupdict()
            return {part: src.format(**slots) for src, dst, part in _RULES if dst == template}
    return None


def kohya_name(bfl_module: str) -> str:
    """"double_blocks.0.img_attn.qkv" -> "lora_unet_double_blocks_0_img_attn_qkv" (the name ComfyUI's key map
    and musubi-tuner give that layer)."""
    return KOHYA_PREFIX + bfl_module.replace(".", "_")


def bfl_from_kohya(name: str) -> str | None:
    """The inverse of kohya_name (underscores are ambiguous, so it matches the known layer templates)."""
    if not name.startswith(KOHYA_PREFIX):
        return None
    flat = name[len(KOHYA_PREFIX):]
    for pattern, template in _FROM_KOHYA:
        if m := pattern.fullmatch(flat):
            return template.format(**m.groupdict())
    return None


def fuse_qkv(bfl_module: str, parts: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """{part: (A (r, in), B (out, r))} for some of q, k, v -> (A (3r, in), B (3 out, 3r)) of the fused layer, exact;
    an untargeted part gets zero blocks."""
    if len({a.shape[0] for a, _ in parts.values()}) > 1:
        raise ExportError(f"cannot fuse the q/k/v LoRAs of {bfl_module!r}: their ranks differ; give them one rank")
    a0, b0 = next(iter(parts.values()))
    zeros = (torch.zeros_like(a0), torch.zeros_like(b0))
    downs, ups = zip(*(parts.get(p, zeros) for p in PARTS))
    return torch.cat(downs), torch.block_diag(*ups)


def split_qkv(where: str, down: torch.Tensor, up: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The exact inverse of fuse_qkv; a part that is zero in both matrices was not targeted and is left out.
    A fused LoRA whose B is not block-diagonal (trained on the fused layer) has no exact split: ExportError."""
    r, n = down.shape[0] // 3, up.shape[0] // 3
    off = [up[j * n:(j + 1) * n, k * r:(k + 1) * r] for j in range(3) for k in range(3) if j != k]
    if down.shape[0] % 3 or up.shape[0] % 3 or any(block.any() for block in off):
        raise ExportError(f"{where}: this qkv LoRA is not block-diagonal over q, k and v (it was trained on the fused "
                          "layer), so it cannot be split exactly into diffusers' to_q/to_k/to_v: use the file as it "
                          "is in ComfyUI, or export a LoRA trained by flux2-lora")
    parts = {p: (down[j * r:(j + 1) * r].clone(), up[j * n:(j + 1) * n, j * r:(j + 1) * r].clone())
             for j, p in enumerate(PARTS)}
    return {p: (a, b) for p, (a, b) in parts.items() if a.any() or b.any()}
