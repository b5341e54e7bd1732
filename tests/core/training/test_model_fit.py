"""Load Training Model's note: the weights as they will sit on the device, read from the file's header alone."""

from __future__ import annotations

import pytest
import torch

from flux2_lora_core.config import load_config
from flux2_lora_core.models import load_transformer
from flux2_lora_core.models.tiny_models import COMFYUI_FILES, write_tiny_model
from flux2_lora_core.training.memory_plan import GiB
from flux2_lora_core.training.model_fit import model_note, stored_weights_gib


@pytest.fixture(scope="module")
def transformer_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("fit")
    write_tiny_model(root, variant="klein", fmt="comfyui")
    return root / COMFYUI_FILES["klein"]["transformer"]


def loaded_bytes(path, quantization: str) -> int:
    model, _ = load_transformer(path, quantization=quantization, dtype=torch.bfloat16, device=torch.device("cpu"))
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


@pytest.mark.parametrize(("quantization", "tolerance"), [("none", 0), ("nf4", 0), ("int8", 0.05), ("fp8", 0.05)])
def test_the_header_predicts_the_loaded_weights(transformer_file, quantization, tolerance):
    """bf16 and nf4 exactly (nf4: 4 bits + an fp32 absmax per 64 values); int8 and fp8 leave out their per-row
    scales. The streamed load ends with a cast to bf16, which once widened fp8 weights and rounded every scale."""
    predicted = stored_weights_gib(str(transformer_file), quantization) * GiB
    assert predicted == pytest.approx(loaded_bytes(transformer_file, quantization), rel=tolerance, abs=0.5)


def test_the_note_names_the_settings_and_what_block_swap_does(transformer_file, tmp_path):
    plain = load_config(None, [f"model.path={transformer_file}"]).model
    note = model_note(plain, vram_gib=24)
    assert "512 px: off" in note and "1024 px: off" in note and "(fits)" in note and "quantization=none)" in note
    swapped = load_config(None, [f"model.path={transformer_file}", "model.quantization=nf4",
                                 "model.blocks_to_swap=3", "model.text_encoder_quantization=int8"]).model
    note = model_note(swapped)
    assert "(block swap turns it on)" in note and "quantization=nf4, blocks_to_swap=3" in note
    assert "text_encoder_quantization=int8" in note and "(fits)" not in note   # no GPU size given: no verdict
    assert model_note(load_config(None, []).model) == ""
    assert stored_weights_gib(str(tmp_path), "none") is None   # a diffusers folder: counted from its config
