"""single_file.py: diffusers <-> BFL/LDM/ComfyUI key layouts, exact both ways, checked on the tiny models.

The expected ComfyUI names are taken from ComfyUI's own sources (v0.29): comfy/model_detection.py and
comfy/ldm/flux/{model,layers}.py for the transformer, comfy/sd.py and comfy/ldm/modules/diffusionmodules/
model.py for the VAE, comfy/sd.py and comfy/text_encoders/llama.py for the text encoders.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
from diffusers.loaders.single_file_utils import (
    convert_flux2_transformer_checkpoint_to_diffusers,
    convert_ldm_vae_checkpoint,
)
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoConfig, Mistral3ForConditionalGeneration, Qwen3ForCausalLM

from flux2_lora_core.errors import ConfigError, ModelError
from flux2_lora_core.models.single_file import (
    text_encoder_to_comfyui,
    text_encoder_to_diffusers,
    transformer_to_bfl,
    vae_to_bfl,
    vae_to_diffusers,
)
from flux2_lora_core.models.tiny_models import COMFYUI_FILES, VARIANTS, build_tiny_pipeline, write_tiny_model

# comfy/model_detection.py: FLUX needs double_blocks.0.img_attn.norm.key_norm.{scale|weight} and img_in.weight;
# FLUX.2 is told apart by double_stream_modulation_img.lin.weight; guidance by any guidance_in.* key.
COMFYUI_TRANSFORMER_KEYS = [
    "img_in.weight", "txt_in.weight", "time_in.in_layer.weight", "time_in.out_layer.weight",
    "double_stream_modulation_img.lin.weight", "double_stream_modulation_txt.lin.weight",
    "single_stream_modulation.lin.weight",
    "double_blocks.0.img_attn.qkv.weight", "double_blocks.0.img_attn.norm.key_norm.scale",
    "double_blocks.0.img_attn.norm.query_norm.scale", "double_blocks.0.img_attn.proj.weight",
    "double_blocks.0.img_mlp.0.weight", "double_blocks.0.img_mlp.2.weight",
    "double_blocks.1.txt_attn.qkv.weight", "double_blocks.1.txt_attn.norm.key_norm.scale",
    "double_blocks.1.txt_attn.proj.weight", "double_blocks.1.txt_mlp.0.weight", "double_blocks.1.txt_mlp.2.weight",
    "single_blocks.0.linear1.weight", "single_blocks.0.linear2.weight", "single_blocks.1.norm.query_norm.scale",
    "single_blocks.1.norm.key_norm.scale", "final_layer.linear.weight", "final_layer.adaLN_modulation.1.weight",
]
# comfy/sd.py picks the FLUX.2 VAE by bn.running_mean; LDM Encoder/Decoder/ResnetBlock/AttnBlock names.
COMFYUI_VAE_KEYS = [
    "encoder.conv_in.weight", "encoder.down.0.block.0.conv1.weight", "encoder.down.0.block.1.norm2.bias",
    "encoder.down.2.block.0.nin_shortcut.weight", "encoder.down.2.downsample.conv.weight",
    "encoder.mid.block_1.conv1.weight", "encoder.mid.attn_1.q.weight", "encoder.mid.attn_1.proj_out.weight",
    "encoder.norm_out.weight", "encoder.conv_out.weight", "quant_conv.weight", "post_quant_conv.weight",
    "decoder.conv_in.weight", "decoder.mid.block_2.norm1.weight", "decoder.mid.attn_1.norm.weight",
    "decoder.up.3.block.2.conv2.weight", "decoder.up.3.upsample.conv.weight",
    "decoder.up.1.block.0.nin_shortcut.weight",
    "decoder.norm_out.bias", "decoder.conv_out.weight", "bn.running_mean", "bn.running_var",
]
LAYERS = {"klein": (9, 18, 27), "dev": (10, 20, 30)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Each variant's pipeline and its ComfyUI-format files."""
    out = {}
    for variant in VARIANTS:
        root = tmp_path_factory.mktemp(f"comfy-{variant}")
        write_tiny_model(root, variant=variant, fmt="comfyui")
        out[variant] = (build_tiny_pipeline(variant), {c: root / p for c, p in COMFYUI_FILES[variant].items()})
    return out


def metadata_config(path) -> dict:
    return json.loads(safe_open(str(path), "pt").metadata()["flux2_lora.config"])


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:10]
    different = [k for k in a if a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]
    assert not different, different[:10]


# ---------------------------------------------------------------------------------------------- transformer
@pytest.mark.parametrize("variant", VARIANTS)
def test_transformer_to_bfl_is_the_inverse_of_diffusers_converter(tiny, variant):
    original = tiny[variant][0].transformer.state_dict()
    bfl = transformer_to_bfl(original)
    assert_same_tensors(convert_flux2_transformer_checkpoint_to_diffusers(dict(bfl)), original)


