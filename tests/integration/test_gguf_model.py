"""A GGUF transformer as ComfyUI-GGUF users keep it, picked on Load Training Model in a real ComfyUI: listed from
models/diffusion_models, its memory note read from its header, and trained over to a LoRA."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = pytest.mark.integration

NAME = "gguf/tiny-klein-Q8_0.gguf"   # in a sub-folder, as users sort their models


def write_q8_0(state: dict, path) -> None:
    """The blocks' 2-D weights as Q8_0 (as a GGUF converter leaves the rest: F32)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "flux")
    for key, tensor in state.items():
        value = tensor.detach().float().numpy()
        if key.endswith(".weight") and value.ndim == 2 and "blocks." in key and value.shape[1] % 32 == 0:
            kind = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(key, gguf.quants.quantize(value, kind), raw_dtype=kind)
        else:
            writer.add_tensor(key, np.ascontiguousarray(value))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def gguf_model(tiny_klein, comfyui):
    from flux2_lora_core.data.demo_data import write_demo_dataset
    from flux2_lora_core.models.single_file import transformer_to_bfl
    from flux2_lora_core.models.tiny_models import build_tiny_pipeline

    target = tiny_klein / "diffusion_models" / NAME
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        write_q8_0(transformer_to_bfl(build_tiny_pipeline("klein", seed=0).transformer.state_dict()), target)
    if not (comfyui.input_dir / "gguf_set").exists():
        write_demo_dataset(comfyui.input_dir / "gguf_set", count=2, size=256)
    return NAME


def test_a_gguf_file_is_listed_noted_and_trained_over(comfyui, gguf_model, training_graph):
    info = comfyui.get_json("/object_info/Flux2LoraLoadTrainingModel")["Flux2LoraLoadTrainingModel"]
    assert gguf_model in info["input"]["required"]["path"][1]["options"]   # pickers are read afresh
    prompt = training_graph(folder="gguf_set", cache_dir="gguf", name="gguf_lora", steps=2)
    prompt["2"]["inputs"]["path"] = gguf_model
    entry = comfyui.wait(comfyui.queue(prompt))
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], indent=1)[-4000:]
    (note,) = entry["outputs"]["2"]["text"]
    assert "512 px: off" in note and "quantization=none" in note, note
    assert (comfyui.base / "models" / "loras" / "gguf_lora.safetensors").is_file()
