"""models/encoder_memory.py: the text encoder kept fp8, quantized as it loads, or offloaded layer by layer.

Real files only: the tiny Qwen3 / Mistral text encoders written by `write_tiny_model`, an fp8 ComfyUI file made
from the same weights, real transformers models and diffusers' real group-offloading hooks (on the CPU the
"device" is the CPU too: the hooks run, nothing moves; on CUDA this path is not tested here).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from flux2_lora_core.errors import ConfigError
from flux2_lora_core.models import TEXT_LAYERS, load_text_encoder
from flux2_lora_core.models.encoder_memory import choose_offload, remove_offload, weight_bytes
from flux2_lora_core.models.quantized_linear import QuantizedLinear
from flux2_lora_core.models.tiny_models import COMFYUI_FILES, VARIANTS, write_tiny_model

CPU, F32 = torch.device("cpu"), torch.float32
FP8_MAX = 448.0
# Relative error (Frobenius) of the tapped hidden states (the FLUX.2 conditioning) against the fp32 encoder on the
# tiny random-weight [dev] encoder (31 layers, width 32), measured: int8 1.3e-2, fp8 5.8e-2, nf4 0.27; computing in
# bf16 instead of fp32 costs 1.2e-2, about int8's. Bounds with some room; trained weights are far better behaved.
BOUNDS = {"int8": 0.03, "fp8": 0.1, "nf4": 0.4}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Per family: the ComfyUI text-encoder file, its tokenizer folder, and an fp8 twin with its dequantized twin."""
    out = {}
    for family in VARIANTS:
        root = tmp_path_factory.mktemp(f"te-{family}")
        write_tiny_model(root, variant=family, fmt="comfyui")
        path = root / COMFYUI_FILES[family]["text_encoder"]
        sd = load_file(path)
        fp8, dequantized = dict(sd), dict(sd)
        for key, weight in sd.items():  # ComfyUI "mixed" fp8: per-tensor scale + a comfy_quant marker per layer
            if key.startswith("model.layers.") and key.endswith("proj.weight") and weight.ndim == 2:
                layer = key[: -len(".weight")]
                scale = weight.abs().amax().float() / FP8_MAX
                fp8[key] = (weight.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
                fp8[layer + ".weight_scale"] = scale
                fp8[layer + ".comfy_quant"] = torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)
                dequantized[key] = fp8[key].float() * scale
        save_file(fp8, root / "te-fp8.safetensors")
        save_file(dequantized, root / "te-dequantized.safetensors")
        out[family] = SimpleNamespace(root=root, file=path, tokenizer=root / COMFYUI_FILES[family]["tokenizer"],
                                      fp8=root / "te-fp8.safetensors", dequantized=root / "te-dequantized.safetensors")
    return out


def load(t, path, family, **kwargs):
    model, _ = load_text_encoder(path, family=family, tokenizer=t.tokenizer, dtype=F32, device=CPU, **kwargs)
    return model


def hidden(model, family) -> torch.Tensor:
    """The stacked hidden states FLUX.2 reads, for fixed token ids: (2, 3, 24, hidden)."""
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        states = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    return torch.stack([states[k] for k in TEXT_LAYERS[family]], dim=1)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def linears(model) -> list[torch.nn.Module]:
    return [m for name, m in model.named_modules() if name.startswith("layers.") and isinstance(m, torch.nn.Linear)]


@pytest.mark.parametrize("family", VARIANTS)
def test_an_fp8_file_stays_fp8_and_computes_as_its_dequantized_twin(tiny, family):
    t = tiny[family]
    model, reference = load(t, t.fp8, family), load(t, t.dequantized, family)
    quantized = linears(model)
    assert quantized and all(isinstance(m, QuantizedLinear) and m.scheme == "fp8" for m in quantized)
    assert all(m.weight.dtype == torch.float8_e4m3fn and m.weight_scale.shape == (m.out_features,) for m in quantized)
    assert all(not p.requires_grad for p in model.parameters())
    # The same fp32 weights reach F.linear (fp8 value x scale), so the outputs are bit-identical here.
    assert torch.equal(hidden(model, family), hidden(reference, family))


@pytest.mark.parametrize("scheme", ["fp8", "int8", "nf4"])
def test_quantized_on_load_is_close_to_full_precision_and_equals_quantizing_after(tiny, scheme):
    family = "dev"  # the 24 B encoder these modes are for
    t = tiny[family]
    full = load(t, t.file, family)
    model = load(t, t.file, family, quantization=scheme)
    assert all(isinstance(m, QuantizedLinear) and m.scheme == scheme for m in linears(model))
    assert type(model.embed_tokens) is torch.nn.Embedding and model.embed_tokens.weight.dtype == F32
    expected = hidden(full, family)
    error = relative(hidden(model, family), expected)
    assert 0 < error < BOUNDS[scheme], error
    for name, module in list(full.named_modules()):  # quantizing the loaded model afterwards: the same weights
        if name.startswith("layers.") and type(module) is torch.nn.Linear:
            parent, _, child = name.rpartition(".")
            setattr(full.get_submodule(parent), child, QuantizedLinear.from_linear(module, scheme))
    assert torch.equal(hidden(model, family), hidden(full, family))


