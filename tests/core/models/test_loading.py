"""models/loading.py: FLUX.2 from diffusers folders and ComfyUI/BFL single files, twins identical, errors that say why.

Every file here is real: the tiny models written by `write_tiny_model`, and quantized, prefixed, cut or
foreign variants of them built from the same weights; nothing of diffusers or transformers is mocked.
"""

from __future__ import annotations

import json
import pickle
import shutil
from types import SimpleNamespace

import pytest
import torch
from diffusers import Flux2Transformer2DModel
from diffusers.quantizers.bfl.utils import (
    BFLFP8RLinear,
    BFLNVFP4Linear,
    dequantize_fp8r,
    dequantize_nvfp4,
    quantize_fp8r,
    quantize_nvfp4,
)
from safetensors.torch import load_file, save_file

from flux2_lora_core.errors import ConfigError, ModelError
from flux2_lora_core.models import (
    ModelSources,
    check_compatible,
    choose_device,
    choose_dtype,
    detect_variant,
    load_text_encoder,
    load_transformer,
    load_vae,
    release,
    resolve_sources,
    shipped_config,
    weights_fingerprint,
)
from flux2_lora_core.models.devices import with_oom_retry
from flux2_lora_core.models.quantized_linear import QuantizedLinear
from flux2_lora_core.models.single_file import transformer_to_bfl
from flux2_lora_core.models.tiny_models import (
    COMFYUI_FILES,
    VARIANTS,
    build_tiny_pipeline,
    write_tiny_model,
)

CPU, F32 = torch.device("cpu"), torch.float32
LOAD = {"dtype": F32, "device": CPU}
FP8_MAX = 448.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Per variant: the reference pipeline, its diffusers folder and its ComfyUI single files (same weights)."""
    out = {}
    for variant in VARIANTS:
        root = tmp_path_factory.mktemp(f"models-{variant}")
        write_tiny_model(root / "diffusers", variant=variant, fmt="diffusers")
        write_tiny_model(root / "comfyui", variant=variant, fmt="comfyui")
        files = {part: root / "comfyui" / name for part, name in COMFYUI_FILES[variant].items()}
        out[variant] = SimpleNamespace(folder=root / "diffusers", files=files, pipe=build_tiny_pipeline(variant))
    return out


@pytest.fixture(scope="module")
def twins(tiny):
    """Each component loaded from the diffusers folder ("folder") and from its single file ("file")."""
    out = {}
    for variant, t in tiny.items():
        te_folder, tok_folder = load_text_encoder(t.folder, family=variant, **LOAD)
        te_file, tok_file = load_text_encoder(t.files["text_encoder"], family=variant, tokenizer=t.files["tokenizer"],
                                              **LOAD)
        out[variant] = {
            "transformer": (load_transformer(t.folder, **LOAD), load_transformer(t.files["transformer"], **LOAD)),
            "vae": (load_vae(t.folder, **LOAD), load_vae(t.files["vae"], **LOAD)),
            "text_encoder": ((te_folder, tok_folder), (te_file, tok_file)),
        }
    return out


def transformer_output(model) -> torch.Tensor:
    """One forward pass on fixed inputs: a 4x4-token image and 6 text tokens."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, model.config.in_channels, generator=g)                  # (B, h*w, 128)
    text = torch.randn(1, 6, model.config.joint_attention_dim, generator=g)        # (B, L, 3 x text hidden)
    h, w = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    img_ids = torch.stack([torch.zeros(16), h.flatten(), w.flatten(), torch.zeros(16)], -1)[None]  # rows (0,h,w,0)
    txt_ids = torch.stack([torch.zeros(6)] * 3 + [torch.arange(6.0)], -1)[None]                   # rows (0,0,0,l)
    guidance = torch.tensor([3.5]) if model.config.guidance_embeds else None
    with torch.no_grad():
        return model(hidden_states=x, encoder_hidden_states=text, timestep=torch.tensor([0.4]), img_ids=img_ids,
                     txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]


def hidden_states(model, tokenizer) -> tuple[torch.Tensor, ...]:
    batch = tokenizer(["a red fox", "two cats on a sofa, watercolour"], padding="max_length", max_length=40,
                      return_tensors="pt")
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True,
                     use_cache=False).hidden_states


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


def assert_frozen(model: torch.nn.Module) -> None:
    assert not model.training and not any(p.requires_grad for p in model.parameters())


