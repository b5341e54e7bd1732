"""Fitting the [dev] text encoder (Mistral Small 3.x, 24 B parameters, ~48 GB in bf16) into a 24 GB GPU.

The text encoder only runs while the latent cache is filled, once per caption, so it can trade speed for
memory in two ways, alone or together:
- quantized linears (`model.text_encoder_quantization`): every decoder-layer Linear stored fp8 / int8 (1 byte a
  weight, ~24 GB) or nf4 (~0.5 byte, ~13 GB), each quantized as its layer arrives from the file, so the
  full-precision encoder is never whole on the device. An fp8 file (ComfyUI's mistral_3_small_flux2_fp8) keeps
  its fp8 values as they are: widening them to bf16 doubled the memory and changed nothing in the result.
- layer offload (`cache.text_encoder_offload`): the weights stay in host memory (pinned on CUDA) and each
  decoder layer is copied to the device just before it runs, the next one prefetched on a side stream while
  the current one computes. This is diffusers' block-level group offloading, which works on any nn.Module
  whose layers sit in a ModuleList (MistralModel.layers, Qwen3Model.layers).

The encoders use the engine's QuantizedLinear (quantized_linear.py), the same module the transformer trains over.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch

from ..errors import ConfigError
from .quantized_linear import SCHEMES, QuantizedLinear

log = logging.getLogger(__name__)

QUANTIZATIONS = ("none", *SCHEMES)
OFFLOADS = ("auto", "none", "layers")
_MARGIN = 3 << 30  # bytes kept free by "auto": activations of a 512-token batch, the 41 hidden states kept, CUDA's own
_BYTES = {"fp8": 1.0, "int8": 1.0, "nf4": 0.5 + 4 / 64}  # per weight value, nf4 with its fp32 scale per 64 values


def check_text_quantization(scheme: str) -> str:
    scheme = str(scheme or "none").strip().lower()
    if scheme not in QUANTIZATIONS:
        raise ConfigError([("model.text_encoder_quantization",
                            f"{scheme!r} is not a quantization: use {', '.join(QUANTIZATIONS)}")])
    return scheme


def check_text_offload(offload: str) -> str:
    offload = str(offload or "auto").strip().lower()
    if offload not in OFFLOADS:
        raise ConfigError([("cache.text_encoder_offload", f"{offload!r} is not an offload mode: use "
                                                          f"{', '.join(OFFLOADS)}")])
    return offload


def _replace(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _fp8_linear(model, layer: str, state: dict, scheme: str, dtype: torch.dtype, device) -> bool:
    """Make `layer` (a meta Linear) the QuantizedLinear holding the file's fp8 weight and per-row scale, popped from
    `state`; requantized to int8 / nf4 when asked. False when `layer` is not a Linear (say an fp8 embedding)."""
    try:
        linear = model.get_submodule(layer)
    except AttributeError:
        return False
    if type(linear) is not torch.nn.Linear:
        return False
    weight, scale = state.pop(layer + ".weight").to(device), state.pop(layer + ".weight_scale").to(device)
    bias = state.pop(layer + ".bias", None)
    bias = None if bias is None else bias.to(device=device, dtype=dtype)
    new = QuantizedLinear(linear.in_features, linear.out_features, scheme="fp8", weight=weight, weight_scale=scale,
                          bias=bias, compute_dtype=dtype)  # the file's values, no rounding
    if scheme in ("int8", "nf4"):
        new.weight = torch.nn.Parameter(new.dequantized(torch.float32), requires_grad=False)
        new = QuantizedLinear.from_linear(new, scheme)
        new.compute_dtype = dtype
    _replace(model, layer, new)
    return True


def _quantize_loaded(model: torch.nn.Module, names: set[str], scheme: str) -> None:
    """Quantize the named Linears whose full-precision weights have just been put in place."""
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        if type(module) is torch.nn.Linear and module.weight.device.type != "meta":
            _replace(model, name, QuantizedLinear.from_linear(module, scheme))


def adopt_layers(model: torch.nn.Module, states: Iterator[dict], *, scheme: str, dtype: torch.dtype,
                 device: torch.device) -> Iterator[dict]:
    """The state dicts `streaming.fill` loads into the meta-built `model`, less their fp8 layers, which become
    QuantizedLinears here; with `scheme` != none, each group's full-precision Linears are quantized as soon as fill
    has put them in place (this generator resumes right after), so one layer at a time is ever full precision.

    `states` carry fp8 layers as `to_fp8r` leaves them: float8_e4m3fn `.weight` and fp32 (rows,) `.weight_scale`.
    An fp8 tensor that is not a Linear's weight is widened to `dtype` with its scale, exactly as before.
    """
    n_fp8 = 0
    for state in states:
        for key in [k for k in state if k.endswith(".weight_scale")]:
            layer = key[: -len(".weight_scale")]
            if _fp8_linear(model, layer, state, scheme, dtype, device):
                n_fp8 += 1
            else:
                scale = state.pop(key)
                state[layer + ".weight"] = (state[layer + ".weight"].float() * scale[:, None]).to(dtype)  # (rows, cols)
        yield state
        if scheme != "none":
            _quantize_loaded(model, {key.rpartition(".")[0] for key in state}, scheme)
    if n_fp8 or scheme != "none":
        n_quantized = sum(isinstance(m, QuantizedLinear) for m in model.modules())
        log.info("text encoder: %d linears quantized (%d kept fp8 from the file, %s asked)", n_quantized, n_fp8,
                 scheme)


def weight_bytes(model: torch.nn.Module, *, scheme: str, dtype: torch.dtype, fp8_file: bool) -> int:
    """The bytes the loaded encoder's weights will take, from the meta-built model alone (nothing read yet)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    linear = _BYTES.get(scheme, 1.0 if fp8_file else itemsize)
    total = 0.0
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            total += param.numel() * (linear if type(module) is torch.nn.Linear and name == "weight" else itemsize)
    return int(total)


def choose_offload(requested: str, nbytes: int, device: torch.device) -> str:
    """none | layers: "auto" offloads on CUDA when the weights would not leave `_MARGIN` of the free memory."""
    requested = check_text_offload(requested)
    if requested != "auto":
        return requested
    if device.type != "cuda":
        return "none"  # on the CPU the weights are in host memory anyway; MPS shares it
    free, _ = torch.cuda.mem_get_info(device)
    chosen = "layers" if nbytes > free - _MARGIN else "none"
    log.info("text encoder: %.1f GB of weights, %.1f GB free on %s: offload %s", nbytes / 1e9, free / 1e9, device,
             chosen)
    return chosen


def offload_layers(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Keep `model`'s weights where they are (host memory) and bring each decoder layer to `device` just before it
    runs. On CUDA the copies run on a side stream from pinned memory, the next layer's overlapping this one's
    compute; elsewhere they are plain copies (on the CPU, onto the CPU: the same hooks, nothing moves)."""
    from diffusers.hooks import apply_group_offloading

    stream = device.type == "cuda"
    apply_group_offloading(model, onload_device=device, offload_device=torch.device("cpu"),
                           offload_type="block_level", num_blocks_per_group=1, use_stream=stream,
                           non_blocking=stream)
    log.info("text encoder: layers offloaded to host memory, one at a time on %s", device)
    return model


def remove_offload(model: torch.nn.Module) -> None:
    """Undo `offload_layers`: the hooks go, and with them the pinned host copies they hold."""
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is None:
            continue
        for name in list(registry.hooks):
            group = getattr(registry.hooks[name], "group", None)
            if group is not None:
                group.cpu_param_dict = {}
            registry.remove_hook(name, recurse=False)
        del module._diffusers_hook
