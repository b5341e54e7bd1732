"""Which FLUX.2 a set of weights is, and the configs to build each component from tensor shapes alone.

Single files carry no config, and diffusers' single-file loader assumes [dev] and asks the hub for
the rest. The shapes say everything that varies between FLUX.2 models (block counts, widths, whether
there is a guidance embedder), and the shipped real configs supply the constants that shapes cannot
show (RoPE axes and theta, norm eps). Shapes that match a shipped model get its name; anything else
(the tiny test models, a pruned or extended fine-tune) is "custom" on top of its family's config.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from importlib import resources
from math import gcd
from pathlib import Path

from ..errors import ModelError
from .files import count_blocks, identify

log = logging.getLogger(__name__)

# Shipped transformer configs and their family: "dev" (Mistral Small 3.x text encoder, guidance
# embedder) or "klein" (Qwen3, no guidance).
SHIPPED = {"flux2-dev": "dev", "flux2-klein-4b": "klein", "flux2-klein-9b": "klein"}
FAMILY_CONFIG = {"dev": "flux2-dev", "klein": "flux2-klein-4b"}
FAMILIES = tuple(FAMILY_CONFIG)
# The text encoder each family's pipeline reads prompts with.
TEXT_ENCODERS = {"dev": "Mistral Small 3.x", "klein": "Qwen3"}
# Text-encoder hidden states the transformer reads, stacked (the pipelines' defaults).
TEXT_LAYERS = {"dev": (10, 20, 30), "klein": (9, 18, 27)}
# What tells models apart; everything else in a config is shared by all FLUX.2 transformers.
IDENTITY = ("num_layers", "num_single_layers", "num_attention_heads", "attention_head_dim", "joint_attention_dim",
            "guidance_embeds", "mlp_ratio", "in_channels")
# Text-encoder constants shapes cannot show (the tiny models use the same).
TEXT_CONSTANTS = {"klein": dict(rope_theta=1_000_000.0, rms_norm_eps=1e-6, max_position_embeddings=40960),
                  "dev": dict(rope_theta=1_000_000_000.0, rms_norm_eps=1e-5, max_position_embeddings=131072)}
MISTRAL_HEAD_DIM = 128  # Mistral Small 3.x; q_proj is narrower than the hidden size, so it cannot be inferred


def shipped_config(name: str, component: str = "") -> dict:
    """A real config shipped in flux2_lora_core/models/configs (e.g. "flux2-dev", "transformer"), without the
    `_class_name` / `_diffusers_version` bookkeeping that `from_config` does not need."""
    folder = resources.files(__package__).joinpath("configs", name, *([component] if component else []))
    filename = "scheduler_config.json" if component == "scheduler" else "config.json"
    config = json.loads(folder.joinpath(filename).read_text(encoding="utf-8"))
    return {k: v for k, v in config.items() if not k.startswith("_")}


@dataclass(frozen=True)
class Variant:
    """A FLUX.2 transformer's identity: shipped model name (or "custom"), family and full config."""

    name: str                     # "flux2-dev" | "flux2-klein-4b" | "flux2-klein-9b" | "custom"
    family: str                   # "dev" | "klein"
    transformer_config: dict = field(hash=False)
    source: str = field(default="", compare=False)  # the file or folder it was read from, for messages

    @property
    def text_encoder_layers(self) -> tuple[int, ...]:
        return TEXT_LAYERS[self.family]

    @property
    def joint_attention_dim(self) -> int:
        return int(self.transformer_config["joint_attention_dim"])

    @property
    def guidance_embeds(self) -> bool:
        return bool(self.transformer_config["guidance_embeds"])

    @property
    def text_encoder(self) -> str:
        """The text encoder it expects, in words, e.g. "Qwen3 with hidden size 2560"."""
        return f"{TEXT_ENCODERS[self.family]} with hidden size {self.joint_attention_dim // 3}"