# ---------------------------------------------------------------------------------------------- folders and files
@pytest.mark.parametrize("variant", VARIANTS)
def test_diffusers_folder_and_component_folders_load(tiny, twins, variant):
    (model, found), _ = twins[variant]["transformer"]
    assert (found.name, found.family) == ("custom", variant)  # tiny shapes match no shipped model
    assert found.guidance_embeds is (variant == "dev") and found.joint_attention_dim == 96
    assert found.text_encoder_layers == {"klein": (9, 18, 27), "dev": (10, 20, 30)}[variant]
    assert isinstance(model, Flux2Transformer2DModel) and model.dtype == F32
    assert_frozen(model)
    folder = tiny[variant].folder
    component, _ = load_transformer(folder / "transformer", **LOAD)
    assert_same_state(component, model)
    assert_same_state(load_vae(folder / "vae", **LOAD), twins[variant]["vae"][0])
    text_encoder, tokenizer = load_text_encoder(folder / "text_encoder", family=variant, **LOAD)  # tokenizer/ beside
    assert_same_state(text_encoder, twins[variant]["text_encoder"][0][0])
    assert tokenizer.chat_template == tiny[variant].pipe.tokenizer.chat_template


@pytest.mark.parametrize("variant", VARIANTS)
def test_single_files_equal_their_diffusers_twins(tiny, twins, variant):
    pipe = tiny[variant].pipe
    ((a, va), (b, vb)) = twins[variant]["transformer"]
    assert va == vb
    assert_same_state(a, b)
    assert_same_state(b, pipe.transformer)
    assert torch.equal(transformer_output(a), transformer_output(b))
    assert weights_fingerprint(a) == weights_fingerprint(b)

    vae_a, vae_b = twins[variant]["vae"]
    assert_same_state(vae_a, vae_b)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        assert torch.equal(vae_a.encode(image).latent_dist.mode(), vae_b.encode(image).latent_dist.mode())
    assert weights_fingerprint(vae_a) == weights_fingerprint(vae_b)

    (te_a, tok_a), (te_b, tok_b) = twins[variant]["text_encoder"]
    assert type(te_a).__name__ == {"klein": "Qwen3Model", "dev": "MistralModel"}[variant]
    assert_same_state(te_a, te_b)
    assert weights_fingerprint(te_a) == weights_fingerprint(te_b)
    reference = pipe.text_encoder  # the pipeline's own Qwen3ForCausalLM / Mistral3ForConditionalGeneration
    expected = hidden_states(reference, pipe.tokenizer)
    for got in (hidden_states(te_a, tok_a), hidden_states(te_b, tok_b)):
        assert len(got) == len(expected) and all(torch.equal(x, y) for x, y in zip(got, expected, strict=True))
    for model in (a, b, vae_a, vae_b, te_a, te_b):
        assert_frozen(model)
    check_compatible(va, te_b)


def test_prefixed_and_all_in_one_files_load(tiny, twins, tmp_path):
    files = tiny["klein"].files
    transformer, vae = load_file(files["transformer"]), load_file(files["vae"])
    save_file({f"model.diffusion_model.{k}": v for k, v in transformer.items()}, tmp_path / "prefixed.safetensors")
    model, variant = load_transformer(tmp_path / "prefixed.safetensors", **LOAD)
    assert variant.family == "klein"
    assert_same_state(model, twins["klein"]["transformer"][0][0])
    # A whole checkpoint: the transformer and the VAE side by side under their container prefixes.
    both = {**{f"model.diffusion_model.{k}": v for k, v in transformer.items()},
            **{f"first_stage_model.{k}": v for k, v in vae.items()}}
    save_file(both, tmp_path / "checkpoint.safetensors")
    assert_same_state(load_transformer(tmp_path / "checkpoint.safetensors", **LOAD)[0], model)
    assert_same_state(load_vae(tmp_path / "checkpoint.safetensors", **LOAD), twins["klein"]["vae"][0])
    # A lone diffusers-named transformer file needs no conversion.
    save_file(twins["klein"]["transformer"][0][0].state_dict(), tmp_path / "diffusers-names.safetensors")
    assert_same_state(load_transformer(tmp_path / "diffusers-names.safetensors", **LOAD)[0], model)


