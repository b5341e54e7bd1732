"""Single files streamed into models layer by layer: peak host RAM is the model plus one layer, not the file.

A bf16 FLUX.2 [dev] transformer file is 64 GB. Reading it whole, converting it and then building the
model held two copies at once (~128 GB), more than most machines that can train it have. Here the model
is built on the meta device and filled one layer at a time (a layer's weight, bias, fp8 scale and
ComfyUI quantization marker together), each read from the file, run through the same conversions as a
whole file would be (renames, qkv splits, half swaps, fp8 scales) and handed to the model before the
next is read.

Every conversion this package applies works within one layer: a fused qkv is one tensor, the swapped
halves are one tensor, fp8 scales sit beside their weight, and the only file-wide facts (the VAE's
up-block count, the Mistral file layout, ComfyUI's `scaled_fp8` marker and `_quantization_metadata`)
are passed to each layer explicitly. So the loaded weights are bit-identical to converting the whole
file at once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator

import torch

from ..errors import ModelError
from .files import TensorFile, read_tensor

log = logging.getLogger(__name__)

_FILE_WIDE = ("scaled_fp8",)  # ComfyUI's old scaled-fp8 marker: it describes every layer, so each group gets it


def group_of(key: str) -> str:
    """The group a key is read with: its layer, the key less its last part ("img_in.weight_scale" -> "img_in")."""
    return key.rsplit(".", 1)[0]


def _group_metadata(metadata: dict[str, str], prefix: str, groups: list[str]) -> dict[str, dict[str, str]]:
    """Per group, the header metadata with `_quantization_metadata` cut to that group's layers.

    `to_fp8r` insists that every layer the metadata names has its weight at hand; a layer whose group the
    file lacks stays with the first group, so the same "marked but missing" error is raised as before.
    """
    if "_quantization_metadata" not in metadata or not groups:
        return {group: metadata for group in groups}
    conf = json.loads(metadata["_quantization_metadata"])
    layers: dict[str, dict] = {group: {} for group in groups}
    for name, layer in conf.get("layers", {}).items():
        group = group_of(name.removeprefix(prefix) + ".weight")
        layers[group if group in layers else groups[0]][name] = layer
    return {group: {**metadata, "_quantization_metadata": json.dumps({**conf, "layers": layers[group]})}
            for group in groups}


def read_groups(file: TensorFile, prefix: str = "", skip: tuple[str, ...] = ()) -> Iterator[tuple[dict, dict]]:
    """(tensors, metadata) per group of `file`'s keys under `prefix` (stripped), in file order.

    Keys in `skip` (after stripping) are never read. Only one group's tensors are alive per step unless
    the caller keeps them.
    """
    keys = [k for k in sorted(file.shapes, key=lambda k: file.offsets[k][0])
            if k.startswith(prefix) and k[len(prefix):] not in skip]
    wide = [k for k in keys if k[len(prefix):] in _FILE_WIDE]
    groups: dict[str, list[str]] = {}
    for key in keys:
        if key not in wide:
            groups.setdefault(group_of(key[len(prefix):]), []).append(key)
    metadata = _group_metadata(file.metadata, prefix, list(groups))
    with open(file.path, "rb") as handle:
        markers = {k[len(prefix):]: read_tensor(handle, file, k) for k in wide}
        for group, members in groups.items():
            tensors = dict(markers)
            tensors.update((k[len(prefix):], read_tensor(handle, file, k)) for k in members)
            yield tensors, metadata[group]


def check_complete(model: torch.nn.Module, loaded: set[str], unexpected: list[str], where: str) -> None:
    """Raise unless every parameter and buffer of `model` came from the file and nothing was left over."""
    missing = [k for k, v in model.state_dict().items()
               if k not in loaded and v.device.type == "meta" and not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ModelError(f"{where}: weights do not fit the model built from their shapes (missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]}); the file is damaged or not a FLUX.2 part")


def fill(model: torch.nn.Module, states: Iterator[dict], *, dtype: torch.dtype, device: torch.device,
         where: str) -> torch.nn.Module:
    """Adopt each state dict's tensors (cast to `dtype` if floating, moved to `device`) as `model`'s weights.

    `model` was built under `init_empty_weights`: each tensor replaces a meta placeholder (`assign=True`),
    so no weight is ever allocated twice.
    """
    loaded: set[str] = set()
    unexpected: list[str] = []
    for state in states:
        state = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in state.items()}
        result = model.load_state_dict(state, strict=False, assign=True)
        loaded.update(state)
        unexpected += result.unexpected_keys
    check_complete(model, loaded, unexpected, where)
    return model.to(device)


def fill_transformer(model, states: Iterator[tuple[dict, str | None]], *, dtype: torch.dtype, device: torch.device,
                     where: str, convert: Callable[[dict], dict] | None,
                     on_group: Callable[[set[str]], None] | None = None):
    """Load diffusers-named (after `convert`) groups into a meta-built Flux2Transformer2DModel, as
    `from_single_file` would for the whole dict: fp8r/nvfp4 layers become diffusers' BFL quantized
    Linears (kept in fp8, their scales alongside), everything else is cast to `dtype`.

    `states` yields (state dict in BFL fp8r layout, scheme) per group, as `to_fp8r` returns them.
    `on_group(module names)` runs once each group is in place (model.quantization quantizes it there).
    """
    from diffusers import BFLQuantizationConfig
    from diffusers.models.model_loading_utils import load_model_dict_into_meta
    from diffusers.quantizers import DiffusersAutoQuantizer

    quantizer = None
    loaded: set[str] = set()
    unexpected: list[str] = []
    expected = set(model.state_dict())
    n_quantized = 0
    for state, scheme in states:
        if scheme and quantizer is None:  # the first quantized group: from here on as with quantization_config
            quantizer = DiffusersAutoQuantizer.from_config(BFLQuantizationConfig(compute_dtype=dtype))
            quantizer.validate_environment()
        quantized = quantizer is not None and any(k.endswith(".weight_scale") for k in state)
        n_quantized += sum(k.endswith(".weight_scale") for k in state)
        if quantized:  # before renaming, as from_single_file does: qkv splits then carry their scale rows
            state = quantizer.maybe_update_state_dict(state)
        state = convert(state) if convert else state
        if quantized:
            quantizer.preprocess_model(model=model, device_map=None, state_dict=state, keep_in_fp32_modules=[])
        extra = [k for k in state if k not in expected]
        load_model_dict_into_meta(model, state, dtype=dtype, device_map={"": device}, hf_quantizer=quantizer,
                                  keep_in_fp32_modules=[], unexpected_keys=extra)
        loaded.update(state)
        unexpected += extra
        if on_group is not None:
            on_group({key.rpartition(".")[0] for key in state if key not in extra})
    check_complete(model, loaded, unexpected, where)
    if quantizer is not None:
        log.info("%s: %d quantized layers, kept quantized", where, n_quantized)
        quantizer.postprocess_model(model)
        model.hf_quantizer = quantizer
    else:  # as from_single_file does (non-persistent buffers too), without ModelMixin.to's fp32-modules warning
        torch.nn.Module.to(model, dtype)
    return model.eval()