def test_an_fp8_file_asked_for_int8_is_requantized_from_its_fp8_values(tiny):
    t = tiny["klein"]
    model = load(t, t.fp8, "klein", quantization="int8")
    reference = load(t, t.dequantized, "klein", quantization="int8")
    assert all(isinstance(m, QuantizedLinear) and m.scheme == "int8" for m in linears(model))
    assert torch.equal(hidden(model, "klein"), hidden(reference, "klein"))


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_layer_offload_gives_the_same_hidden_states(tiny, quantization):
    t = tiny["dev"]
    plain = load(t, t.file, "dev", quantization=quantization)
    offloaded = load(t, t.file, "dev", quantization=quantization, offload="layers")
    hooked = [name for name, m in offloaded.named_modules() if hasattr(m, "_diffusers_hook")]
    assert "layers.0" in hooked and f"layers.{offloaded.config.num_hidden_layers - 1}" in hooked
    expected = hidden(plain, "dev")
    assert torch.equal(hidden(offloaded, "dev"), expected)
    assert torch.equal(hidden(offloaded, "dev"), expected)  # a second caption batch: the same
    remove_offload(offloaded)
    assert not any(hasattr(m, "_diffusers_hook") for m in offloaded.modules())
    assert torch.equal(hidden(offloaded, "dev"), expected)


def test_auto_offload_is_off_on_the_cpu_and_sizes_come_from_the_meta_model():
    from accelerate import init_empty_weights
    from transformers import MistralConfig, MistralModel

    # Mistral Small 3.x's language model (FLUX.2 [dev]'s text encoder), built on the meta device: no memory.
    config = MistralConfig(vocab_size=131072, hidden_size=5120, intermediate_size=32768, num_hidden_layers=40,
                           num_attention_heads=32, num_key_value_heads=8, head_dim=128)
    with init_empty_weights():
        model = MistralModel(config)
    size = {scheme: weight_bytes(model, scheme=scheme, dtype=torch.bfloat16, fp8_file=False) / 1e9
            for scheme in ("none", "fp8", "int8", "nf4")}
    assert 45 < size["none"] < 47  # 22.9 B parameters (no LM head) in bf16
    assert 23 < size["fp8"] == size["int8"] < 24.5 and 13 < size["nf4"] < 14.5  # the embedding (1.3 GB) stays bf16
    assert weight_bytes(model, scheme="none", dtype=torch.bfloat16, fp8_file=True) / 1e9 == size["fp8"]
    assert choose_offload("auto", 10**12, CPU) == "none"
    assert choose_offload("layers", 1, CPU) == "layers" and choose_offload("none", 10**15, CPU) == "none"


def test_bad_values_name_their_key(tiny):
    t = tiny["klein"]
    with pytest.raises(ConfigError, match="model.text_encoder_quantization"):
        load(t, t.file, "klein", quantization="int4")
    with pytest.raises(ConfigError, match="cache.text_encoder_offload"):
        load(t, t.file, "klein", offload="disk")


def test_the_caption_cache_is_keyed_by_the_quantization(tiny, tmp_path, make_image):
    from flux2_lora_core.cache import CacheSettings, build_latent_cache
    from flux2_lora_core.cache.frozen_encoders import open_encoders
    from flux2_lora_core.config import CacheConfig, ModelConfig
    from flux2_lora_core.data.dataset import load_dataset

    files = {part: str(tiny["klein"].root / name) for part, name in COMFYUI_FILES["klein"].items()}
    for n in range(2):
        make_image(tmp_path / "data" / f"{n}.png", size=(64, 64))
        (tmp_path / "data" / f"{n}.txt").write_text(f"photo number {n}", encoding="utf-8")
    dataset = load_dataset(tmp_path / "data")

    def build(quantization):
        model = ModelConfig(path=files["transformer"], vae=files["vae"], text_encoder=files["text_encoder"],
                            tokenizer=files["tokenizer"], text_encoder_quantization=quantization)
        encoders = open_encoders(model, CacheConfig(text_encoder_offload="layers"))
        cache = build_latent_cache(dataset, encoders, CacheSettings(resolutions=(64,)), cache_dir=tmp_path / "cache",
                                   batch_size=1)
        return encoders, cache

    bf16, first = build("none")
    nf4, second = build("nf4")
    _, third = build("nf4")
    assert bf16.fingerprint("text") != nf4.fingerprint("text") and bf16.fingerprint("vae") == nf4.fingerprint("vae")
    assert second.summary.captions_encoded == first.summary.captions_encoded == 3  # 2 captions + the empty one
    assert third.summary.captions_encoded == 0 and third.summary.captions_reused == 3
    assert second.summary.images_encoded == 0 and second.summary.images_reused == 2  # the VAE's entries are shared
    a, b = first.text(0), second.text(0)
    assert a.shape == b.shape and not torch.equal(a, b) and relative(b, a) < BOUNDS["nf4"]
