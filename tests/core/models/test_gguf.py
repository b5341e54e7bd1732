"""GGUF transformer files: decoded exactly as the `gguf` package's reference, loaded without widening, trained over,
and the LoRA trained over one reloads into the unquantized base."""

from __future__ import annotations

import math

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from flux2_lora_core.errors import ModelError
from flux2_lora_core.models import ggml_quants, load_transformer
from flux2_lora_core.models.files import read_header
from flux2_lora_core.models.quantized_linear import QuantizedLinear
from flux2_lora_core.models.single_file import transformer_to_bfl
from flux2_lora_core.models.tiny_models import build_tiny_pipeline
from flux2_lora_core.training import Callbacks, trainer
from flux2_lora_core.training.lora import add_lora

from .test_quantized_linear import LOAD, _config, _deltas, transformer_output

# Byte offsets of each type's fp16 scale fields (d, and dmin / m where the type has one).
SCALE_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q2_K": (80, 82),
                "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
# Per BFL key pattern: the type the test file stores it in. The qkv weights test the row split, the final
# modulation the half swap, linear2 and time_in the K-quants (they need 256-column rows); the rest stays F32/F16.
PLAN = {"img_attn.qkv": "Q8_0", "txt_attn.qkv": "Q5_1", "img_mlp.0": "Q4_0", "img_mlp.2": "Q5_0", "txt_mlp.2": "Q8_0",
        "single_blocks.0.linear1": "Q4_1", "single_blocks.1.linear1": "Q8_0", "single_blocks.0.linear2": "Q4_K",
        "single_blocks.1.linear2": "Q6_K", "time_in.in_layer": "Q5_K", "final_layer.adaLN_modulation.1": "Q8_0"}


def random_blocks(qtype: str, rows: int, columns: int, rng, std: float = 0.0) -> np.ndarray:
    """Valid `qtype` rows of random codes whose scale fields make finite values (with `std`: of about that std)."""
    block, size, _ = ggml_quants.TYPES[qtype]
    raw = rng.integers(0, 256, size=(rows, columns // block * size), dtype=np.uint8)
    blocks = raw.reshape(-1, size)
    scales = rng.uniform(1e-3, 1e-2, size=(blocks.shape[0], 1)) if not std else np.ones((blocks.shape[0], 1))
    for at in SCALE_FIELDS[qtype]:
        blocks[:, at:at + 2] = scales.astype(np.float16).view(np.uint8)
    if std:  # every value is linear in the scale fields: rescale them all by one factor
        values = gguf.quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, qtype))
        for at in SCALE_FIELDS[qtype]:
            blocks[:, at:at + 2] = np.full((blocks.shape[0], 1), std / values.std(), np.float16).view(np.uint8)
    return raw


@pytest.mark.parametrize("qtype", sorted(ggml_quants.TYPES))
def test_each_type_decodes_exactly_as_the_reference(qtype):
    rng = np.random.default_rng(0)
    block = ggml_quants.TYPES[qtype][0]
    raw = random_blocks(qtype, 6, 4 * block, rng)
    expected = gguf.quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, qtype))      # (6, 4 * block)
    got = ggml_quants.dequantize(torch.from_numpy(raw), qtype, expected.shape, torch.float32)
    assert np.array_equal(got.numpy(), expected)


def write_gguf(state: dict[str, torch.Tensor], path, *, truncate: int = 0) -> dict[str, torch.Tensor]:
    """`state` (BFL names) as a GGUF file stored per PLAN; returns the values the file holds, as F32 tensors."""
    rng = np.random.default_rng(1)
    writer = gguf.GGUFWriter(str(path), "flux")
    held = {}
    for key, tensor in state.items():
        value = tensor.detach().float().numpy()
        qtype = next((q for pattern, q in PLAN.items() if key.startswith(pattern) or f".{pattern}." in key), None)
        if qtype and key.endswith(".weight"):
            kind = getattr(gguf.GGMLQuantizationType, qtype)
            raw = (random_blocks(qtype, *value.shape, rng, std=float(value.std())) if qtype.endswith("_K")
                   else gguf.quants.quantize(value, kind))
            writer.add_tensor(key, raw, raw_dtype=kind)
            held[key] = torch.from_numpy(gguf.quants.dequantize(raw, kind))
        else:
            value = value.astype(np.float16) if key == "img_in.weight" else value
            writer.add_tensor(key, value)
            held[key] = torch.from_numpy(value.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if truncate:
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size - truncate)
    return held


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory):
    """(GGUF file, the same values as an F32 safetensors file), from the tiny klein transformer (seed 0)."""
    root = tmp_path_factory.mktemp("gguf")
    state = transformer_to_bfl(build_tiny_pipeline("klein", seed=0).transformer.state_dict())
    held = write_gguf(state, root / "tiny.gguf")
    save_file({k: v.contiguous() for k, v in held.items()}, root / "dequantized.safetensors")
    return root / "tiny.gguf", root / "dequantized.safetensors"


