"""Loading FLUX.2 from the formats users actually keep: diffusers folders and ComfyUI/BFL single files.

A [dev] user typically has three ComfyUI files (a bf16 or fp8 transformer, flux2-vae.safetensors and
the Mistral text encoder) and no diffusers folder; downloading 100 GB again in another layout is not
an option. So every component loads from either, always offline, into the same diffusers and
transformers classes: a single file and its diffusers twin give identical weights and outputs.

The VAE and text encoder are only needed to fill the latent cache; callers `release` them right
after. The text encoders are loaded by text_encoder_loading.py.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from ..errors import ConfigError, ModelError
from .devices import frozen, with_oom_retry
from .files import (
    TRANSFORMER_PREFIXES,
    VAE_PREFIXES,
    component_folder,
    count_blocks,
    identify,
    read_header,
)
from .quantization import dequantize, logical_shapes, to_fp8r
from .single_file import vae_to_diffusers
from .gguf import read_transformer_header
from .streaming import fill, fill_transformer, read_groups
from .variants import (
    FAMILIES,
    SHIPPED,
    Variant,
    detect_variant,
    vae_config_from_shapes,
)


log = logging.getLogger(__name__)

_FINGERPRINT_SAMPLES = 256


def _build(factory, states, *, dtype, device, where: str) -> torch.nn.Module:
    """Instantiate without allocating weights, then adopt the tensors of each state dict in `states` (cast)
    as the parameters: one group at a time, so a single file is never held whole (see streaming.py)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):  # buffers (RoPE frequencies, ...) are computed, keep them
        model = factory()
    return fill(model, states, dtype=dtype, device=device, where=where)


# ---------------------------------------------------------------------------------------------- transformer
def _check_requested(requested: str, detected: Variant) -> None:
    requested = (requested or "auto").strip().lower()
    if requested == "auto":
        return
    if requested not in (*SHIPPED, "custom", *FAMILIES):
        raise ConfigError([("model.variant", f"unknown variant {requested!r}: choose auto, "
                                             f"{', '.join(SHIPPED)}, dev or klein")])
    if requested not in (detected.name, detected.family):
        raise ModelError(f"{detected.source}: model.variant is {requested!r} but the weights are {detected.name} "
                         f"([{detected.family}], {detected.transformer_config['num_layers']} double / "
                         f"{detected.transformer_config['num_single_layers']} single blocks, joint_attention_dim "
                         f"{detected.joint_attention_dim}); set model.variant to auto or {detected.name}")


def _transformer_from_file(path: Path, requested: str, dtype, device, quantization: str = "none"):
    """Built on the meta device and filled layer by layer from the file (streaming.py), exactly as
    `Flux2Transformer2DModel.from_single_file` would from the whole file, fp8 layers kept in fp8."""
    from accelerate import init_empty_weights
    from diffusers import Flux2Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    file = read_transformer_header(path)
    prefix, shapes = file.select(TRANSFORMER_PREFIXES)
    kind, description = identify(shapes)
    if kind not in ("flux2_transformer", "flux2_transformer_diffusers"):
        raise ModelError(f"{path}: this is {description}, not a FLUX.2 transformer; set model.path to a FLUX.2 "
                         f"transformer (ComfyUI models/diffusion_models) or a FLUX.2 diffusers folder")
    dtypes = {k[len(prefix):]: v for k, v in file.dtypes.items() if k.startswith(prefix)}
    variant = detect_variant(logical_shapes(shapes, dtypes), source=str(path))
    _check_requested(requested, variant)
    with init_empty_weights():
        model = Flux2Transformer2DModel.from_config(variant.transformer_config)
    convert = convert_flux2_transformer_checkpoint_to_diffusers if kind == "flux2_transformer" else None
    from .quantized_linear import quantize_layers

    def on_group(names):
        quantize_layers(model, names, quantization)

    if file.raw_shapes:  # GGUF blocks: kept as the file's bytes (gguf.py)
        from .gguf import fill_gguf_transformer

        if str(quantization or "none").lower() != "none":
            log.info("%s: GGUF layers stay as the file has them; model.quantization=%s applies to its unquantized "
                     "block layers only", path, quantization)
        return fill_gguf_transformer(model, file, prefix, dtype=dtype, device=device, where=str(path),
                                     convert=convert, on_group=on_group), variant
    states = (to_fp8r(tensors, metadata, path=path, prefix=prefix) for tensors, metadata in read_groups(file, prefix))
    model = fill_transformer(model, states, dtype=dtype, device=device, where=str(path), convert=convert,
                             on_group=on_group)
    return model, variant


def _quantized_from_folder(folder: Path, variant: Variant, dtype, device, quantization: str):
    """A diffusers folder's shards read layer by layer, each group quantized as it lands (as a single file is):
    from_pretrained would first put the whole bf16 base on the device (64 GB for [dev])."""
    from accelerate import init_empty_weights
    from diffusers import Flux2Transformer2DModel

    from .quantized_linear import quantize_layers

    with init_empty_weights():
        model = Flux2Transformer2DModel.from_config(variant.transformer_config)
    files = [read_header(file, key="model.path") for file in sorted(folder.glob("*.safetensors"))]
    states = (to_fp8r(tensors, metadata, path=file.path) for file in files for tensors, metadata in read_groups(file))
    return fill_transformer(model, states, dtype=dtype, device=device, where=str(folder), convert=None,
                            on_group=lambda names: quantize_layers(model, names, quantization))


