"""The frozen quantized base (fp8 / NF4 / int8): its math, its memory contract, and LoRAs trained over it.

Real diffusers and peft on tiny FLUX.2 [klein] models; the trainer runs a few steps per mode and its LoRA
file is loaded into the full-precision base by diffusers.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers.quantizers.bfl.utils import BFLFP8RLinear, dequantize_fp8r, quantize_fp8r
from safetensors.torch import load_file, save_file

from flux2_lora_core.config import load_config
from flux2_lora_core.errors import ConfigError
from flux2_lora_core.models import load_transformer
from flux2_lora_core.models.quantized_linear import (
    NF4_BLOCK,
    NF4_LEVELS,
    SCHEMES,
    QuantizedLinear,
    bitsandbytes_nf4,
    dequantize,
    quantize,
    quantize_transformer,
)
from flux2_lora_core.models.tiny_models import COMFYUI_FILES, build_tiny_pipeline, write_tiny_model
from flux2_lora_core.training import Callbacks, trainer
from flux2_lora_core.training.lora import add_lora

log = logging.getLogger(__name__)
LOAD = {"dtype": torch.float32, "device": torch.device("cpu")}
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
WEIGHT_SHAPES = ((40, 96), (96, 40))  # the test layer's weight, or its transpose (what F.linear saves)
# ~5x the measured ||y_q - y|| / ||y|| of the tiny transformer's output (fp8 7.8e-4, nf4 2.9e-3, int8 1.2e-4): small
# because the tiny model's output is mostly its full-precision embedders, residual stream and proj_out.
MAX_OUTPUT_ERROR = {"fp8": 0.005, "int8": 0.001, "nf4": 0.015}
# ~1.5x the measured per-layer weight error ||W_q - W|| / ||W|| (fp8 0.025, nf4 0.093, int8 0.004 on a normal weight).
MAX_WEIGHT_ERROR = {"fp8": 0.04, "int8": 0.006, "nf4": 0.14}


@pytest.fixture(scope="module")
def workspace(training_files):
    return training_files("klein", 4)


def transformer_output(model) -> torch.Tensor:
    """One forward pass on fixed inputs: a 4x4-token image and 6 text tokens."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, model.config.in_channels, generator=g)                  # (B, h*w, 128)
    text = torch.randn(1, 6, model.config.joint_attention_dim, generator=g)        # (B, L, 3 x text hidden)
    h, w = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    img_ids = torch.stack([torch.zeros(16), h.flatten(), w.flatten(), torch.zeros(16)], -1)[None]
    txt_ids = torch.stack([torch.zeros(6)] * 3 + [torch.arange(6.0)], -1)[None]
    with torch.no_grad():
        return model(hidden_states=x, encoder_hidden_states=text, timestep=torch.tensor([0.4]), img_ids=img_ids,
                     txt_ids=txt_ids, guidance=None, return_dict=False)[0]


