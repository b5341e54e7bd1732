"""Quantized transformer files, brought into the one fp8 layout diffusers can keep in fp8: BFL's "fp8r".

Users download FLUX.2 [dev] as fp8 because bf16 is 64 GB. Three fp8 layouts are in circulation:
BFL's fp8r (float8_e4m3fn weights with a per-row fp32 `weight_scale`, loaded by diffusers'
`BFLQuantizationConfig`), and ComfyUI's two "scaled fp8" layouts: the old one (a `scaled_fp8` marker
plus a scalar `.scale_weight` per layer) and the newer "mixed" one (a `.comfy_quant` JSON tensor or a
`_quantization_metadata` header naming each layer's format, plus a scalar `.weight_scale`). A
per-tensor scale is a per-row scale with every row equal, so the ComfyUI layouts convert into fp8r
exactly, and the weights stay fp8 in memory. Formats fp8r cannot express (mxfp8 block scales,
ComfyUI's nvfp4, int8, e5m2) are refused by name rather than approximated.
"""

from __future__ import annotations

import json
import logging

import torch

from ..errors import ModelError

log = logging.getLogger(__name__)

COMFY_FP8 = "float8_e4m3fn"  # the only ComfyUI per-layer format fp8r expresses exactly
_ADVICE = "use the bf16 file, or an fp8 file (ComfyUI fp8 scaled e4m3fn, or BFL fp8)"


def logical_shapes(shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str]) -> dict[str, tuple[int, ...]]:
    """Shapes as the model sees them: nvfp4 packs two values per byte, halving a weight's stored columns."""
    out = dict(shapes)
    for key, shape in shapes.items():
        if key.endswith(".weight") and dtypes.get(key) == "U8" and key[:-6] + "weight_scale_2" in shapes:
            out[key] = (shape[0], 2 * shape[1])
    return out


def _layer_formats(sd: dict, metadata: dict[str, str], prefix: str) -> dict[str, str]:
    """{layer: format} from every ComfyUI quantization marker, consuming the marker tensors."""
    layers: dict[str, str] = {}
    if "_quantization_metadata" in metadata:
        for name, conf in json.loads(metadata["_quantization_metadata"]).get("layers", {}).items():
            layers[name.removeprefix(prefix)] = conf.get("format", "?")
    if "scaled_fp8" in sd:  # the old layout: a marker whose dtype is the weights' fp8 type
        marker = sd.pop("scaled_fp8")
        fmt = "float8_e5m2" if marker.dtype == torch.float8_e5m2 else COMFY_FP8
        for key in [k for k in sd if k.endswith(".scale_weight")]:
            layer = key[: -len(".scale_weight")]
            sd[layer + ".weight_scale"] = sd.pop(key)
            layers[layer] = fmt
        for key in [k for k in sd if k.endswith(".scale_input")]:
            del sd[key]
    for key in [k for k in sd if k.endswith(".comfy_quant")]:
        conf = json.loads(bytes(sd.pop(key).tolist()).decode("utf-8"))
        layers[key[: -len(".comfy_quant")]] = conf.get("format", "?")
    return layers


def _per_row(scale: torch.Tensor, rows: int, where: str) -> torch.Tensor:
    scale = scale.float().reshape(-1)
    if scale.numel() == 1:
        return scale.expand(rows).contiguous()  # (rows,): the per-tensor scale on every row
    if scale.numel() == rows:
        return scale
    raise ModelError(f"{where}: weight_scale has {scale.numel()} values for {rows} rows; neither per-tensor nor "
                     f"per-row fp8 scaling, which is the only fp8 layout loaded here: {_ADVICE}")