def load_transformer(path, *, variant: str = "auto", dtype: torch.dtype, device: torch.device,
                     quantization: str = "none"):
    """(Flux2Transformer2DModel, Variant) from a diffusers folder or a BFL/ComfyUI single file (bf16, BFL
    fp8r/nvfp4, ComfyUI scaled or mixed fp8), frozen, in eval mode. `quantization` (none | fp8 | nf4 | int8)
    stores the blocks' linears quantized, layer by layer as they load from a single file or a folder's shards (so
    the full-precision base never has to fit the device); fp8 files always compute through QuantizedLinear."""
    from diffusers import Flux2Transformer2DModel

    path = Path(path)
    if not path.exists():
        raise ModelError(f"model.path: {str(path)!r} does not exist")

    def load():
        if path.is_file():
            return _transformer_from_file(path, variant, dtype, device, quantization)
        folder, config = component_folder(path, "transformer", "model.path")
        if config.get("_class_name") != "Flux2Transformer2DModel":
            raise ModelError(f"{folder}: holds a {config.get('_class_name')}, not a Flux2Transformer2DModel")
        detected = detect_variant(config, source=str(folder))
        _check_requested(variant, detected)
        if str(quantization or "none").lower() != "none":  # streamed, so the bf16 base is never whole on the device
            return _quantized_from_folder(folder, detected, dtype, device, quantization), detected
        model = Flux2Transformer2DModel.from_pretrained(folder, torch_dtype=dtype, local_files_only=True,
                                                        use_safetensors=True)
        return model.to(device), detected

    model, detected = with_oom_retry(load, what="the transformer", path=path)
    log.info("loaded transformer %s (%s) from %s", detected.name, dtype, path)
    from .quantized_linear import quantize_transformer

    return frozen(quantize_transformer(model, quantization, dtype=dtype)), detected


def probe_variant(path, variant: str = "auto") -> Variant:
    """The transformer's Variant from its config.json or safetensors header alone, without loading weights:
    the latent cache needs the family (which text encoder, which prompt layout) before it loads anything."""
    path = Path(path)
    if path.is_file():
        file = read_transformer_header(path)
        prefix, shapes = file.select(TRANSFORMER_PREFIXES)
        dtypes = {k[len(prefix):]: v for k, v in file.dtypes.items() if k.startswith(prefix)}
        detected = detect_variant(logical_shapes(shapes, dtypes), source=str(path))
    else:
        folder, config = component_folder(path, "transformer", "model.path")
        detected = detect_variant(config, source=str(folder))
    _check_requested(variant, detected)
    return detected


# ---------------------------------------------------------------------------------------------- VAE
def load_vae(path, *, dtype: torch.dtype, device: torch.device):
    """AutoencoderKLFlux2 from a diffusers folder or a BFL/ComfyUI (LDM-named) single file, frozen."""
    from diffusers import AutoencoderKLFlux2

    path = Path(path)

    def load():
        if not path.is_dir():
            file = read_header(path, key="model.vae")
            prefix, shapes = file.select(VAE_PREFIXES)
            kind, description = identify(shapes)
            if kind != "flux2_vae":
                raise ModelError(f"{path}: this is {description}, not a FLUX.2 VAE; set model.vae to "
                                 f"flux2-vae.safetensors (ComfyUI models/vae) or a FLUX.2 vae/ folder")
            config = vae_config_from_shapes(shapes)
            n_up = count_blocks(shapes, "decoder.up.")  # file-wide: each streamed group needs it
            states = (vae_to_diffusers(dequantize(tensors, metadata, dtype=dtype, path=path, prefix=prefix), n_up)
                      for tensors, metadata in read_groups(file, prefix))
            return _build(lambda: AutoencoderKLFlux2.from_config(config), states, dtype=dtype, device=device,
                          where=str(path))
        folder, config = component_folder(path, "vae", "model.vae")
        if config.get("_class_name") != "AutoencoderKLFlux2":
            raise ModelError(f"{folder}: holds a {config.get('_class_name')}, not the FLUX.2 VAE (AutoencoderKLFlux2)")
        return AutoencoderKLFlux2.from_pretrained(folder, torch_dtype=dtype, local_files_only=True,
                                                  use_safetensors=True).to(device)

    vae = with_oom_retry(load, what="the VAE", path=path)
    log.info("loaded VAE (%s) from %s", dtype, path)
    return frozen(vae)


# ---------------------------------------------------------------------------------------------- identity
def weights_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 over every tensor's name, shape, dtype and up to 256 evenly spaced values.

    Cheap enough for each run (a few thousand values from a 64 GB model), and keys the latent cache:
    another model, or the same one in another dtype, never reuses stale entries, while a single file and
    its diffusers twin (same weights, same names once loaded) share them.
    """
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}\n".encode())
            if tensor.device.type == "meta" or not tensor.numel():
                continue
            flat = tensor.detach().reshape(-1)
            picks = flat[:: max(1, flat.numel() // _FINGERPRINT_SAMPLES)][:_FINGERPRINT_SAMPLES].to("cpu")
            digest.update(picks.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()