# (BFL name, diffusers name) of the tensors whose shapes define a transformer.
_TRANSFORMER_KEYS = {
    "img_in": ("img_in.weight", "x_embedder.weight"),
    "txt_in": ("txt_in.weight", "context_embedder.weight"),
    "time_in": ("time_in.in_layer.weight", "time_guidance_embed.timestep_embedder.linear_1.weight"),
    "head": ("double_blocks.0.img_attn.norm.query_norm.scale", "transformer_blocks.0.attn.norm_q.weight"),
    "mlp_in": ("double_blocks.0.img_mlp.0.weight", "transformer_blocks.0.ff.linear_in.weight"),
    "out": ("final_layer.linear.weight", "proj_out.weight"),
}


def transformer_config_from_shapes(shapes: dict[str, tuple[int, ...]], family: str | None = None) -> dict:
    """A Flux2Transformer2DModel config from a BFL- or diffusers-named state dict's shapes."""
    kind, description = identify(shapes)
    if kind not in ("flux2_transformer", "flux2_transformer_diffusers"):
        raise ModelError(f"these weights are {description}, not a FLUX.2 transformer")
    bfl = kind == "flux2_transformer"
    s = {name: shapes.get(pair[0 if bfl else 1]) for name, pair in _TRANSFORMER_KEYS.items()}
    if any(v is None for v in s.values()):
        missing = [pair[0 if bfl else 1] for name, pair in _TRANSFORMER_KEYS.items() if s[name] is None]
        raise ModelError(f"incomplete FLUX.2 transformer: no {', '.join(missing)}")
    guidance = any(k.startswith("guidance_in." if bfl else "time_guidance_embed.guidance_embedder.") for k in shapes)
    family = family or ("dev" if guidance else "klein")
    hidden, head_dim = s["img_in"][0], s["head"][0]
    config = shipped_config(FAMILY_CONFIG[family], "transformer")
    config.update(
        num_layers=count_blocks(shapes, "double_blocks." if bfl else "transformer_blocks."),
        num_single_layers=count_blocks(shapes, "single_blocks." if bfl else "single_transformer_blocks."),
        attention_head_dim=head_dim, num_attention_heads=hidden // head_dim, in_channels=s["img_in"][1],
        joint_attention_dim=s["txt_in"][1], guidance_embeds=guidance, timestep_guidance_channels=s["time_in"][1],
        mlp_ratio=s["mlp_in"][0] / 2 / hidden,  # gated MLP: linear_in holds two (mlp_hidden, hidden) halves
        out_channels=None if s["out"][0] == s["img_in"][1] else s["out"][0])
    return config


def _variant_from_config(config: dict, source: str = "") -> Variant:
    config = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    missing = [k for k in IDENTITY if k not in config]
    if missing:
        raise ModelError(f"{source or 'config'}: not a FLUX.2 transformer config (no {', '.join(missing)})")
    family = "dev" if config["guidance_embeds"] else "klein"
    for name, fam in SHIPPED.items():
        shipped = shipped_config(name, "transformer")
        if all(shipped[k] == config[k] for k in IDENTITY):
            return Variant(name, fam, {**shipped, **config}, source)
    return Variant("custom", family, {**shipped_config(FAMILY_CONFIG[family], "transformer"), **config}, source)


def judge_distilled(path, family: str, setting: str = "auto") -> tuple[bool, str]:
    """(whether a [klein] transformer is the step-distilled checkpoint, how that was told). Distilled and base
    klein share one architecture, so only the pipeline's model_index.json ("is_distilled") or the file's name
    (BFL's and ComfyUI's: flux-2-klein-4b is distilled, flux-2-klein-base-4b the base) tell them apart."""
    if family != "klein":
        return False, ""
    if setting != "auto":
        return setting == "true", "model.distilled"
    where = Path(str(path or ""))
    # The pipeline folder resolve_sources finds for model.path (the folder, or its transformer/ sub-folder's
    # parent), or a file inside the transformer folder.
    for folder in (where, where.parent, where.parent.parent):
        index = folder / "model_index.json"
        if index.is_file():
            try:
                return bool(json.loads(index.read_text(encoding="utf-8")).get("is_distilled", False)), index.name
            except (OSError, ValueError):
                break
    name = where.name.lower()
    if "klein" in name and where.is_file():
        return "base" not in name, f"the file name {where.name!r}"
    return False, "no sign of distillation"


