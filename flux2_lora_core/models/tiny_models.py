"""Tiny, randomly initialised FLUX.2 models that have the real architecture: the test and demo stand-ins.

CI has two CPU cores and no model hub, yet every test should run real diffusers / transformers / peft
code on a real FLUX.2 graph. So each component keeps the shipped real config and changes only sizes:
the transformer keeps head dim 128, in_channels 128, mlp ratio 3 and the 4-axis RoPE (ComfyUI derives
its head count as hidden / 128); the text encoders keep enough layers for the pipelines' hidden-state
taps to stay intermediate layers; the VAE keeps its block layout, 32 latent channels and the latent
BatchNorm. A whole pipeline builds in well under a second and runs at the pipelines' default 512 tokens.

`write_tiny_model` saves one either as a diffusers pipeline folder or as the ComfyUI-style single files
(same weights) that users keep in ComfyUI's models/ folders.
"""

from __future__ import annotations

import json
import logging
import zlib
from pathlib import Path

import torch

from .. import __version__
from ..errors import ConfigError
from .tokenizer import build_tokenizer
from .variants import shipped_config

log = logging.getLogger(__name__)

VARIANTS = ("klein", "dev")
FORMATS = ("diffusers", "comfyui")

# Which shipped real config each tiny variant shrinks.
REAL_TRANSFORMER_CONFIG = {"klein": "flux2-klein-4b", "dev": "flux2-dev"}
TOKENIZER_STYLE = {"klein": "qwen3", "dev": "mistral3"}

# Tiny sizes; everything not listed comes from the real configs.
TINY_DOUBLE_BLOCKS = 2          # real: 5 (klein 4B) / 8 (dev)
TINY_SINGLE_BLOCKS = 2          # real: 20 / 48
TINY_HEADS = 1                  # x 128 head dim = inner 128 (real: 24 / 48 heads)
TINY_TEXT_HIDDEN = 32           # real: 2560 (Qwen3-4B) / 5120 (Mistral-Small); joint_attention_dim = 3x this
TINY_TEXT_HEADS = 2             # head dim 16, grouped-query attention kept: 2 query heads share 1 kv head
TINY_TEXT_KV_HEADS = 1
TINY_TEXT_INTERMEDIATE = 64
TINY_QWEN3_LAYERS = 28          # > 27: klein reads hidden_states[9, 18, 27], all intermediate (real: 36)
TINY_MISTRAL3_LAYERS = 31       # > 30: dev reads hidden_states[10, 20, 30], all intermediate (real: 40)
TINY_TEXT_MAX_POSITIONS = 2048  # room for the pipelines' 512-token prompts
TINY_VAE_CHANNELS = (32, 32, 64, 64)  # real: (128, 256, 512, 512); 32 groups still divide them

# Where write_tiny_model(fmt="comfyui") puts each component, named like ComfyUI's models/ sub-folders.
COMFYUI_FILES = {
    "klein": {"transformer": "diffusion_models/flux2-klein-tiny.safetensors",
              "vae": "vae/flux2-vae-tiny.safetensors",
              "text_encoder": "text_encoders/qwen3-tiny.safetensors",
              "tokenizer": "tokenizer"},
    "dev": {"transformer": "diffusion_models/flux2-dev-tiny.safetensors",
            "vae": "vae/flux2-vae-tiny.safetensors",
            "text_encoder": "text_encoders/mistral3-tiny.safetensors",
            "tokenizer": "tokenizer"},
}
# safetensors header keys written into every tiny single file.
METADATA_PREFIX = "flux2_lora."


def _check(variant: str, fmt: str | None = None) -> None:
    problems = []
    if variant not in VARIANTS:
        problems.append(("variant", f"unknown tiny-model variant {variant!r}: choose one of {', '.join(VARIANTS)}"))
    if fmt is not None and fmt not in FORMATS:
        problems.append(("format", f"unknown tiny-model format {fmt!r}: choose one of {', '.join(FORMATS)}"))
    if problems:
        raise ConfigError(problems)


