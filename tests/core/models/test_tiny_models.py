"""tiny_models.py: real FLUX.2 architecture at toy size, deterministic, runnable, written in both formats."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, Flux2KleinPipeline, Flux2Pipeline
from safetensors import safe_open

from flux2_lora_core import __version__
from flux2_lora_core.errors import ConfigError
from flux2_lora_core.models import shipped_config
from flux2_lora_core.models.tiny_models import (
    COMFYUI_FILES,
    VARIANTS,
    build_tiny_pipeline,
    tiny_transformer_config,
    tiny_vae_config,
    write_tiny_model,
)

# Which hidden states each pipeline stacks, read from diffusers itself.
PIPELINE_LAYERS = {variant: inspect.signature(encode).parameters["hidden_states_layers"].default
                   for variant, encode in (("klein", Flux2KleinPipeline._get_qwen3_prompt_embeds),
                                           ("dev", Flux2Pipeline._get_mistral_3_small_prompt_embeds))}


@pytest.fixture(scope="module")
def pipes():
    return {variant: build_tiny_pipeline(variant) for variant in VARIANTS}


def state(pipe) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the three models, prefixed by component."""
    return {f"{name}.{k}": v for name in ("transformer", "vae", "text_encoder")
            for k, v in getattr(pipe, name).state_dict().items()}


def sample(pipe, **kwargs) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    args = dict(prompt="a photo", height=64, width=64, num_inference_steps=2, guidance_scale=4.0,
                generator=torch.Generator().manual_seed(0), output_type="np")
    return pipe(**{**args, **kwargs}).images