def detect_variant(config_or_state_dict, source: str = "") -> Variant:
    """The Variant of a diffusers transformer config, or of a state dict (tensors or bare shapes, BFL or
    diffusers names, without container prefixes)."""
    items = dict(config_or_state_dict)
    if "num_layers" in items or "_class_name" in items:
        return _variant_from_config(items, source)
    shapes = {k: tuple(v.shape) if hasattr(v, "shape") else tuple(v) for k, v in items.items()}
    try:
        return _variant_from_config(transformer_config_from_shapes(shapes), source)
    except ModelError as exc:
        raise ModelError(f"{source}: {exc}" if source else str(exc)) from None


def vae_config_from_shapes(shapes: dict[str, tuple[int, ...]]) -> dict:
    """An AutoencoderKLFlux2 config from an LDM-named FLUX.2 VAE state dict's shapes."""
    levels = count_blocks(shapes, "encoder.down.")
    channels = [shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in range(levels)]
    decoder = [shapes[f"decoder.up.{i}.block.0.conv2.weight"][0] for i in range(count_blocks(shapes, "decoder.up."))]
    latent = shapes["decoder.conv_in.weight"][1]
    config = shipped_config("flux2-vae")
    config.update(block_out_channels=channels, layers_per_block=count_blocks(shapes, "encoder.down.0.block."),
                  latent_channels=latent, in_channels=shapes["encoder.conv_in.weight"][1],
                  out_channels=shapes["decoder.conv_out.weight"][0],
                  decoder_block_out_channels=None if decoder == channels else decoder,
                  down_block_types=[config["down_block_types"][0]] * levels,
                  up_block_types=[config["up_block_types"][0]] * len(decoder),
                  use_quant_conv="quant_conv.weight" in shapes, use_post_quant_conv="post_quant_conv.weight" in shapes,
                  mid_block_add_attention="encoder.mid.attn_1.q.weight" in shapes)
    patch = int(round((shapes["bn.running_mean"][0] / latent) ** 0.5))
    config["patch_size"] = [patch, patch]
    return config


def text_encoder_config_from_shapes(shapes: dict[str, tuple[int, ...]], family: str):
    """A Qwen3Config ([klein]) or MistralConfig ([dev]) from a language model's `model.*` shapes.

    Head size: Qwen3's q_norm has one weight per head dimension; Mistral has no such tensor, so it is
    Mistral Small's 128 where the projections divide by it, else the largest size dividing both the
    query and key/value projections (the tiny models).
    """
    from transformers import MistralConfig, Qwen3Config

    vocab, hidden = shapes["model.embed_tokens.weight"]
    q_out = shapes["model.layers.0.self_attn.q_proj.weight"][0]  # heads x head_dim
    k_out = shapes["model.layers.0.self_attn.k_proj.weight"][0]  # kv heads x head_dim
    if family == "klein":
        head_dim = shapes["model.layers.0.self_attn.q_norm.weight"][0]
    elif q_out % MISTRAL_HEAD_DIM == 0 and k_out % MISTRAL_HEAD_DIM == 0:
        head_dim = MISTRAL_HEAD_DIM
    else:
        head_dim = gcd(q_out, k_out)
        log.warning("head size of this Mistral-style text encoder taken as %d (not Mistral Small's %d)",
                    head_dim, MISTRAL_HEAD_DIM)
    sizes = dict(vocab_size=vocab, hidden_size=hidden, head_dim=head_dim, num_attention_heads=q_out // head_dim,
                 num_key_value_heads=k_out // head_dim, num_hidden_layers=count_blocks(shapes, "model.layers."),
                 intermediate_size=shapes["model.layers.0.mlp.gate_proj.weight"][0], **TEXT_CONSTANTS[family])
    if family == "klein":
        return Qwen3Config(**sizes, tie_word_embeddings=True, attention_bias=False)
    return MistralConfig(**sizes, sliding_window=None, tie_word_embeddings=False)