def tiny_transformer_config(variant: str, text_hidden: int = TINY_TEXT_HIDDEN) -> dict:
    """The real variant's transformer config with only the sizes shrunk."""
    _check(variant)
    config = shipped_config(REAL_TRANSFORMER_CONFIG[variant], "transformer")
    config.update(num_layers=TINY_DOUBLE_BLOCKS, num_single_layers=TINY_SINGLE_BLOCKS,
                  num_attention_heads=TINY_HEADS, joint_attention_dim=3 * text_hidden)
    return config


def tiny_vae_config() -> dict:
    """The real AutoencoderKLFlux2 config with narrower blocks (norm_num_groups 32 still divides them)."""
    config = shipped_config("flux2-vae")
    config.update(block_out_channels=list(TINY_VAE_CHANNELS))
    return config


def tiny_text_encoder_config(variant: str, tokenizer):
    """A transformers config for Qwen3-4B ([klein]) or Mistral-Small-3.x ([dev]), shrunk, sized to `tokenizer`."""
    from transformers import Mistral3Config, MistralConfig, PixtralVisionConfig, Qwen3Config

    _check(variant)
    sizes = dict(vocab_size=len(tokenizer), hidden_size=TINY_TEXT_HIDDEN, intermediate_size=TINY_TEXT_INTERMEDIATE,
                 num_attention_heads=TINY_TEXT_HEADS, num_key_value_heads=TINY_TEXT_KV_HEADS,
                 head_dim=TINY_TEXT_HIDDEN // TINY_TEXT_HEADS, max_position_embeddings=TINY_TEXT_MAX_POSITIONS,
                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if variant == "klein":  # Qwen3-4B: tied embeddings, q/k norms, rope theta 1e6, eps 1e-6, BOS id = <|endoftext|>
        return Qwen3Config(**sizes, bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
                           num_hidden_layers=TINY_QWEN3_LAYERS, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                           tie_word_embeddings=True, attention_bias=False)
    # Mistral-Small-3.x: rope theta 1e9, eps 1e-5, untied head, a Pixtral vision tower the prompts never reach.
    text = MistralConfig(**sizes, bos_token_id=tokenizer.bos_token_id, num_hidden_layers=TINY_MISTRAL3_LAYERS,
                         rope_theta=1_000_000_000.0, rms_norm_eps=1e-5, sliding_window=None, tie_word_embeddings=False)
    vision = PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 image_size=56, patch_size=14)
    image_token = tokenizer.convert_tokens_to_ids("[IMG]")
    return Mistral3Config(text_config=text, vision_config=vision, image_token_index=image_token, spatial_merge_size=2,
                          multimodal_projector_bias=False, projector_hidden_act="gelu", vision_feature_layer=-1,
                          tie_word_embeddings=False)


def _seed(seed: int, component: str) -> None:
    """Each component draws from its own stream, so resizing one never changes the others' weights."""
    torch.manual_seed(zlib.crc32(f"{seed}:{component}".encode()))


@torch.no_grad()
def _vary_constant_parameters(module: torch.nn.Module) -> None:
    """Give every parameter initialised to a constant (norm scales 1, biases 0) seeded noise.

    With all norm scales equal, a conversion that swapped two of them (query/key norm, say) would go
    unnoticed; with distinct values every key mapping is tested.
    """
    for param in module.parameters():
        flat = param.flatten()
        if flat.numel() and bool((flat == flat[0]).all()):
            param.add_(0.1 * torch.randn_like(param))