def to_fp8r(sd: dict, metadata: dict[str, str], *, path, prefix: str = "") -> tuple[dict, str | None]:
    """Rewrite a state dict's quantized layers into diffusers' BFL layout, exactly.

    Returns (state dict, scheme) with scheme "fp8r", "nvfp4" (BFL's own nvfp4, passed through) or None
    when nothing is quantized. Unscaled fp8 weights get a scale of 1 per row.
    """
    layers = _layer_formats(sd, metadata, prefix)
    unsupported = sorted({fmt for fmt in layers.values() if fmt != COMFY_FP8})
    if unsupported:
        raise ModelError(f"{path}: ComfyUI-quantized layers in format {', '.join(unsupported)}, which cannot be "
                         f"loaded for training without changing the weights; {_ADVICE}")
    for layer in layers:
        weight = sd.get(layer + ".weight")
        if weight is None or weight.dtype != torch.float8_e4m3fn or weight.ndim != 2:
            found = "missing" if weight is None else f"{weight.dtype} {tuple(weight.shape)}"
            raise ModelError(f"{path}: layer {layer!r} is marked {COMFY_FP8} but its weight is {found}; "
                             f"the file is damaged or of an unknown layout: {_ADVICE}")
        sd.pop(layer + ".input_scale", None)  # activation scale for fp8 matmuls; not part of the weight's value
        scale = sd.pop(layer + ".weight_scale", torch.ones(()))
        sd[layer + ".weight_scale"] = _per_row(scale, weight.shape[0], f"{path}: {layer}")
    strange = [k for k in sd if k.endswith((".weight_scale_inv", ".scale_weight", ".scale_input"))]
    if strange:  # scales of a layout not handled here: reading their weights unscaled would be silently wrong
        raise ModelError(f"{path}: fp8 scales of an unknown layout ({', '.join(strange[:3])}); {_ADVICE}")
    for key, tensor in list(sd.items()):
        if tensor.dtype == torch.float8_e5m2:
            raise ModelError(f"{path}: {key!r} is float8_e5m2, which the fp8 layout loaded here (e4m3fn) cannot hold "
                             f"exactly; {_ADVICE}")
        if tensor.dtype in (torch.int8, torch.int32, torch.uint8) and not (
                key.endswith(".weight") and key[:-6] + "weight_scale_2" in sd):
            raise ModelError(f"{path}: {key!r} holds {tensor.dtype} values, an integer quantization this loader "
                             f"does not read; {_ADVICE}")
        if tensor.dtype != torch.float8_e4m3fn or key.endswith(".weight_scale"):
            continue
        layer = key[: -len(".weight")]
        if key.endswith(".weight") and tensor.ndim == 2:
            if layer + ".weight_scale" in sd:  # BFL fp8r: make the scale the (rows,) fp32 vector diffusers expects
                sd[layer + ".weight_scale"] = _per_row(sd[layer + ".weight_scale"], tensor.shape[0], f"{path}: {layer}")
            else:
                sd[layer + ".weight_scale"] = torch.ones(tensor.shape[0])
        else:
            sd[key] = tensor.float()  # an fp8 norm scale or vector: widening is exact
    scales = [k for k in sd if k.endswith(".weight_scale")]
    if not scales:
        return sd, None
    scheme = "nvfp4" if any(k.endswith(".weight_scale_2") for k in sd) else "fp8r"
    log.debug("%s: %d quantized layers (%s)", path, len(scales), scheme)  # per streamed layer: debug
    return sd, scheme


def dequantize(sd: dict, metadata: dict[str, str], *, dtype: torch.dtype, path, prefix: str = "") -> dict:
    """fp8 layers (any layout `to_fp8r` reads) as plain `dtype` weights with their scales applied.

    For the VAE, which only encodes (an fp8 VAE cast without its scales would silently produce garbage). The text
    encoder keeps its fp8 layers fp8 instead (encoder_memory.py: the [dev] encoder is 48 GB in bf16). One tensor
    is widened at a time, so peak memory stays near the file's size.
    """
    sd, scheme = to_fp8r(sd, metadata, path=path, prefix=prefix)
    if scheme == "nvfp4":
        raise ModelError(f"{path}: nvfp4 weights are read for the transformer only; {_ADVICE}")
    for key in [k for k in sd if k.endswith(".weight_scale")]:
        layer = key[: -len(".weight_scale")]
        scale = sd.pop(key)
        sd[layer + ".weight"] = (sd[layer + ".weight"].float() * scale[:, None]).to(dtype)  # (rows, cols)
    return sd
