"""A frozen, quantized Linear that a LoRA trains over: fp8 (BFL fp8r), NF4 and int8 in one module.

Why not diffusers' own BFL fp8 linear: on compute capability >= 8.9 it runs `torch._scaled_mm`, which
has no backward, so training crashes; elsewhere it calls `F.linear` on a dequantized bf16 weight, which
autograd keeps alive for backward, so the fp8 file saves no memory at all while training. Here the
forward dequantizes one layer at a time into a temporary, and `_FrozenQuantizedLinear` saves only the
quantized weight and its scales; backward dequantizes again to compute the input gradient
(grad_x = grad_y @ W). The base weight is frozen, so no weight gradient is ever formed.

Layouts (`weight` holds the quantized values, `weight_scale` the fp32 scales):
- fp8:  float8_e4m3fn (out, in), one scale per row: exactly BFL's fp8r, which fp8 files load as.
- int8: int8 (out, in), per-row absmax / 127.
- nf4:  the flattened weight in 64-value blocks, one absmax per block, each value the nearest of the 16
        NF4 levels (bitsandbytes' codebook), two 4-bit codes per byte, first value in the high nibble.
- GGUF (scheme Q8_0, Q4_K, ...): a GGUF file's blocks as they are, (out, bytes per row) uint8, scales inside
        them (`weight_scale` empty); see gguf.py and ggml_quants.py.
The nf4 layout is bitsandbytes' own (`quantize_4bit(blocksize=64, quant_type="nf4")` gives the same bytes and
absmax): on a CUDA device with bitsandbytes installed, its fused kernel decodes; everywhere else (CPU, ROCm or
Apple builds without it) the pure-torch path here computes the same values, so every mode runs (and is tested)
on the CPU. The module subclasses torch.nn.Linear, so peft wraps it as any Linear; the LoRA weights stay fp32.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from . import ggml_quants

log = logging.getLogger(__name__)

SCHEMES = ("fp8", "nf4", "int8")
FP8_MAX = 448.0  # largest finite float8_e4m3fn
NF4_BLOCK = 64  # values per absmax scale, as bitsandbytes' default blocksize for NF4
# bitsandbytes' NF4 levels (the quantiles of a unit normal, normalised to [-1, 1]), indexed by the 4-bit code.
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)


def _check_scheme(scheme: str, *, gguf: bool = False) -> str:
    if scheme not in SCHEMES and not (gguf and scheme in ggml_quants.TYPES):
        raise ConfigError([("model.quantization", f"{scheme!r} is not a quantization: use none, {', '.join(SCHEMES)}")])
    return scheme


def quantize(weight: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(quantized values, fp32 scales) of a (out, in) weight, in the layout `scheme` names (see the module doc)."""
    weight = weight.detach().float()
    if _check_scheme(scheme) == "fp8":
        scale = (weight.abs().amax(dim=1) / FP8_MAX).clamp(min=1e-12)  # (out,)
        return (weight / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale
    if scheme == "int8":
        scale = (weight.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # (out,)
        return (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale
    flat = weight.reshape(-1)
    flat = F.pad(flat, (0, -flat.numel() % NF4_BLOCK)).reshape(-1, NF4_BLOCK)  # (blocks, 64)
    scale = flat.abs().amax(dim=1).clamp(min=1e-12)  # (blocks,)
    levels = torch.tensor(NF4_LEVELS, device=weight.device)
    # The nearest level, through the 15 midpoints: no (values, 16) distance matrix for a 100M-value weight.
    codes = torch.bucketize(flat / scale[:, None], (levels[1:] + levels[:-1]) / 2).to(torch.uint8).reshape(-1)
    return (codes[0::2] << 4) | codes[1::2], scale  # (padded numel / 2,) uint8


def dequantize(qweight: torch.Tensor, scale: torch.Tensor, scheme: str, shape: tuple[int, int],
               dtype: torch.dtype) -> torch.Tensor:
    """The (out, in) weight in `dtype` that `quantize` stands for (or a GGUF file's blocks, ggml_quants.py)."""
    if scheme in ggml_quants.TYPES:
        return ggml_quants.dequantize(qweight, scheme, shape, dtype)
    if scheme in ("fp8", "int8"):   # in place: one fp32 temporary of the layer, not two, next to the result
        return qweight.float().mul_(scale[:, None]).to(dtype)
    if qweight.is_cuda and _bitsandbytes() is not None:
        return bitsandbytes_nf4(qweight, scale, shape, dtype)
    codes = torch.stack([qweight >> 4, qweight & 0x0F], dim=-1).reshape(-1, NF4_BLOCK).int()  # (blocks, 64); not
    # int64: the index would be the largest temporary of a big layer's dequantization
    levels = torch.tensor(NF4_LEVELS, device=qweight.device)
    values = (levels[codes] * scale[:, None]).reshape(-1)[: shape[0] * shape[1]]
    return values.reshape(shape).to(dtype)


@functools.cache
def _bitsandbytes():
    """bitsandbytes' functional module, or None where it is not installed or cannot load (no wheel, no GPU build)."""
    try:
        import bitsandbytes.functional as bnb_functional
    except Exception as exc:  # noqa: BLE001 - any failure to load means: decode in pure torch
        log.info("bitsandbytes unavailable (%s): NF4 decodes in pure torch", str(exc).splitlines()[0] if str(exc)
                 else type(exc).__name__)
        return None
    return bnb_functional


def bitsandbytes_nf4(qweight: torch.Tensor, scale: torch.Tensor, shape: tuple[int, int],
                     dtype: torch.dtype) -> torch.Tensor:
    """`dequantize` for nf4 through bitsandbytes' kernel (the layouts are the same; see the module doc)."""
    bnb = _bitsandbytes()
    state = bnb.QuantState(absmax=scale, shape=torch.Size(shape), blocksize=NF4_BLOCK, quant_type="nf4", dtype=dtype,
                           code=bnb.get_4bit_type("nf4", device=qweight.device))
    return bnb.dequantize_4bit(qweight.reshape(-1, 1), state)


class _FrozenQuantizedLinear(torch.autograd.Function):
    """y = x W^T + b over a quantized W, saving W quantized (never its dequantized copy) for backward."""

    @staticmethod
    def forward(ctx, x, qweight, scale, bias, scheme, shape):
        ctx.save_for_backward(qweight, scale)
        ctx.scheme, ctx.shape = scheme, shape
        return F.linear(x, dequantize(qweight, scale, scheme, shape, x.dtype), bias)  # (..., out)

    @staticmethod
    def backward(ctx, grad):
        qweight, scale = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ dequantize(qweight, scale, ctx.scheme, ctx.shape, grad.dtype)  # (..., out) @ (out, in)
        if ctx.needs_input_grad[3]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, None, None, grad_bias, None, None


class QuantizedLinear(torch.nn.Linear):
    """A frozen Linear whose weight is stored quantized; computes in `compute_dtype` (or the autocast dtype)."""

    def __init__(self, in_features: int, out_features: int, *, scheme: str, weight: torch.Tensor,
                 weight_scale: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype):
        torch.nn.Module.__init__(self)  # not nn.Linear's __init__: it would allocate a full-precision weight
        self.in_features, self.out_features = in_features, out_features
        self.scheme, self.compute_dtype = _check_scheme(scheme, gguf=True), compute_dtype
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.register_buffer("weight_scale", weight_scale)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, scheme: str) -> "QuantizedLinear":
        """Quantize a full-precision Linear (its bias stays as it is)."""
        qweight, scale = quantize(linear.weight, scheme)
        return cls(linear.in_features, linear.out_features, scheme=scheme, weight=qweight, weight_scale=scale,
                   bias=None if linear.bias is None else linear.bias.detach(), compute_dtype=linear.weight.dtype)

    @classmethod
    def from_fp8r(cls, linear: torch.nn.Linear, compute_dtype: torch.dtype) -> "QuantizedLinear":
        """Adopt a diffusers BFL fp8r linear's tensors as they are: no copy, no rounding."""
        return cls(linear.in_features, linear.out_features, scheme="fp8", weight=linear.weight.detach(),
                   weight_scale=linear.weight_scale, bias=None if linear.bias is None else linear.bias.detach(),
                   compute_dtype=compute_dtype)

    def _apply(self, fn, recurse=True):
        """Moves reach the stored weight and its scales, casts do not: `model.to(torch.bfloat16)` (which a streamed
        load ends with) would widen an fp8 weight, a floating tensor to torch, back to bf16 and round the fp32
        scales to bf16. As bitsandbytes' Params4bit keep their absmax, these keep their dtypes."""
        weight, scale = self.weight.data, self.weight_scale   # .data: _apply converts the Parameter in place
        super()._apply(fn, recurse)
        moved = fn(weight)
        self.weight.data = moved if moved.dtype == weight.dtype else weight.to(moved.device)
        moved = fn(scale)
        self._buffers["weight_scale"] = moved if moved.dtype == scale.dtype else scale.to(moved.device)
        return self

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self.weight, self.weight_scale, self.scheme, (self.out_features, self.in_features),
                          dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kind = x.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else self.compute_dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        with torch.autocast(kind, enabled=False):  # the dtype is chosen above; autocast must not re-cast inside
            return _FrozenQuantizedLinear.apply(x.to(dtype), self.weight, self.weight_scale, bias, self.scheme,
                                                (self.out_features, self.in_features))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scheme={self.scheme}, compute_dtype={self.compute_dtype}"


def _blocks_linear(name: str) -> bool:
    """The blocks' layers hold nearly all the weights; embedders, modulation and the output layers stay as loaded
    (as in BFL's and ComfyUI's fp8 files), where quantization would cost quality for little memory."""
    return name.startswith(("transformer_blocks.", "single_transformer_blocks."))


def quantize_layers(model: torch.nn.Module, names, scheme: str) -> None:
    """Quantize the named modules that are the blocks' full-precision linears, right after a streamed load put
    their weights in place: the device then holds the quantized model and one layer at full precision, never the
    whole full-precision base (a bf16 [dev] needs 64 GB; NF4 about 17). Others are left to quantize_transformer."""
    scheme = str(scheme or "none").strip().lower()
    if scheme == "none":
        return
    _check_scheme(scheme)
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        loaded = all(p.device.type != "meta" for p in module.parameters(recurse=False))
        if type(module) is torch.nn.Linear and _blocks_linear(name) and loaded:
            parent, _, child = name.rpartition(".")
            quantized = QuantizedLinear.from_linear(module, scheme)
            setattr(model.get_submodule(parent) if parent else model, child, quantized)


def quantize_transformer(model: torch.nn.Module, scheme: str, *, dtype: torch.dtype) -> torch.nn.Module:
    """Swap the model's linears for QuantizedLinear, in place, one layer at a time (peak: one layer's copy).

    scheme "none" still replaces diffusers' fp8r linears (of an fp8 file) by fp8 QuantizedLinears holding the
    same tensors, so `torch._scaled_mm` is never on the training path; "fp8" / "nf4" / "int8" also quantize the
    blocks' full-precision linears. An fp8 file asked for nf4 or int8 is requantized from its fp8 values.
    """
    from diffusers.quantizers.bfl.utils import BFLFP8RLinear

    scheme = str(scheme or "none").strip().lower()
    if scheme != "none":
        _check_scheme(scheme)
    counts = {"fp8 file": 0, scheme: 0}
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedLinear):
            continue
        if isinstance(module, BFLFP8RLinear):
            new = QuantizedLinear.from_fp8r(module, dtype)
            if scheme not in ("none", "fp8"):
                new.weight = torch.nn.Parameter(new.dequantized(torch.float32), requires_grad=False)
                new = QuantizedLinear.from_linear(new, scheme)
                new.compute_dtype = dtype
                counts[scheme] += 1
            else:
                counts["fp8 file"] += 1
        elif type(module) is torch.nn.Linear and scheme != "none" and _blocks_linear(name):
            new = QuantizedLinear.from_linear(module, scheme)
            counts[scheme] += 1
        else:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    if any(counts.values()):
        log.info("quantized linears: %s", ", ".join(f"{n} {k}" for k, n in counts.items() if n))
    return model