@pytest.mark.parametrize("variant", VARIANTS)
def test_transformer_file_has_the_names_and_shapes_comfyui_detects(tiny, variant):
    pipe, files = tiny[variant]
    sd = load_file(files["transformer"])
    assert not any(k.startswith(("model.diffusion_model.", "transformer.")) for k in sd)  # bare BFL names
    assert set(COMFYUI_TRANSFORMER_KEYS) <= set(sd)
    assert any(k.startswith("guidance_in.") for k in sd) is (variant == "dev")
    config = pipe.transformer.config
    hidden = sd["img_in.weight"].shape[0]
    assert hidden // sum(config.axes_dims_rope) == config.num_attention_heads  # how ComfyUI counts heads
    assert sd["txt_in.weight"].shape[1] == config.joint_attention_dim              # ComfyUI's context_in_dim
    assert sd["double_blocks.0.img_attn.qkv.weight"].shape == (3 * hidden, hidden)
    mlp = int(hidden * config.mlp_ratio)
    assert sd["single_blocks.0.linear1.weight"].shape == (3 * hidden + 2 * mlp, hidden)  # qkv | gated mlp-in
    assert sd["single_blocks.0.linear2.weight"].shape == (hidden, hidden + mlp)
    assert sd["double_stream_modulation_img.lin.weight"].shape == (6 * hidden, hidden)
    assert sd["single_stream_modulation.lin.weight"].shape == (3 * hidden, hidden)
    blocks = {int(k.split(".")[1]) for k in sd if k.startswith("double_blocks.")}
    assert blocks == set(range(config.num_layers))


def test_final_modulation_halves_are_swapped_to_shift_scale(tiny):
    diffusers_weight = tiny["klein"][0].transformer.state_dict()["norm_out.linear.weight"]  # (scale; shift)
    bfl_weight = transformer_to_bfl(tiny["klein"][0].transformer.state_dict())["final_layer.adaLN_modulation.1.weight"]
    scale, shift = diffusers_weight.chunk(2)
    assert torch.equal(bfl_weight, torch.cat([shift, scale]))


@pytest.mark.parametrize("variant", VARIANTS)
def test_transformer_from_single_file_matches_its_diffusers_twin(tiny, tmp_path, variant):
    pipe, files = tiny[variant]
    (tmp_path / "config.json").write_text(json.dumps(metadata_config(files["transformer"])))
    loaded = Flux2Transformer2DModel.from_single_file(str(files["transformer"]), config=str(tmp_path),
                                                      local_files_only=True)
    assert_same_tensors(loaded.state_dict(), pipe.transformer.state_dict())
    torch.manual_seed(0)
    latents = torch.randn(1, 128, 4, 4)
    text = torch.randn(1, 6, pipe.transformer.config.joint_attention_dim)
    kwargs = dict(hidden_states=pipe._pack_latents(latents), encoder_hidden_states=text, timestep=torch.tensor([0.4]),
                  img_ids=pipe._prepare_latent_ids(latents), txt_ids=pipe._prepare_text_ids(text),
                  guidance=torch.tensor([3.5]) if variant == "dev" else None, return_dict=False)
    with torch.no_grad():
        a, b = pipe.transformer(**kwargs)[0], loaded(**kwargs)[0]
    assert a.shape == (1, 16, 128)
    assert (a - b).abs().max() < 1e-5  # same weights; only memory alignment can move the last bit on CPU


def test_transformer_conversion_refuses_foreign_or_incomplete_state_dicts(tiny):
    sd = tiny["klein"][0].transformer.state_dict()
    with pytest.raises(ModelError, match="'lora_unet_x.alpha'"):
        transformer_to_bfl({**sd, "lora_unet_x.alpha": torch.ones(())})
    with pytest.raises(ModelError, match="double_blocks.0.img_attn.qkv.weight.*'q', 'v'"):
        transformer_to_bfl({k: v for k, v in sd.items() if k != "transformer_blocks.0.attn.to_k.weight"})


# ---------------------------------------------------------------------------------------------- VAE
def test_vae_round_trip_is_exact_and_agrees_with_diffusers_ldm_converter(tiny):
    vae = tiny["klein"][0].vae
    original = vae.state_dict()
    ldm = vae_to_bfl(original)
    assert_same_tensors(vae_to_diffusers(ldm), original)
    # diffusers' own LDM->diffusers VAE converter reads our layout too; it only lacks the FLUX.2 BatchNorm.
    converted = convert_ldm_vae_checkpoint(dict(ldm), dict(vae.config))
    assert_same_tensors(converted, {k: v for k, v in original.items() if not k.startswith("bn.")})


def test_vae_file_has_comfyui_names_and_conv_attention(tiny):
    pipe, files = tiny["klein"]
    sd = load_file(files["vae"])
    assert set(COMFYUI_VAE_KEYS) <= set(sd)
    channels = pipe.vae.config.block_out_channels[-1]
    for name in ("q", "k", "v", "proj_out"):  # LDM attention: 1x1 convolutions
        assert sd[f"encoder.mid.attn_1.{name}.weight"].shape == (channels, channels, 1, 1)
    assert sd["decoder.conv_in.weight"].shape[1] == pipe.vae.config.latent_channels  # ComfyUI's z_channels
    assert sd["bn.running_mean"].shape == (4 * pipe.vae.config.latent_channels,)