# ---------------------------------------------------------------------------------------------- fp8
def _comfy_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI's per-tensor scaled fp8: one fp32 scale for the whole weight."""
    scale = weight.abs().amax().float() / FP8_MAX
    return (weight.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def _quantized(sd: dict, layout: str) -> tuple[dict, dict, dict]:
    """(file tensors, file metadata, dequantized weights the loaded model must compute with)."""
    out, expected, metadata, layers = dict(sd), dict(sd), {}, {}
    keep = ("img_in.", "txt_in.", "final_layer.")  # ComfyUI's fp8 files keep the in/out projections in bf16
    for key, weight in sd.items():
        if not key.endswith(".weight") or weight.ndim != 2 or (layout.startswith("comfy") and key.startswith(keep)):
            continue
        layer = key[: -len(".weight")]
        if layout == "bfl_fp8r":
            out[key], out[layer + ".weight_scale"] = quantize_fp8r(weight)
            expected[key] = dequantize_fp8r(out[key], out[layer + ".weight_scale"])
        elif layout == "bfl_nvfp4":
            w, s, s2 = quantize_nvfp4(weight)
            out.update({key: w, layer + ".weight_scale": s, layer + ".weight_scale_2": s2,
                        layer + ".input_scale": torch.ones(())})
            expected[key] = dequantize_nvfp4(w, s, s2)
        else:
            out[key], scale = _comfy_fp8(weight)
            expected[key] = out[key].float() * scale
            if layout == "comfy_scaled_fp8":  # old layout: marker + .scale_weight / .scale_input
                out.update({layer + ".scale_weight": scale.reshape(1), layer + ".scale_input": torch.ones(())})
            else:  # "mixed": .weight_scale plus the format per layer, in a tensor or in the header
                out.update({layer + ".weight_scale": scale, layer + ".input_scale": torch.full((), 0.5)})
                layers[layer] = {"format": "float8_e4m3fn"}
                if layout == "comfy_mixed":
                    out[layer + ".comfy_quant"] = torch.tensor(list(json.dumps(layers[layer]).encode()),
                                                               dtype=torch.uint8)
    if layout == "comfy_scaled_fp8":
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    if layout == "comfy_mixed_metadata":  # with a container prefix, which the header's layer names carry too
        out = {f"model.diffusion_model.{k}": v for k, v in out.items()}
        layers = {f"model.diffusion_model.{k}": v for k, v in layers.items()}
        metadata["_quantization_metadata"] = json.dumps({"format_version": "1.0", "layers": layers})
    return out, metadata, expected


@pytest.mark.parametrize("layout", ["bfl_fp8r", "comfy_scaled_fp8", "comfy_mixed", "comfy_mixed_metadata",
                                    "bfl_nvfp4"])
def test_quantized_files_stay_quantized_and_compute_with_the_dequantized_weights(tiny, tmp_path, layout):
    sd = load_file(tiny["dev"].files["transformer"])
    tensors, metadata, expected = _quantized(sd, layout)
    save_file(tensors, tmp_path / "q.safetensors", metadata=metadata)
    save_file(expected, tmp_path / "dequantized.safetensors")
    model, variant = load_transformer(tmp_path / "q.safetensors", **LOAD)
    reference, _ = load_transformer(tmp_path / "dequantized.safetensors", **LOAD)
    linear = BFLNVFP4Linear if layout == "bfl_nvfp4" else QuantizedLinear  # fp8: the engine's trainable linear
    quantized = [m for m in model.modules() if isinstance(m, linear)]
    assert quantized and variant.family == "dev" and not any(isinstance(m, BFLFP8RLinear) for m in model.modules())
    if linear is QuantizedLinear:
        assert all(m.weight.dtype == torch.float8_e4m3fn and m.weight_scale.shape == (m.out_features,)
                   for m in quantized)
    assert_frozen(model)
    a, b = transformer_output(model), transformer_output(reference)
    assert torch.equal(a, b)  # the fp8 layers compute with exactly the dequantized weights


@pytest.mark.parametrize("fmt", ["mxfp8", "nvfp4", "int8_tensorwise", "float8_e5m2", "weight_scale_inv"])
def test_quantized_formats_without_an_exact_fp8_form_are_refused_by_name(tiny, tmp_path, fmt):
    sd = load_file(tiny["klein"].files["transformer"])
    key = "double_blocks.0.img_attn.qkv.weight"
    if fmt == "float8_e5m2":  # ComfyUI's old layout, marked by the marker's dtype
        sd.update({key: sd[key].to(torch.float8_e5m2), "double_blocks.0.img_attn.qkv.scale_weight": torch.ones(()),
                   "scaled_fp8": torch.empty(0, dtype=torch.float8_e5m2)})
    elif fmt == "weight_scale_inv":  # block-scaled fp8 (DeepSeek / HF "fp8" style): unscaled reading would be wrong
        sd.update({key: sd[key].to(torch.float8_e4m3fn), key + "_scale_inv": torch.ones(3, 1)})
    else:
        sd["double_blocks.0.img_attn.qkv.comfy_quant"] = torch.tensor(list(json.dumps({"format": fmt}).encode()),
                                                                      dtype=torch.uint8)
    path = tmp_path / f"flux2-{fmt}.safetensors"
    save_file(sd, path)
    with pytest.raises(ModelError) as info:
        load_transformer(path, **LOAD)
    assert str(path) in str(info.value) and fmt in str(info.value) and "bf16" in str(info.value)


def test_fp8_text_encoder_file_is_read_with_its_scales(tiny, tmp_path):
    """ComfyUI also ships fp8 text encoders; cast without their scales they would encode garbage."""
    sd = load_file(tiny["klein"].files["text_encoder"])
    quantized, dequantized = dict(sd), dict(sd)
    for key, weight in sd.items():
        if key.endswith(("proj.weight", "_proj.weight")) and weight.ndim == 2:
            quantized[key], scale = _comfy_fp8(weight)
            quantized[key[: -len(".weight")] + ".weight_scale"] = scale
            quantized[key[: -len(".weight")] + ".comfy_quant"] = torch.tensor(
                list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)
            dequantized[key] = quantized[key].float() * scale
    save_file(quantized, tmp_path / "qwen3-fp8.safetensors")
    save_file(dequantized, tmp_path / "qwen3-dequantized.safetensors")
    tokenizer = tiny["klein"].files["tokenizer"]
    model, tok = load_text_encoder(tmp_path / "qwen3-fp8.safetensors", family="klein", tokenizer=tokenizer, **LOAD)
    reference, _ = load_text_encoder(tmp_path / "qwen3-dequantized.safetensors", family="klein", tokenizer=tokenizer,
                                     **LOAD)
    fp8 = {name for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}  # kept fp8 (encoder_memory.py)
    assert fp8 and all(model.get_submodule(n).weight.dtype == torch.float8_e4m3fn for n in fp8)
    state = model.state_dict()
    for key, expected in reference.state_dict().items():  # every weight equals the dequantized file's
        layer = key.rpartition(".")[0]
        got = model.get_submodule(layer).dequantized() if layer in fp8 else state[key]
        assert got.dtype == expected.dtype and torch.equal(got, expected), key
    assert all(torch.equal(a, b) for a, b in zip(hidden_states(model, tok), hidden_states(reference, tok), strict=True))


# ---------------------------------------------------------------------------------------------- errors
def _flux1_file(path):
    save_file({"img_in.weight": torch.zeros(8, 64), "double_blocks.0.img_mod.lin.weight": torch.zeros(48, 8),
               "vector_in.in_layer.weight": torch.zeros(8, 4)}, path)


def _sdxl_file(path):
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
               "model.diffusion_model.label_emb.0.0.weight": torch.zeros(4, 8),
               "first_stage_model.decoder.conv_in.weight": torch.zeros(8, 4, 3, 3)}, path)


