"""Which layers of a FLUX.2 transformer get a LoRA, and adding it through peft.

Targets are resolved to full module names by walking the model, so the block counts and widths always
come from the loaded model's config (dev has 8 + 48 blocks, klein-4B 5 + 20, the tiny test models
2 + 2); nothing here knows a number of blocks. Full names also avoid peft's suffix matching, under
which a bare "to_out" hits the double blocks' `to_out` ModuleList and fails.

Presets:
- `attention`: every attention projection of the double blocks (image and text streams), and the
  single blocks' two layers, which carry their attention (to_qkv_mlp_proj is qkv fused with the MLP
  input, to_out the attention output fused with the MLP output).
- `attention_mlp` (default): the above plus the double blocks' feed-forwards, image and text.
Layers the exporters cannot write in a form ComfyUI loads (the shared modulation layers, the time and
guidance embedders, norm_out) are refused with an error rather than silently dropped from the file.
"""

from __future__ import annotations

import logging
import re

import torch

from ..errors import ConfigError

log = logging.getLogger(__name__)

_DOUBLE_ATTENTION = r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
_DOUBLE_MLP = r"transformer_blocks\.\d+\.(ff|ff_context)\.linear_(in|out)"
_SINGLE = r"single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out)"
PRESETS = {
    "attention": re.compile(rf"{_DOUBLE_ATTENTION}|{_SINGLE}"),
    "attention_mlp": re.compile(rf"{_DOUBLE_ATTENTION}|{_DOUBLE_MLP}|{_SINGLE}"),
}
# Layers a LoRA file cannot carry into ComfyUI (see FLUX2_FACTS.md, "LoRA targets").
_UNEXPORTABLE = re.compile(r"(.*\.)?(norm_out\..*|.*modulation.*|time_guidance_embed\..*)")


def _linear_names(model: torch.nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]


def resolve_targets(model: torch.nn.Module, targets: str) -> list[str]:
    """Full names of the Linear layers `targets` selects (a preset, 'name,name' suffixes or 'regex:...')."""
    spec = targets.strip()
    linears = _linear_names(model)
    if spec in PRESETS:
        chosen = [n for n in linears if PRESETS[spec].fullmatch(n)]
    elif spec.startswith("regex:"):
        try:
            pattern = re.compile(spec[len("regex:"):])
        except re.error as exc:
            raise ConfigError([("lora.targets", f"{spec!r} is not a valid regular expression: {exc}")]) from None
        chosen = [n for n in linears if pattern.fullmatch(n)]
    else:
        wanted = [w.strip() for w in spec.split(",") if w.strip()]
        chosen = [n for n in linears if any(n == w or n.endswith("." + w) for w in wanted)]
        unmatched = [w for w in wanted if not any(n == w or n.endswith("." + w) for n in linears)]
        if unmatched:
            raise ConfigError([("lora.targets", f"{', '.join(map(repr, unmatched))} match no Linear layer of the "
                                                f"transformer: use attention, attention_mlp, full names such as "
                                                f"'attn.to_q' or 'regex:<pattern>'")])
    if not chosen:
        raise ConfigError([("lora.targets", f"{spec!r} selects no Linear layer of the transformer: use "
                                            f"{' or '.join(PRESETS)}, module names or 'regex:<pattern>'")])
    refused = [n for n in chosen if _UNEXPORTABLE.fullmatch(n)]
    if refused:
        raise ConfigError([("lora.targets", f"{spec!r} selects {refused[0]!r}"
                                            f"{f' and {len(refused) - 1} more' if len(refused) > 1 else ''}: "
                                            "modulation, embedder and norm_out layers cannot be exported for ComfyUI; "
                                            "target attention and MLP layers")])
    return chosen


ADAPTER_TYPES = ("lora", "dora", "lokr", "loha")