def test_vae_loaded_from_the_file_encodes_and_decodes_identically(tiny):
    pipe, files = tiny["klein"]
    loaded = AutoencoderKLFlux2.from_config(metadata_config(files["vae"])).eval()
    loaded.load_state_dict(vae_to_diffusers(load_file(files["vae"])), strict=True)
    torch.manual_seed(0)
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        a, b = (vae.encode(image).latent_dist.mode() for vae in (pipe.vae, loaded))
        assert torch.equal(a, b)
        assert torch.equal(pipe.vae.decode(a).sample, loaded.decode(b).sample)
    assert torch.equal(loaded.bn.running_var, pipe.vae.bn.running_var)


def test_vae_to_diffusers_accepts_prefixed_and_alias_spellings(tiny):
    original = tiny["klein"][0].vae.state_dict()
    ldm = vae_to_bfl(original)
    prefixed = {f"vae.{k}": v for k, v in ldm.items()}
    assert_same_tensors(vae_to_diffusers(prefixed), original)
    aliased = {("encoder." + k if k.startswith("quant_conv.") else "decoder." + k if k.startswith("post_quant_conv.")
                else k): v for k, v in ldm.items()}
    assert_same_tensors(vae_to_diffusers(aliased), original)
    with pytest.raises(ModelError, match="'model.diffusion_model.img_in.weight'"):
        vae_to_diffusers({**ldm, "model.diffusion_model.img_in.weight": torch.zeros(1)})


# ---------------------------------------------------------------------------------------------- text encoders
@pytest.mark.parametrize("variant", VARIANTS)
def test_text_encoder_file_holds_the_language_model_only(tiny, variant):
    pipe, files = tiny[variant]
    sd = load_file(files["text_encoder"])
    layers = pipe.text_encoder.config.get_text_config().num_hidden_layers
    assert {"model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight",
            "model.layers.0.post_attention_layernorm.weight", "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.mlp.gate_proj.weight", f"model.layers.{layers - 1}.mlp.down_proj.weight"} <= set(sd)
    # Like ComfyUI's real Mistral files, the [dev] file also carries its tokenizer: tekken.json as uint8 bytes.
    tokenizer = {"tekken_model"} if variant == "dev" else set()
    assert set(sd) - {k for k in sd if k.startswith("model.")} == tokenizer
    assert not any("lm_head" in k or "vision" in k for k in sd)
    assert all(sd[k].dtype == torch.uint8 and sd[k].ndim == 1 for k in tokenizer)
    assert ("model.layers.0.self_attn.q_norm.weight" in sd) is (variant == "klein")  # ComfyUI's Qwen3 check


@pytest.mark.parametrize("variant", VARIANTS)
def test_text_encoder_round_trip_gives_the_same_hidden_states(tiny, variant):
    pipe, files = tiny[variant]
    config = AutoConfig.for_model(**metadata_config(files["text_encoder"]))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)  # fresh random weights everywhere the file has nothing to say
        model = (Qwen3ForCausalLM if variant == "klein" else Mistral3ForConditionalGeneration)(config).eval()
    # ComfyUI's Mistral file embeds its tokenizer as a uint8 tensor: not a weight, skipped.
    file = {**load_file(files["text_encoder"]), "tekken_model": torch.zeros(8, dtype=torch.uint8)}
    weights = text_encoder_to_diffusers(file, variant)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected
    assert all(k == "lm_head.weight" or ".vision_tower." in k or ".multi_modal_projector." in k for k in missing)
    ids = pipe.tokenizer("a red fox", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a = pipe.text_encoder(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
        b = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    for layer in LAYERS[variant]:
        assert torch.equal(a[layer], b[layer])


@pytest.mark.parametrize("variant", VARIANTS)
def test_text_encoder_conversions_invert_each_other(tiny, variant, tmp_path):
    text_encoder = tiny[variant][0].text_encoder
    sd = text_encoder.state_dict()
    comfy = text_encoder_to_comfyui(sd, variant)
    kept = {k: v for k, v in sd.items() if k != "lm_head.weight" and ".vision_tower." not in k
            and ".multi_modal_projector." not in k}
    assert_same_tensors(text_encoder_to_diffusers(comfy, variant), kept)
    # save_pretrained writes Mistral3 in the transformers-4 layout (language_model.model.*): read that too.
    text_encoder.save_pretrained(tmp_path)
    assert_same_tensors(text_encoder_to_comfyui(load_file(tmp_path / "model.safetensors"), variant), comfy)


def test_text_encoder_conversion_errors_name_the_problem(tiny):
    with pytest.raises(ConfigError, match="'schnell'"):
        text_encoder_to_comfyui({}, "schnell")
    with pytest.raises(ModelError, match="'encoder.block.0.weight'"):
        text_encoder_to_diffusers({"encoder.block.0.weight": torch.zeros(1)}, "klein")
    with pytest.raises(ModelError, match="'model.layers.0.mlp.up_proj.weight'"):  # a Qwen3 file read as dev's HF layout
        text_encoder_to_comfyui({"model.layers.0.mlp.up_proj.weight": torch.zeros(1)}, "dev")