# ---------------------------------------------------------------------------------------------- layouts
def test_layouts_match_their_definitions():
    weight = torch.randn(40, 96, generator=torch.Generator().manual_seed(0))
    q, s = quantize(weight, "fp8")
    bfl_q, bfl_s = quantize_fp8r(weight)                  # fp8 is exactly BFL's fp8r, the layout fp8 files load as
    assert q.dtype == torch.float8_e4m3fn and torch.equal(q.float(), bfl_q.float()) and torch.equal(s, bfl_s)
    q, s = quantize(weight, "int8")
    assert q.dtype == torch.int8 and s.shape == (40,) and q.abs().amax(dim=1).eq(127).all()
    q, s = quantize(weight, "nf4")                        # 3840 values: 60 blocks of 64, two codes a byte
    assert q.dtype == torch.uint8 and q.shape == (1920,) and s.shape == (3840 // NF4_BLOCK,)
    blocks = weight.reshape(-1, NF4_BLOCK) / weight.reshape(-1, NF4_BLOCK).abs().amax(dim=1, keepdim=True)
    nearest = (blocks[..., None] - torch.tensor(NF4_LEVELS)).abs().argmin(-1).reshape(-1)   # brute force
    assert torch.equal(torch.stack([q >> 4, q & 0x0F], -1).reshape(-1).long(), nearest)    # high nibble first
    odd = torch.randn(7, 13)                              # 91 values: the last block is padded
    q, s = quantize(odd, "nf4")
    assert dequantize(q, s, "nf4", (7, 13), torch.float32).shape == (7, 13)
    with pytest.raises(ConfigError, match="model.quantization"):
        quantize(weight, "int4")


def test_nf4_is_bitsandbytes_layout_and_its_kernel_decodes_it_the_same():
    """On CUDA, nf4 decodes through bitsandbytes' kernel: the bytes and absmax must be its own, and its decoder (its
    CPU backend here, the same call as on the GPU) must give the pure-torch values. bitsandbytes is a dependency
    wherever a wheel exists (requirements.txt), so CI runs this."""
    bnb = pytest.importorskip("bitsandbytes.functional")
    weight = torch.randn(96, 128, generator=torch.Generator().manual_seed(0))
    q, s = quantize(weight, "nf4")
    theirs, state = bnb.quantize_4bit(weight, blocksize=NF4_BLOCK, quant_type="nf4")
    assert torch.equal(theirs.reshape(-1), q) and torch.equal(state.absmax, s)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(bitsandbytes_nf4(q, s, (96, 128), dtype), dequantize(q, s, "nf4", (96, 128), dtype))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_input_gradient_is_the_dequantized_reference_and_no_dequantized_weight_is_saved(scheme):
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    dense = torch.nn.Linear(96, 40)
    layer = QuantizedLinear.from_linear(dense, scheme)
    reference_weight = layer.dequantized(torch.float32)
    x = torch.randn(2, 5, 96, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    grad_y = torch.randn(2, 5, 40)

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((tuple(t.shape), t.dtype)) or t, lambda t: t):
        y = layer(x)
    (y * grad_y).sum().backward()
    (F.linear(x_ref, reference_weight, dense.bias.detach()) * grad_y).sum().backward()
    assert torch.equal(y, F.linear(x_ref, reference_weight, dense.bias.detach()))
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-6)
    assert not any(shape in WEIGHT_SHAPES and dtype in FLOATS for shape, dtype in saved), saved

    # The hook does catch a dequantized copy: the F.linear reference saves one.
    caught = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: caught.append((tuple(t.shape), t.dtype)) or t, lambda t: t):
        F.linear(x_ref, layer.dequantized(torch.float32).requires_grad_(True))
    assert any(shape in WEIGHT_SHAPES and dtype in FLOATS for shape, dtype in caught)

    # Wrapped by peft like any Linear: the LoRA trains in fp32, the base still saves nothing dequantized.
    model = torch.nn.Sequential()
    model.add_module("proj", QuantizedLinear.from_linear(dense, scheme))
    inject_adapter_in_model(LoraConfig(r=4, target_modules=["proj"], init_lora_weights=False), model)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((tuple(t.shape), t.dtype)) or t, lambda t: t):
        out = model(x.detach())
    out.sum().backward()
    assert model.proj.lora_A["default"].weight.grad is not None and model.proj.base_layer.weight.grad is None
    assert not any(shape in WEIGHT_SHAPES and dtype in FLOATS for shape, dtype in saved), saved


