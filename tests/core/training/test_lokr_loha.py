"""lora.type=lokr / loha: peft's LoKr and LoHa trained by the engine and written in the LyCORIS keys ComfyUI's own
loaders read. ComfyUI's patched weights and denoiser are checked against peft's in tests/integration/
test_fidelity.py (variants klein-lokr, klein-loha); here, what the engine promises itself."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from flux2_lora_core.errors import ConfigError, ExportError
from flux2_lora_core.lora_files import export_lora
from flux2_lora_core.models.tiny_models import build_tiny_pipeline
from flux2_lora_core.training import trainer

from .test_trainer import make_config

NAMES = {"lokr": {"lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"}, "loha": {"hada_w1_a", "hada_w1_b",
                                                                                       "hada_w2_a", "hada_w2_b", "alpha"}}


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_a_given_model_trains_and_comes_back_whole_with_a_file_in_lycoris_keys(training_files, tmp_path, kind):
    root = training_files("klein", 4)
    given = build_tiny_pipeline("klein", seed=0).transformer
    before = {k: v.clone() for k, v in given.state_dict().items()}
    result = trainer.train(make_config(root, tmp_path, f"lora.type={kind}", "train.steps=3", "train.lr=1e-2",
                                       "sample.steps=0", "train.ema_decay=0.5"), transformer=given)
    after = given.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    lora = load_file(result.lora_path)
    assert all(k.startswith("transformer.") for k in lora)
    assert {k.rpartition(".")[2] for k in lora} <= NAMES[kind] and len(lora) > 20
    moved = [k for k in lora if k.endswith(("lokr_w1", "lokr_w1_a", "hada_w2_b"))]   # the factors peft starts at 0
    assert moved and max(float(lora[k].abs().max()) for k in moved) > 0       # trained away from zero
    averaged = load_file(result.lora_path.with_name(f"{result.lora_path.stem}_ema.safetensors"))
    assert averaged.keys() == lora.keys()
    with pytest.raises(ExportError, match="LoKr or LoHa"):
        export_lora(result.lora_path, fmt="kohya", out=tmp_path / "kohya.safetensors")


def test_lokr_refuses_what_it_cannot_do(training_files, tmp_path):
    root = training_files("klein", 4)
    with pytest.raises(ConfigError) as error:
        trainer.train(make_config(root, tmp_path, "lora.type=lokr", "model.quantization=int8", "train.steps=1",
                                  "sample.steps=0"))
    assert error.value.problems[0][0] == "lora.type"
    with pytest.raises(ConfigError) as error:
        trainer.train(make_config(root, tmp_path, "lora.type=loha", f"lora.init_from={tmp_path}", "train.steps=1"))
    assert any(key == "lora.init_from" and "loha" in text for key, text in error.value.problems)