def build_tiny_pipeline(variant: str = "klein", seed: int = 0):
    """A fp32 CPU Flux2KleinPipeline (`is_distilled=False`) or Flux2Pipeline, in eval mode.

    The same seed gives bit-identical weights; the caller's global RNG state is left untouched.
    """
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Pipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Mistral3ForConditionalGeneration, Qwen3ForCausalLM

    _check(variant)
    tokenizer = build_tokenizer(TOKENIZER_STYLE[variant], model_max_length=TINY_TEXT_MAX_POSITIONS)
    with torch.random.fork_rng(devices=[]):
        _seed(seed, "transformer")
        transformer = Flux2Transformer2DModel.from_config(tiny_transformer_config(variant))
        _vary_constant_parameters(transformer)
        _seed(seed, "vae")
        vae = AutoencoderKLFlux2.from_config(tiny_vae_config())
        _vary_constant_parameters(vae)
        channels = vae.bn.num_features  # 4 * latent_channels: the BatchNorm sees 2x2-patchified latents
        vae.bn.running_mean.copy_(0.2 * torch.randn(channels))
        vae.bn.running_var.copy_(torch.empty(channels).uniform_(0.5, 2.0))
        _seed(seed, "text_encoder")
        config = tiny_text_encoder_config(variant, tokenizer)
        text_encoder = (Qwen3ForCausalLM if variant == "klein" else Mistral3ForConditionalGeneration)(config)
        _vary_constant_parameters(text_encoder)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(shipped_config(REAL_TRANSFORMER_CONFIG[variant],
                                                                           "scheduler"))
    for model in (transformer, vae, text_encoder):
        model.eval()
    parts = dict(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
    if variant == "klein":
        return Flux2KleinPipeline(**parts, is_distilled=False)
    return Flux2Pipeline(**parts)


def _metadata(variant: str, seed: int, component: str, layout: str, config: dict | str) -> dict[str, str]:
    """What a loader needs to rebuild the tiny model from the file alone (real files carry none of this)."""
    values = {"variant": variant, "component": component, "key_layout": layout,
              "description": "tiny randomly initialised FLUX.2 test model (not a real model)",
              "tiny_random": "true", "seed": str(seed), "version": __version__,
              "config": config if isinstance(config, str) else json.dumps(config, sort_keys=True)}
    return {"format": "pt", **{METADATA_PREFIX + k: v for k, v in values.items()}}


def _write_comfyui(pipe, out_dir: Path, variant: str, seed: int) -> list[Path]:
    from safetensors.torch import save_file

    from . import tekken
    from .single_file import text_encoder_to_comfyui, transformer_to_bfl, vae_to_bfl

    names = COMFYUI_FILES[variant]
    text_encoder = text_encoder_to_comfyui(pipe.text_encoder.state_dict(), variant)
    if variant == "dev":  # as in ComfyUI's Mistral files: the tokenizer travels inside, as tekken.json bytes
        text_encoder[tekken.KEY] = tekken.as_tensor(tekken.tiny_tekken_json())
    files = {
        "transformer": (transformer_to_bfl(pipe.transformer.state_dict()), "bfl",
                        dict(pipe.transformer.config)),
        "vae": (vae_to_bfl(pipe.vae.state_dict()), "ldm", dict(pipe.vae.config)),
        "text_encoder": (text_encoder, "comfyui", pipe.text_encoder.config.to_json_string()),
    }
    written = []
    for component, (state_dict, layout, config) in files.items():
        path = out_dir / names[component]
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
        save_file(tensors, str(path), metadata=_metadata(variant, seed, component, layout, config))
        written.append(path)
    tokenizer_dir = out_dir / names["tokenizer"]
    pipe.tokenizer.save_pretrained(tokenizer_dir)
    return [*written, tokenizer_dir]


def write_tiny_model(out_dir: str | Path, variant: str = "klein", fmt: str = "diffusers", seed: int = 0) -> list[Path]:
    """Build the tiny pipeline for `variant` and write it to `out_dir`; returns the files and folders written.

    fmt "diffusers": a pipeline folder that `DiffusionPipeline.from_pretrained` loads offline.
    fmt "comfyui": the same weights as single files in ComfyUI's models/ layout (see COMFYUI_FILES) plus a
    tokenizer/ folder. Like ComfyUI's real Mistral files, the [dev] text-encoder file also carries its tokenizer
    as `tekken_model` (tekken.json bytes), so it loads without the folder. Each file's safetensors header
    records the variant, seed, pack version and the component's config under `flux2_lora.*`.
    """
    _check(variant, fmt)
    out_dir = Path(out_dir)
    pipe = build_tiny_pipeline(variant, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    if fmt == "comfyui":
        written = _write_comfyui(pipe, out_dir, variant, seed)
    else:
        pipe.save_pretrained(out_dir, safe_serialization=True)
        written = [out_dir / "model_index.json", *(out_dir / name for name in sorted(pipe.components))]
    log.debug("wrote tiny FLUX.2 [%s] (%s format, seed %d) to %s", variant, fmt, seed, out_dir)
    return written