def test_a_gguf_file_loads_as_its_bytes_and_computes_its_values(gguf_files):
    model, variant = load_transformer(gguf_files[0], **LOAD)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert variant.family == "klein"
    # The fused qkv became three layers of the same type, each a third of the rows; the K-quants stayed K-quants.
    assert {layers[f"transformer_blocks.0.attn.{p}"].scheme for p in ("to_q", "to_k", "to_v")} == {"Q8_0"}
    assert layers["single_transformer_blocks.1.attn.to_out"].scheme == "Q6_K"
    assert layers["time_guidance_embed.timestep_embedder.linear_1"].scheme == "Q5_K"
    assert all(m.weight.dtype == torch.uint8 for m in layers.values())
    reference, _ = load_transformer(gguf_files[1], **LOAD)
    assert torch.equal(transformer_output(model), transformer_output(reference))        # the file's values, exactly
    for name, module in layers.items():
        assert torch.equal(module.dequantized(torch.float32), reference.get_submodule(name).weight), name


def test_a_lora_trained_over_a_gguf_base_reloads_into_the_unquantized_base(training_files, gguf_files, tmp_path):
    root = training_files("klein", 4)
    model_dir = root / "model"
    config = _config(root, tmp_path, f"model.vae={model_dir / 'vae'}", f"model.text_encoder={model_dir / 'text_encoder'}",
                     f"model.tokenizer={model_dir / 'tokenizer'}", "train.gradient_checkpointing=true")
    result = trainer.train(config.replace({"model.path": str(gguf_files[0])}), Callbacks())
    assert result.steps == 4 and all(math.isfinite(v) for v in result.losses) and len(set(result.losses)) > 1

    from peft import set_peft_model_state_dict

    from flux2_lora_core.checkpoints.checkpoint import find_checkpoints, read_checkpoint

    trained, _ = load_transformer(gguf_files[0], **LOAD)
    add_lora(trained, rank=4, alpha=16.0, dropout=0.0, targets="attention_mlp", seed=0)
    tensors, _ = read_checkpoint(find_checkpoints(result.run_dir)[-1])
    set_peft_model_state_dict(trained, tensors["adapter"])
    # The exported file, loaded by diffusers over the unquantized base: the same LoRA and the same output.
    pipe = build_tiny_pipeline("klein", seed=0)
    pipe.transformer = load_transformer(gguf_files[1], **LOAD)[0]
    pipe.load_lora_weights(result.lora_path)
    ours, theirs = _deltas(trained), _deltas(pipe.transformer)
    assert ours.keys() == theirs.keys() and ours
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-6) for k in ours)
    assert max(float(d.detach().abs().max()) for d in theirs.values()) > 1e-4                # it learned something
    assert torch.allclose(transformer_output(trained), transformer_output(pipe.transformer), atol=1e-5)


def test_bad_gguf_files_are_refused_with_their_reason(gguf_files, tmp_path):
    state = transformer_to_bfl(build_tiny_pipeline("klein", seed=0).transformer.state_dict())
    write_gguf(state, tmp_path / "cut.gguf", truncate=4096)
    with pytest.raises(ModelError, match="truncated"):
        load_transformer(tmp_path / "cut.gguf", **LOAD)
    writer = gguf.GGUFWriter(str(tmp_path / "iq.gguf"), "flux")
    writer.add_tensor("img_in.weight", np.zeros((128, 72), np.uint8), raw_dtype=gguf.GGMLQuantizationType.IQ4_NL)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    with pytest.raises(ModelError, match=r"'img_in.weight' is stored as IQ4_NL, which is not read"):
        load_transformer(tmp_path / "iq.gguf", **LOAD)
    with pytest.raises(ModelError, match=r"GGUF is read for the transformer \(model.path\) only"):
        read_header(gguf_files[0], key="model.text_encoder")