def _truncated(tiny, path):
    data = tiny["klein"].files["transformer"].read_bytes()
    path.write_bytes(data[: len(data) - 1000])


ERRORS = {  # name: (make the bad input at `path` (None: use `path` as is), load it, words the message must hold)
    "missing file": (None, lambda t, p: load_transformer(p, **LOAD), ["does not exist"]),
    "missing text encoder": (None, lambda t, p: load_text_encoder(p, family="klein", **LOAD), ["does not exist"]),
    "not a FLUX.2 folder": (lambda t, p: p.mkdir(), lambda t, p: load_transformer(p, **LOAD), ["no config.json"]),
    "SDXL pipeline folder": (lambda t, p: (p.mkdir(), (p / "model_index.json").write_text(
        '{"_class_name": "StableDiffusionXLPipeline"}')), lambda t, p: load_vae(p, **LOAD),
        ["StableDiffusionXLPipeline", "not a FLUX.2"]),
    "truncated file": (lambda t, p: _truncated(t, p), lambda t, p: load_transformer(p, **LOAD), ["truncated"]),
    "pickled zip checkpoint": (lambda t, p: torch.save({"w": torch.zeros(2)}, p), lambda t, p: load_vae(p, **LOAD),
                               ["PyTorch zip", "never opened"]),
    "raw pickle": (lambda t, p: p.write_bytes(pickle.dumps({"w": [1.0]}, protocol=2)),
                   lambda t, p: load_transformer(p, **LOAD), ["pickle", "safetensors"]),
    "VAE as transformer": (lambda t, p: shutil.copy(t["klein"].files["vae"], p),
                           lambda t, p: load_transformer(p, **LOAD), ["FLUX.2 VAE", "not a FLUX.2 transformer"]),
    "transformer as VAE": (lambda t, p: shutil.copy(t["dev"].files["transformer"], p), lambda t, p: load_vae(p, **LOAD),
                           ["FLUX.2 transformer", "model.vae"]),
    "transformer as text encoder": (lambda t, p: shutil.copy(t["dev"].files["transformer"], p),
                                    lambda t, p: load_text_encoder(p, family="dev", **LOAD),
                                    ["FLUX.2 transformer", "model.text_encoder"]),
    "FLUX.1 transformer": (lambda t, p: _flux1_file(p), lambda t, p: load_transformer(p, **LOAD),
                           ["FLUX.1 transformer", "64 input channels"]),
    "SDXL checkpoint": (lambda t, p: _sdxl_file(p), lambda t, p: load_transformer(p, **LOAD), ["SDXL UNet"]),
    "Qwen3 text encoder for [dev]": (lambda t, p: shutil.copy(t["klein"].files["text_encoder"], p),
                                     lambda t, p: load_text_encoder(p, family="dev", tokenizer=t["klein"].files[
                                         "tokenizer"], **LOAD), ["qwen3", "FLUX.2 [dev] needs Mistral"]),
    "single-file text encoder without tokenizer": (
        lambda t, p: shutil.copy(t["klein"].files["text_encoder"], p),
        lambda t, p: load_text_encoder(p, family="klein", **LOAD), ["model.tokenizer"]),
    "explicit variant contradicts the shapes": (
        lambda t, p: shutil.copy(t["klein"].files["transformer"], p),
        lambda t, p: load_transformer(p, variant="flux2-dev", **LOAD), ["model.variant", "'flux2-dev'", "[klein]"]),
    "explicit family contradicts the shapes": (
        lambda t, p: shutil.copy(t["dev"].files["transformer"], p),
        lambda t, p: load_transformer(p, variant="klein", **LOAD), ["model.variant", "[dev]"]),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_inputs_are_model_errors_that_name_the_file(tiny, tmp_path, case):
    make, load, words = ERRORS[case]
    path = tmp_path / "input.safetensors" if "folder" not in case else tmp_path / "folder"
    if make is not None:
        make(tiny, path)
    with pytest.raises(ModelError) as info:
        load(tiny, path)
    message = str(info.value)
    assert str(path) in message, message
    assert all(word in message for word in words), message


def test_unknown_variant_name_is_a_config_error(tiny):
    with pytest.raises(ConfigError, match="model.variant.*'schnell'"):
        load_transformer(tiny["klein"].files["transformer"], variant="schnell", **LOAD)
    assert load_transformer(tiny["klein"].files["transformer"], variant="klein", **LOAD)[1].name == "custom"


def test_text_encoder_must_fit_the_transformer(tiny, twins):
    dev_variant = twins["dev"]["transformer"][1][1]
    klein_encoder = twins["klein"]["text_encoder"][1][0]
    check_compatible(twins["klein"]["transformer"][1][1], klein_encoder)
    with pytest.raises(ModelError) as info:  # same width as the tiny Mistral, wrong family
        check_compatible(dev_variant, klein_encoder)
    assert str(tiny["klein"].files["text_encoder"]) in str(info.value) and "Mistral" in str(info.value)
    real_klein = detect_variant(shipped_config("flux2-klein-4b", "transformer"), source="flux-2-klein-4b.safetensors")
    with pytest.raises(ModelError) as info:
        check_compatible(real_klein, klein_encoder)
    message = str(info.value)
    assert "hidden size 32" in message and "7680" in message and "hidden size 2560" in message


# ---------------------------------------------------------------------------------------------- variants
@pytest.mark.parametrize("name, family", [("flux2-dev", "dev"), ("flux2-klein-4b", "klein"),
                                          ("flux2-klein-9b", "klein")])
def test_detect_variant_on_the_real_configs_and_shapes(name, family):
    config = shipped_config(name, "transformer")
    with torch.device("meta"):  # real sizes, no memory: shapes only
        model = Flux2Transformer2DModel.from_config(config)
    diffusers_names = model.state_dict()
    for source in (config, dict(model.config), diffusers_names, transformer_to_bfl(diffusers_names),
                   {k: tuple(v.shape) for k, v in transformer_to_bfl(diffusers_names).items()}):
        variant = detect_variant(source)
        assert (variant.name, variant.family) == (name, family)
        assert {k: variant.transformer_config[k] for k in config} == config
    assert variant.joint_attention_dim == {"flux2-dev": 15360, "flux2-klein-4b": 7680, "flux2-klein-9b": 12288}[name]
    changed = detect_variant({**config, "num_single_layers": config["num_single_layers"] - 1})
    assert (changed.name, changed.family) == ("custom", family)


# ---------------------------------------------------------------------------------------------- sources
def test_resolve_sources_from_folders_and_files(tiny, tmp_path):
    folder, files = tiny["dev"].folder, tiny["dev"].files
    parts = {"transformer": folder / "transformer", "vae": folder / "vae", "text_encoder": folder / "text_encoder",
             "tokenizer": folder / "tokenizer"}
    assert resolve_sources(folder) == ModelSources(**parts)
    assert resolve_sources(str(folder / "transformer")) == ModelSources(**parts)  # siblings of a component folder
    assert resolve_sources(folder, vae=str(files["vae"])).vae == files["vae"]      # explicit parts override
    explicit = resolve_sources(files["transformer"], vae=files["vae"], text_encoder=files["text_encoder"],
                               tokenizer=files["tokenizer"])
    assert explicit == ModelSources(files["transformer"], files["vae"], files["text_encoder"], files["tokenizer"])
    with pytest.raises(ModelError) as info:  # every missing part at once, by the key that fixes it
        resolve_sources(files["transformer"], tokenizer=tmp_path / "nowhere")
    message = str(info.value)
    assert all(key in message for key in ("model.vae", "model.text_encoder", "model.tokenizer", "nowhere"))
    with pytest.raises(ModelError, match="model.path.*does not exist"):
        resolve_sources(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="not a FLUX.2 folder"):
        resolve_sources(tmp_path / "empty")


# ---------------------------------------------------------------------------------------------- memory, dtypes
def test_weights_fingerprint_changes_with_any_weight_or_dtype(tiny):
    vae = load_vae(tiny["klein"].files["vae"], **LOAD)
    before = weights_fingerprint(vae)
    assert before == weights_fingerprint(load_vae(tiny["klein"].folder, **LOAD))
    with torch.no_grad():
        vae.decoder.conv_out.weight.view(-1)[0] += 1e-3
    changed = weights_fingerprint(vae)
    assert changed != before
    assert weights_fingerprint(vae.to(torch.bfloat16)) != changed


def test_release_frees_the_weights_even_while_referenced(tiny):
    vae = load_vae(tiny["klein"].files["vae"], **LOAD)
    release(vae, None)
    assert all(t.device.type == "meta" for t in [*vae.parameters(), *vae.buffers()])


def test_oom_is_retried_once_then_explained():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return "model"

    assert with_oom_retry(flaky, what="the transformer", path="flux2-dev.safetensors") == "model" and len(calls) == 2

    def always():
        calls.append(1)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    calls.clear()
    with pytest.raises(ModelError) as info:
        with_oom_retry(always, what="the transformer", path="flux2-dev.safetensors")
    assert len(calls) == 2
    assert all(w in str(info.value) for w in ("flux2-dev.safetensors", "out of memory", "model.dtype", "fp8"))
    with pytest.raises(ValueError):  # anything else is not retried
        with_oom_retry(lambda: (_ for _ in ()).throw(ValueError("bad")), what="x")


def test_choose_dtype_and_device_on_cpu():
    cpu = torch.device("cpu")
    assert choose_dtype("auto", cpu) == torch.float32
    assert choose_dtype("bf16", "cpu") == torch.bfloat16 and choose_dtype(torch.float16, cpu) == torch.float16
    assert choose_dtype("float32", cpu) == torch.float32
    for impossible in ("fp8", "int4", torch.float64):
        with pytest.raises(ConfigError) as info:
            choose_dtype(impossible, cpu)
        assert info.value.problems[0][0] == "model.dtype"
    assert choose_device("cpu") == cpu
    assert choose_device("auto").type == ("cuda" if torch.cuda.is_available() else choose_device("auto").type)
    with pytest.raises(ConfigError, match="model.device"):
        choose_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="model.device.*'cuda'"):
            choose_device("cuda")
