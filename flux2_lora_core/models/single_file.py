"""State-dict key layouts: diffusers <-> the single files ComfyUI users keep (BFL / LDM / ComfyUI names).

ComfyUI users hold FLUX.2 as three single files (models/diffusion_models, models/vae,
models/text_encoders) while diffusers wants a pipeline folder. diffusers only converts BFL
transformer files towards diffusers, so everything else is here: the transformer back to BFL names,
the VAE both ways (diffusers has no FLUX.2 VAE single-file loader) and the text encoders both ways.

Every conversion is a pure renaming (plus the fusions and reshapes the layouts demand), exact both
ways: converting there and back gives bit-identical tensors. A key that no rule covers is an error,
never silently dropped, so a file of the wrong kind fails loudly instead of loading half its weights.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from ..errors import ConfigError, ModelError
from .files import count_blocks

if TYPE_CHECKING:
    from torch import Tensor

TEXT_ENCODER_VARIANTS = ("klein", "dev")

# Rules are pairs of key templates. A `{name}` placeholder matches what `_SLOTS` allows and carries over;
# `{up}` is a decoder up-block index, which diffusers counts from the lowest resolution and LDM from
# the highest, so it is flipped on the way.
_SLOTS = {
    "i": r"\d+", "j": r"\d+", "up": r"\d+", "p": r"weight|bias", "side": r"encoder|decoder",
    "layer": r"norm1|conv1|norm2|conv2", "conv": r"quant_conv|post_quant_conv",
    "stat": r"running_mean|running_var|num_batches_tracked",
    "mod": r"double_stream_modulation_img|double_stream_modulation_txt|single_stream_modulation",
}


def compile_template(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)  # literal, slot, literal, slot, ...
    return re.compile("".join(re.escape(part) if n % 2 == 0 else f"(?P<{part}>{_SLOTS[part]})"
                              for n, part in enumerate(parts)))


def _rename(state_dict: dict[str, Tensor], rules: list[tuple[str, str]], kind: str,
            n_up: int = 0) -> dict[str, Tensor]:
    """Rename every key by the first rule whose source template matches it; unmatched keys are an error."""
    compiled = [(compile_template(src), dst) for src, dst in rules]
    out, unmatched = {}, []
    for key, tensor in state_dict.items():
        for pattern, dst in compiled:
            if m := pattern.fullmatch(key):
                slots = m.groupdict()
                if "up" in slots:
                    slots["up"] = str(n_up - 1 - int(slots["up"]))
                out[dst.format(**slots)] = tensor
                break
        else:
            unmatched.append(key)
    if unmatched:
        raise _unmatched(kind, unmatched)
    return out


def _unmatched(kind: str, keys: list[str]) -> ModelError:
    shown = ", ".join(repr(k) for k in keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
    return ModelError(f"not a {kind} state dict: no conversion rule for {shown}")


# ---------------------------------------------------------------------------------------------- transformer
# diffusers -> BFL for the modules that only get renamed. Norm weights become `.scale` as in BFL's own
# files (ComfyUI accepts both; diffusers' converter expects `.scale`).
TRANSFORMER_RENAMES = [
    ("x_embedder.{p}", "img_in.{p}"),
    ("context_embedder.{p}", "txt_in.{p}"),
    ("time_guidance_embed.timestep_embedder.linear_1.{p}", "time_in.in_layer.{p}"),
    ("time_guidance_embed.timestep_embedder.linear_2.{p}", "time_in.out_layer.{p}"),
    ("time_guidance_embed.guidance_embedder.linear_1.{p}", "guidance_in.in_layer.{p}"),
    ("time_guidance_embed.guidance_embedder.linear_2.{p}", "guidance_in.out_layer.{p}"),
    ("{mod}.linear.{p}", "{mod}.lin.{p}"),
    ("proj_out.{p}", "final_layer.linear.{p}"),
    ("transformer_blocks.{i}.attn.norm_q.weight", "double_blocks.{i}.img_attn.norm.query_norm.scale"),
    ("transformer_blocks.{i}.attn.norm_k.weight", "double_blocks.{i}.img_attn.norm.key_norm.scale"),
    ("transformer_blocks.{i}.attn.norm_added_q.weight", "double_blocks.{i}.txt_attn.norm.query_norm.scale"),
    ("transformer_blocks.{i}.attn.norm_added_k.weight", "double_blocks.{i}.txt_attn.norm.key_norm.scale"),
    ("transformer_blocks.{i}.attn.to_out.0.{p}", "double_blocks.{i}.img_attn.proj.{p}"),
    ("transformer_blocks.{i}.attn.to_add_out.{p}", "double_blocks.{i}.txt_attn.proj.{p}"),
    ("transformer_blocks.{i}.ff.linear_in.{p}", "double_blocks.{i}.img_mlp.0.{p}"),
    ("transformer_blocks.{i}.ff.linear_out.{p}", "double_blocks.{i}.img_mlp.2.{p}"),
    ("transformer_blocks.{i}.ff_context.linear_in.{p}", "double_blocks.{i}.txt_mlp.0.{p}"),
    ("transformer_blocks.{i}.ff_context.linear_out.{p}", "double_blocks.{i}.txt_mlp.2.{p}"),
    ("single_transformer_blocks.{i}.attn.to_qkv_mlp_proj.{p}", "single_blocks.{i}.linear1.{p}"),
    ("single_transformer_blocks.{i}.attn.to_out.{p}", "single_blocks.{i}.linear2.{p}"),
    ("single_transformer_blocks.{i}.attn.norm_q.weight", "single_blocks.{i}.norm.query_norm.scale"),
    ("single_transformer_blocks.{i}.attn.norm_k.weight", "single_blocks.{i}.norm.key_norm.scale"),
    # Handled after renaming: q/k/v parts fused into one Linear, AdaLayerNorm halves swapped.
    ("transformer_blocks.{i}.attn.to_q.{p}", "double_blocks.{i}.img_attn.qkv.{p}#q"),
    ("transformer_blocks.{i}.attn.to_k.{p}", "double_blocks.{i}.img_attn.qkv.{p}#k"),
    ("transformer_blocks.{i}.attn.to_v.{p}", "double_blocks.{i}.img_attn.qkv.{p}#v"),
    ("transformer_blocks.{i}.attn.add_q_proj.{p}", "double_blocks.{i}.txt_attn.qkv.{p}#q"),
    ("transformer_blocks.{i}.attn.add_k_proj.{p}", "double_blocks.{i}.txt_attn.qkv.{p}#k"),
    ("transformer_blocks.{i}.attn.add_v_proj.{p}", "double_blocks.{i}.txt_attn.qkv.{p}#v"),
    ("norm_out.linear.{p}", "final_layer.adaLN_modulation.1.{p}#swap"),
]


def _swap_halves(t: Tensor) -> Tensor:
    """(a; b) -> (b; a) along the output rows: diffusers orders the final modulation (scale, shift), BFL
    (shift, scale). The same operation converts either way."""
    import torch

    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def transformer_to_bfl(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """diffusers `Flux2Transformer2DModel` weights -> BFL names, as in models/diffusion_models files.

    The exact inverse of diffusers' `convert_flux2_transformer_checkpoint_to_diffusers`, so
    `Flux2Transformer2DModel.from_single_file` reads the result back bit for bit, and ComfyUI detects it
    as FLUX.2 (it keys on `double_stream_modulation_img.lin.weight`).
    """
    import torch

    renamed = _rename(state_dict, TRANSFORMER_RENAMES, "diffusers FLUX.2 transformer")
    out: dict[str, Tensor] = {}
    qkv: dict[str, dict[str, Tensor]] = {}
    for key, tensor in renamed.items():
        key, _, mark = key.partition("#")
        if mark == "swap":
            out[key] = _swap_halves(tensor)
        elif mark:
            qkv.setdefault(key, {})[mark] = tensor
        else:
            out[key] = tensor
    for key, parts in qkv.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise ModelError(f"cannot fuse {key!r}: it needs the q, k and v projections, found only {sorted(parts)}")
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)  # (3 * inner, dim)
    return out


# ---------------------------------------------------------------------------------------------- VAE
# (diffusers, LDM) key templates; both directions use the same table.
_VAE_RENAMES = [
    ("{side}.conv_in.{p}", "{side}.conv_in.{p}"),
    ("{side}.conv_out.{p}", "{side}.conv_out.{p}"),
    ("{side}.conv_norm_out.{p}", "{side}.norm_out.{p}"),
    ("encoder.down_blocks.{i}.resnets.{j}.{layer}.{p}", "encoder.down.{i}.block.{j}.{layer}.{p}"),
    ("encoder.down_blocks.{i}.resnets.{j}.conv_shortcut.{p}", "encoder.down.{i}.block.{j}.nin_shortcut.{p}"),
    ("encoder.down_blocks.{i}.downsamplers.0.conv.{p}", "encoder.down.{i}.downsample.conv.{p}"),
    ("decoder.up_blocks.{up}.resnets.{j}.{layer}.{p}", "decoder.up.{up}.block.{j}.{layer}.{p}"),
    ("decoder.up_blocks.{up}.resnets.{j}.conv_shortcut.{p}", "decoder.up.{up}.block.{j}.nin_shortcut.{p}"),
    ("decoder.up_blocks.{up}.upsamplers.0.conv.{p}", "decoder.up.{up}.upsample.conv.{p}"),
    ("{side}.mid_block.resnets.0.{layer}.{p}", "{side}.mid.block_1.{layer}.{p}"),
    ("{side}.mid_block.resnets.1.{layer}.{p}", "{side}.mid.block_2.{layer}.{p}"),
    ("{side}.mid_block.attentions.0.group_norm.{p}", "{side}.mid.attn_1.norm.{p}"),
    ("{side}.mid_block.attentions.0.to_q.{p}", "{side}.mid.attn_1.q.{p}"),
    ("{side}.mid_block.attentions.0.to_k.{p}", "{side}.mid.attn_1.k.{p}"),
    ("{side}.mid_block.attentions.0.to_v.{p}", "{side}.mid.attn_1.v.{p}"),
    ("{side}.mid_block.attentions.0.to_out.0.{p}", "{side}.mid.attn_1.proj_out.{p}"),
    ("{conv}.{p}", "{conv}.{p}"),
    ("bn.{stat}", "bn.{stat}"),
]
_LDM_ATTN_WEIGHT = re.compile(r"(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight")
# Containers some VAE files come wrapped in (whole checkpoints, ComfyUI's model-merging saves).
_VAE_PREFIXES = ("first_stage_model.", "vae.")


def vae_to_bfl(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """diffusers `AutoencoderKLFlux2` weights -> the LDM layout of BFL's and ComfyUI's flux2-vae.safetensors.

    ComfyUI's VAE loader recognises FLUX.2 by `bn.running_mean` and builds LDM attention from 1x1
    convolutions, so the attention projections become (C, C, 1, 1) conv weights.
    """
    n_up = count_blocks(state_dict, "decoder.up_blocks.")
    out = _rename(state_dict, _VAE_RENAMES, "diffusers FLUX.2 VAE", n_up)
    for key, tensor in out.items():
        if _LDM_ATTN_WEIGHT.fullmatch(key) and tensor.ndim == 2:
            out[key] = tensor.reshape(*tensor.shape, 1, 1)  # (C, C) -> (C, C, 1, 1)
    return out


def vae_to_diffusers(state_dict: dict[str, Tensor], n_up: int | None = None) -> dict[str, Tensor]:
    """A BFL/ComfyUI FLUX.2 VAE file -> `AutoencoderKLFlux2` weights, the latent BatchNorm included.

    Accepts plain LDM names, the same under a `vae.` / `first_stage_model.` prefix, and the
    `encoder.quant_conv` / `decoder.post_quant_conv` spellings that ComfyUI also accepts. `n_up`, the
    decoder's up-block count, is counted from the keys unless given: a part of a file (one block at a
    time, as the loader streams it) cannot tell it.
    """
    for prefix in _VAE_PREFIXES:
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    aliases = {"encoder.quant_conv.": "quant_conv.", "decoder.post_quant_conv.": "post_quant_conv."}
    state_dict = {next((new + k[len(old):] for old, new in aliases.items() if k.startswith(old)), k): v
                  for k, v in state_dict.items()}
    n_up = count_blocks(state_dict, "decoder.up.") if n_up is None else n_up
    out = _rename(state_dict, [(ldm, diffusers) for diffusers, ldm in _VAE_RENAMES], "LDM/BFL FLUX.2 VAE", n_up)
    for key, tensor in out.items():
        if ".mid_block.attentions.0." in key and key.endswith(".weight") and tensor.ndim == 4:
            out[key] = tensor.reshape(tensor.shape[:2])  # (C, C, 1, 1) -> (C, C)
    return out


# ---------------------------------------------------------------------------------------------- text encoders
# ComfyUI keeps only the language model, as `model.*` (comfy/text_encoders/llama.py): no lm_head (FLUX.2
# reads hidden states, never logits) and for Mistral no vision tower or projector.
_MISTRAL_LANGUAGE_PREFIXES = ("model.language_model.", "language_model.model.")  # transformers 5 / 4 layouts
_MISTRAL_DROPPED = ("model.vision_tower.", "model.multi_modal_projector.", "vision_tower.", "multi_modal_projector.",
                    "lm_head.", "language_model.lm_head.")
# Non-weight entries some ComfyUI text-encoder files carry (the Mistral file embeds its tekken tokenizer).
_TOKENIZER_ENTRIES = ("tekken_model", "tokenizer_json", "spiece_model")


def _check_variant(variant: str) -> None:
    if variant not in TEXT_ENCODER_VARIANTS:
        choices = ", ".join(TEXT_ENCODER_VARIANTS)
        raise ConfigError([("variant", f"unknown FLUX.2 variant {variant!r}: choose one of {choices}")])


def text_encoder_to_comfyui(state_dict: dict[str, Tensor], variant: str) -> dict[str, Tensor]:
    """HF `Qwen3ForCausalLM` ([klein]) / `Mistral3ForConditionalGeneration` ([dev]) -> ComfyUI's keys.

    What ComfyUI's CLIPLoader (type "flux2") reads: `model.embed_tokens`, `model.layers.N.*`, `model.norm`.
    """
    _check_variant(variant)
    out, unmatched = {}, []
    for key, tensor in state_dict.items():
        if key.startswith("lm_head.") or (variant == "dev" and key.startswith(_MISTRAL_DROPPED)):
            continue
        if variant == "dev":
            prefix = next((p for p in _MISTRAL_LANGUAGE_PREFIXES if key.startswith(p)), None)
            if prefix is None:
                unmatched.append(key)
                continue
            key = "model." + key[len(prefix):]
        elif not key.startswith("model."):
            unmatched.append(key)
            continue
        out[key] = tensor
    if unmatched:
        raise _unmatched("Qwen3 text encoder" if variant == "klein" else "Mistral3 text encoder", unmatched)
    return out


def text_encoder_to_diffusers(state_dict: dict[str, Tensor], variant: str) -> dict[str, Tensor]:
    """A ComfyUI text-encoder file -> weights for the HF class diffusers' FLUX.2 pipelines use.

    The file holds the language model only, so load the result with `strict=False`: the missing keys are
    `lm_head.weight` (tied to the embeddings in Qwen3-4B; never used for FLUX.2 conditioning) and, for
    Mistral, the vision tower and projector (text-only prompts never reach them).
    """
    _check_variant(variant)
    out, unmatched = {}, []
    for key, tensor in state_dict.items():
        if key in _TOKENIZER_ENTRIES:
            continue
        if key in ("lm_head.weight", "model.lm_head.weight"):
            out["lm_head.weight"] = tensor
        elif key.startswith("model."):
            out[key if variant == "klein" else "model.language_model." + key[len("model."):]] = tensor
        else:
            unmatched.append(key)
    if unmatched:
        raise _unmatched("ComfyUI FLUX.2 text encoder", unmatched)
    return out