def add_lora(transformer: torch.nn.Module, *, rank: int, alpha: float, dropout: float, targets: str,
             seed: int, adapter_name: str = "default", kind: str = "lora") -> list[str]:
    """Add a trainable adapter (float32 weights over a frozen base of any dtype); returns the targeted names.

    The adapter is initialised from `seed` (peft's inits: LoRA A Kaiming, B = 0; LoKr/LoHa one factor zero), so a
    fixed seed gives the same run whatever was drawn from the global generator before; every kind starts at no
    change. `kind` (lora.type): peft's LoRA, DoRA (LoRA plus a magnitude per output row, starting at the base rows'
    norms), LoKr (Kronecker product) or LoHa (Hadamard product), the latter two with lora.dropout as rank dropout.
    """
    from peft import LoHaConfig, LoKrConfig, LoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer

    names = resolve_targets(transformer, targets)
    if kind not in ADAPTER_TYPES:
        raise ConfigError([("lora.type", f"{kind!r} is not an adapter type: choose one of {', '.join(ADAPTER_TYPES)}")])
    if kind != "lora":   # DoRA normalises the base weight, LoKr/LoHa wrap plain Linears: not stored quantized
        quantized = next((n for n in names if type(transformer.get_submodule(n)) is not torch.nn.Linear), None)
        if quantized:
            raise ConfigError([("lora.type", f"{kind} needs plain weights, but {quantized} is stored quantized "
                                             "(model.quantization or a GGUF file): use lora.type=lora or a bf16 base")])
    if kind in ("lora", "dora"):
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=names,
                            init_lora_weights=True, use_dora=kind == "dora")
    else:
        config = (LoKrConfig if kind == "lokr" else LoHaConfig)(r=rank, alpha=alpha, rank_dropout=dropout,
                                                                target_modules=names, init_weights=True)
    transformer.add_adapter(config, adapter_name=adapter_name)
    for parameter in trainable_parameters(transformer):
        parameter.data = parameter.data.float()  # optimizer state and updates in fp32 over a bf16 or fp8 base
    # Initialised again now that the weights are fp32: peft draws them in the base layer's dtype, which for an
    # fp8 base leaves A with a handful of distinct values. Seeded here, so the init is the run's own.
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
        torch.manual_seed(seed)
        for module in transformer.modules():
            if not isinstance(module, BaseTunerLayer):
                continue
            if hasattr(module, "reset_lora_parameters") and adapter_name in module.lora_A:
                module.reset_lora_parameters(adapter_name, True)
            elif hasattr(module, "reset_adapter_parameters"):
                module.reset_adapter_parameters(adapter_name)
    log.info("%s rank %d, alpha %g on %d layers (%s), %.2fM trainable parameters", kind, rank, alpha, len(names),
             targets, sum(p.numel() for p in trainable_parameters(transformer)) / 1e6)
    return names


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# ---------------------------------------------------------------------------------------------- lora.init_from
def read_initial_lora(path) -> tuple[dict[str, torch.Tensor], int, float]:
    """(peft-named tensors, rank, alpha) of a LoRA to continue from, in any layout the exporters write (ComfyUI,
    diffusers, kohya; another tool's file at the scale its loaders apply). One rank for every layer: a LoRA with
    per-layer ranks cannot continue as one peft adapter."""
    from ..errors import ExportError
    from ..lora_files import read_lora

    try:
        state, rank, alpha, _ = read_lora(path)
    except ExportError as exc:
        raise ConfigError([("lora.init_from", str(exc))]) from None
    ranks = sorted({int(t.shape[0]) for k, t in state.items() if k.endswith("lora_A.weight")})
    if ranks != [rank]:
        raise ConfigError([("lora.init_from", f"{path}: its layers have ranks {ranks}: only a LoRA of one rank can "
                                              "be continued")])
    return state, rank, alpha