@pytest.mark.parametrize("variant, real", [("klein", "flux2-klein-4b"), ("dev", "flux2-dev")])
def test_tiny_configs_differ_from_the_real_ones_only_in_size(pipes, variant, real):
    tiny, full = tiny_transformer_config(variant), shipped_config(real, "transformer")
    assert {k for k in full if tiny[k] != full[k]} == {"num_layers", "num_single_layers", "num_attention_heads",
                                                       "joint_attention_dim"}
    config = pipes[variant].transformer.config
    assert config.attention_head_dim == 128 and sum(config.axes_dims_rope) == 128 and config.in_channels == 128
    assert config.guidance_embeds is (variant == "dev")
    text = pipes[variant].text_encoder.config.get_text_config()
    assert config.joint_attention_dim == 3 * text.hidden_size
    vae_real = shipped_config("flux2-vae")
    assert {k for k in vae_real if tiny_vae_config()[k] != vae_real[k]} == {"block_out_channels"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_text_encoder_taps_are_intermediate_layers(pipes, variant):
    """hidden_states[-1] is the final-normed output; every tapped layer must come before it, as in the real model."""
    pipe = pipes[variant]
    layers = pipe.text_encoder.config.get_text_config().num_hidden_layers
    assert max(PIPELINE_LAYERS[variant]) < layers
    ids = pipe.tokenizer("a fox", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hidden = pipe.text_encoder(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    assert len(hidden) == layers + 1


def test_vae_keeps_the_real_latent_layout_and_a_nontrivial_batchnorm(pipes):
    pipe = pipes["klein"]
    vae = pipe.vae
    assert pipe.vae_scale_factor == 8 and vae.config.latent_channels == 32 and vae.bn.num_features == 128
    assert vae.bn.running_mean.abs().min() > 0 and (vae.bn.running_var > 0).all()
    assert not torch.allclose(vae.bn.running_var, torch.ones(128))
    with torch.no_grad():
        z = vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mode()
    assert z.shape == (1, 32, 8, 8)


@pytest.mark.parametrize("variant", VARIANTS)
def test_transformer_forward_on_packed_latents(pipes, variant):
    pipe = pipes[variant]
    torch.manual_seed(0)
    latents = torch.randn(2, 128, 4, 6)                         # (B, 128, h, w): patchified 64x96 image
    packed = pipe._pack_latents(latents)                         # (B, h*w, 128)
    text = torch.randn(2, 7, pipe.transformer.config.joint_attention_dim)
    img_ids, txt_ids = pipe._prepare_latent_ids(latents), pipe._prepare_text_ids(text)
    assert img_ids.shape == (2, 24, 4) and txt_ids.shape == (2, 7, 4)
    guidance = torch.full([2], 4.0) if variant == "dev" else None
    with torch.no_grad():
        out = pipe.transformer(hidden_states=packed, encoder_hidden_states=text, timestep=torch.tensor([0.3, 0.7]),
                               img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]
    assert out.shape == (2, 24, 128) and torch.isfinite(out).all()


@pytest.mark.parametrize("variant", VARIANTS)
def test_full_pipeline_inference_at_the_default_512_tokens(pipes, variant):
    pipe = pipes[variant]
    assert inspect.signature(pipe.__call__).parameters["max_sequence_length"].default == 512
    image = sample(pipe, output_type="pil")[0]
    assert image.size == (64, 64) and image.mode == "RGB"
    assert np.asarray(image).std() > 0


def test_builds_are_deterministic_per_seed_and_leave_the_global_rng_alone():
    before = torch.get_rng_state()
    a, b, c = (build_tiny_pipeline("klein", seed=s) for s in (0, 0, 1))
    assert torch.equal(torch.get_rng_state(), before)
    sa, sb, sc = state(a), state(b), state(c)
    assert sa.keys() == sb.keys() == sc.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    for component in ("transformer.", "vae.", "text_encoder."):
        weights = [k for k in sa if k.startswith(component) and sa[k].is_floating_point()]
        assert all(not torch.equal(sa[k], sc[k]) for k in weights), component


@pytest.mark.parametrize("variant", VARIANTS)
def test_diffusers_format_reloads_offline_and_samples_identically(tmp_path, pipes, variant):
    written = write_tiny_model(tmp_path, variant=variant, fmt="diffusers")
    assert {p.name for p in written} == {"model_index.json", "transformer", "vae", "text_encoder", "tokenizer",
                                         "scheduler"}
    assert all(p.exists() for p in written)
    assert list((tmp_path / "transformer").glob("*.safetensors")) and not list(tmp_path.rglob("*.bin"))
    loaded = DiffusionPipeline.from_pretrained(tmp_path, local_files_only=True)
    assert type(loaded) is type(pipes[variant])
    original, reloaded = state(pipes[variant]), state(loaded)
    assert original.keys() == reloaded.keys() and all(torch.equal(original[k], reloaded[k]) for k in original)
    # Bit-identical weights can still differ in the last float bit of the output: from_pretrained leaves
    # tensors at unaligned addresses in the file's buffer and CPU kernels then sum in another order.
    a, b = sample(pipes[variant], max_sequence_length=256), sample(loaded, max_sequence_length=256)
    assert np.abs(a - b).max() < 1e-5


@pytest.mark.parametrize("variant", VARIANTS)
def test_comfyui_format_writes_single_files_with_metadata(tmp_path, variant):
    written = write_tiny_model(tmp_path, variant=variant, fmt="comfyui", seed=3)
    expected = [tmp_path / COMFYUI_FILES[variant][c] for c in ("transformer", "vae", "text_encoder", "tokenizer")]
    assert written == expected and all(p.exists() for p in written)
    assert {p.name for p in tmp_path.iterdir()} == {"diffusion_models", "vae", "text_encoders", "tokenizer"}
    assert (tmp_path / "tokenizer" / "tokenizer.json").is_file()
    for path, component in zip(written[:3], ("transformer", "vae", "text_encoder")):
        meta = safe_open(str(path), "pt").metadata()
        assert meta["flux2_lora.variant"] == variant and meta["flux2_lora.component"] == component
        assert meta["flux2_lora.tiny_random"] == "true" and meta["flux2_lora.seed"] == "3"
        assert meta["flux2_lora.version"] == __version__
        assert isinstance(json.loads(meta["flux2_lora.config"]), dict)


@pytest.mark.parametrize("kwargs, named", [
    ({"variant": "schnell"}, ["'schnell'", "klein, dev"]),
    ({"fmt": "ckpt"}, ["'ckpt'", "diffusers, comfyui"]),
    ({"variant": "pro", "fmt": "gguf"}, ["'pro'", "'gguf'"]),
])
def test_unknown_variant_or_format_is_a_config_error(tmp_path, kwargs, named):
    with pytest.raises(ConfigError) as info:
        write_tiny_model(tmp_path / "out", **kwargs)
    assert all(text in str(info.value) for text in named)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="'schnell'"):
        build_tiny_pipeline("schnell")