def test_bf16_autocast_computes_in_bf16():
    layer = QuantizedLinear.from_linear(torch.nn.Linear(64, 32), "nf4")
    x = torch.randn(3, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.float32


# ---------------------------------------------------------------------------------------------- whole models
def test_output_error_per_mode(workspace):
    """||y_q - y|| / ||y|| of the tiny transformer per mode, against the fp32 base it was quantized from."""
    base, _ = load_transformer(workspace / "model", **LOAD)
    assert not any(isinstance(m, QuantizedLinear) for m in base.modules())
    y = transformer_output(base)
    dense = dict(base.named_modules())
    errors, weight_errors = {}, {}
    for scheme in SCHEMES:
        model, _ = load_transformer(workspace / "model", quantization=scheme, **LOAD)
        layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
        assert layers and all(m.scheme == scheme and not m.weight.requires_grad for m in layers.values())
        errors[scheme] = float((transformer_output(model) - y).norm() / y.norm())
        weight_errors[scheme] = max(float((m.dequantized(torch.float32) - dense[n].weight).norm()
                                          / dense[n].weight.norm()) for n, m in layers.items())
    log.warning("relative transformer output error vs the fp32 base: %s; worst layer weight error: %s",
                errors, weight_errors)
    print("relative output error:", errors, "worst layer weight error:", weight_errors)
    assert all(0 < errors[k] < MAX_OUTPUT_ERROR[k] for k in SCHEMES), errors
    assert all(0 < weight_errors[k] < MAX_WEIGHT_ERROR[k] for k in SCHEMES), weight_errors


def _config(root, tmp_path, *overrides):
    return load_config(None, [f"model.path={root / 'model'}", f"data.path={root / 'data'}", "data.resolution=64",
                              f"cache.dir={root / 'cache'}", f"output.dir={tmp_path / 'out'}", "lora.rank=4",
                              "train.steps=4", "train.lr=1e-2", "train.log_every=1", "sample.steps=0",
                              "train.timestep_sampling=uniform", *overrides])


def _deltas(transformer) -> dict[str, torch.Tensor]:
    from peft.tuners.lora import LoraLayer

    return {name: module.get_delta_weight(next(iter(module.lora_A))) for name, module in transformer.named_modules()
            if isinstance(module, LoraLayer) and module.lora_A}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_lora_trained_over_each_quantized_base_reloads_into_the_full_precision_base(workspace, tmp_path, scheme):
    from peft import set_peft_model_state_dict

    from flux2_lora_core.checkpoints.checkpoint import find_checkpoints, read_checkpoint

    extra = ["train.gradient_checkpointing=true"] if scheme == "int8" else []   # recomputation through the Function
    result = trainer.train(_config(workspace, tmp_path, f"model.quantization={scheme}", *extra), Callbacks())
    assert result.steps == 4 and all(math.isfinite(v) for v in result.losses) and len(set(result.losses)) > 1
    # The trained adapter, on the quantized base it was trained over.
    quantized, _ = load_transformer(workspace / "model", quantization=scheme, **LOAD)
    add_lora(quantized, rank=4, alpha=16.0, dropout=0.0, targets="attention_mlp", seed=0)
    tensors, _ = read_checkpoint(find_checkpoints(result.run_dir)[-1])
    set_peft_model_state_dict(quantized, tensors["adapter"])
    assert all(isinstance(m.base_layer, QuantizedLinear) for m in quantized.modules() if hasattr(m, "base_layer"))
    # Its file, loaded by diffusers into the unquantized base: the same LoRA, layer by layer.
    fresh = build_tiny_pipeline("klein", seed=0)
    fresh.load_lora_weights(result.lora_path)
    trained, loaded = _deltas(quantized), _deltas(fresh.transformer)
    assert trained.keys() == loaded.keys() and trained
    assert all(torch.allclose(trained[k], loaded[k], atol=1e-6) for k in trained)
    assert max(float(d.detach().abs().max()) for d in loaded.values()) > 1e-4       # it learned something


def test_fp8_file_trains_without_scaled_mm(workspace, tmp_path, monkeypatch):
    """diffusers' BFL fp8 linear would run `torch._scaled_mm` (no backward) on Ada/Hopper/Blackwell: an fp8 file
    loads into QuantizedLinear instead, holding the file's own fp8 tensors, so that branch is never reached."""
    write_tiny_model(tmp_path / "comfy", variant="klein", fmt="comfyui")
    source = tmp_path / "comfy" / COMFYUI_FILES["klein"]["transformer"]
    sd = load_file(source)
    expected = dict(sd)
    for key, weight in list(sd.items()):
        if key.endswith(".weight") and weight.ndim == 2 and ("blocks." in key):
            sd[key], sd[key[:-6] + "weight_scale"] = quantize_fp8r(weight)
            expected[key] = dequantize_fp8r(sd[key], sd[key[:-6] + "weight_scale"])
    save_file(sd, tmp_path / "fp8.safetensors")
    save_file(expected, tmp_path / "dequantized.safetensors")

    model, _ = load_transformer(tmp_path / "fp8.safetensors", **LOAD)
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert layers and not any(isinstance(m, BFLFP8RLinear) for m in model.modules())
    assert all(m.scheme == "fp8" and m.weight.dtype == torch.float8_e4m3fn for m in layers)
    reference, _ = load_transformer(tmp_path / "dequantized.safetensors", **LOAD)
    assert torch.equal(transformer_output(model), transformer_output(reference))   # the file's values, exactly
    requantized, _ = load_transformer(tmp_path / "fp8.safetensors", quantization="int8", **LOAD)
    assert {m.scheme for m in requantized.modules() if isinstance(m, QuantizedLinear)} == {"int8"}

    def no_backward(*args, **kwargs):
        raise RuntimeError("torch._scaled_mm reached: it has no backward")

    monkeypatch.setattr(torch, "_scaled_mm", no_backward)
    model_dir = workspace / "model"
    config = _config(workspace, tmp_path, f"model.vae={model_dir / 'vae'}",
                     f"model.text_encoder={model_dir / 'text_encoder'}", f"model.tokenizer={model_dir / 'tokenizer'}")
    config = config.replace({"model.path": str(tmp_path / "fp8.safetensors")})
    result = trainer.train(config, Callbacks())
    assert result.steps == 4 and all(math.isfinite(v) for v in result.losses) and len(set(result.losses)) > 1


def test_quantize_transformer_keeps_quantized_layers_and_refuses_unknown_schemes():
    model = build_tiny_pipeline("klein", seed=0).transformer
    quantize_transformer(model, "fp8", dtype=torch.float32)
    first = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    quantize_transformer(model, "int8", dtype=torch.float32)             # already quantized layers stay as they are
    assert [m for m in model.modules() if isinstance(m, QuantizedLinear)] == first
    with pytest.raises(ConfigError, match="model.quantization"):
        quantize_transformer(build_tiny_pipeline("klein", seed=0).transformer, "q4", dtype=torch.float32)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_cast_to_bf16_keeps_the_stored_weight_and_fp32_scales(tmp_path, scheme):
    """A streamed single-file load ends with `model.to(bf16)`: it once widened fp8 weights back to bf16 (no memory
    saved) and rounded every scale to bf16. Moves must still reach them."""
    write_tiny_model(tmp_path, variant="klein", fmt="comfyui")
    model, _ = load_transformer(tmp_path / COMFYUI_FILES["klein"]["transformer"], quantization=scheme,
                                dtype=torch.bfloat16, device=torch.device("cpu"))
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    stored = {"fp8": torch.float8_e4m3fn, "int8": torch.int8, "nf4": torch.uint8}[scheme]
    assert layers and all(m.weight.dtype == stored and m.weight_scale.dtype == torch.float32 for m in layers)
    model.to("meta")
    assert all(m.weight.device.type == m.weight_scale.device.type == "meta" for m in layers)