def load_initial_lora(transformer, state: dict[str, torch.Tensor], path, *, targets: str,
                      adapter_name: str = "default") -> None:
    """Put a read LoRA's layers into the freshly added adapter; layers the file lacks keep their new init (B = 0,
    so they start at no change). ConfigError, naming a layer, when the file does not fit this model or targets."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    current = get_peft_model_state_dict(transformer, adapter_name=adapter_name)
    problems = []
    for key, tensor in state.items():
        module = key.rsplit(".lora_", 1)[0]
        if key not in current and _has_module(transformer, module):
            problems.append(("lora.targets", f"{path} trains {module}, which lora.targets={targets!r} leaves out: "
                                             "widen lora.targets (e.g. attention_mlp, or the file's own layers)"))
        elif key not in current:
            problems.append(("lora.init_from", f"{path}: layer {module} is not in this model: the LoRA was trained "
                                               "for another FLUX.2 model"))
        elif tensor.shape != current[key].shape:
            problems.append(("lora.init_from", f"{path}: {key} is {tuple(tensor.shape)} but this model's is "
                                               f"{tuple(current[key].shape)}: the LoRA was trained for another "
                                               "FLUX.2 model"))
    if problems:
        raise ConfigError(problems[:5])
    current.update({k: t.to(current[k].dtype) for k, t in state.items()})
    with torch.no_grad():   # DoRA over a plain LoRA: magnitudes ||W + dW|| start it as the LoRA, not as the base
        for key in [k for k in current if k.endswith(".lora_magnitude_vector")]:
            module = key[:-len(".lora_magnitude_vector")]
            layer = transformer.get_submodule(module)
            current[key] = row_norms(layer, current[f"{module}.lora_B.weight"], current[f"{module}.lora_A.weight"],
                                     layer.scaling[adapter_name]).to(current[key].dtype)
    set_peft_model_state_dict(transformer, current, adapter_name=adapter_name)
    layers = len({k.rsplit(".lora_", 1)[0] for k in state})
    fresh = len({k.rsplit(".lora_", 1)[0] for k in current}) - layers
    log.info("LoRA continues from %s: %d layers as trained%s", path, layers, f", {fresh} new" if fresh else "")


def _has_module(model, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


# ---------------------------------------------------------------------------------------------- DoRA for ComfyUI
def row_norms(layer, lora_b=None, lora_a=None, scale: float = 1.0) -> torch.Tensor:
    """(out,) float32 CPU: the row norms of a layer's base weight W, or of W + scale B A, computed where W lies
    (on the GPU only the factors travel, and only the norms come back)."""
    weight = getattr(layer, "base_layer", layer).weight.detach()
    if lora_b is None:
        return weight.float().norm(dim=1).cpu()
    b, a = (t.to(weight.device, torch.float32) for t in (lora_b, lora_a))
    return (weight.float() + scale * b @ a).norm(dim=1).cpu()


def comfyui_dora(transformer, state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """A peft DoRA state made writable in ComfyUI's form: each layer's magnitude m replaced by the `dora_scale`
    ComfyUI's loader applies. peft computes m / ||W + dW|| (W + dW) row by row; ComfyUI computes
    dora_scale / ||W|| (W + dW) (its norm is the base row's), so dora_scale = m ||W|| / ||W + dW||, which needs the
    base weights: it is done here, where the model is. The other parts of a fused BFL qkv get ||W|| (no change).
    `state` may be any weights of this adapter (the EMA's too); `scale` is alpha / rank. A plain LoRA passes."""
    from ..lora_files import lora_keys

    magnitudes = [k for k in state if k.endswith(".lora_magnitude_vector")]
    if not magnitudes:
        return state
    out = {k: v for k, v in state.items() if k not in magnitudes}

    with torch.no_grad():
        for key in magnitudes:
            module = key[:-len(".lora_magnitude_vector")]
            layer = transformer.get_submodule(module)
            merged = row_norms(layer, state[f"{module}.lora_B.weight"], state[f"{module}.lora_A.weight"], scale)
            out[f"{module}.dora_scale"] = state[key].float().cpu() * row_norms(layer) / merged
            target = lora_keys.bfl_target(module)
            for sibling in (lora_keys.diffusers_modules(target.module) or {}).values():
                if f"{sibling}.dora_scale" not in out and f"{sibling}.lora_magnitude_vector" not in state:
                    out[f"{sibling}.dora_scale"] = row_norms(transformer.get_submodule(sibling))
    return out
