"""lora.type=dora: peft's DoRA trained by the engine and written with ComfyUI's dora_scale keys. That ComfyUI's own
loader patches the weights peft merges, and its denoiser gives the trained model's velocity, is shown against real
ComfyUI code in tests/integration/test_fidelity.py (variant klein-dora); here, what the engine itself promises."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from flux2_lora_core.checkpoints.checkpoint import find_checkpoints, read_checkpoint
from flux2_lora_core.errors import ConfigError, ExportError
from flux2_lora_core.lora_files import export_lora
from flux2_lora_core.resume import resume
from flux2_lora_core.training import trainer

from .test_trainer import make_config


@pytest.fixture(scope="module")
def dora_run(training_files, tmp_path_factory):
    root = training_files("klein", 4)
    out = tmp_path_factory.mktemp("dora")
    return root, trainer.train(make_config(root, out, "lora.type=dora", "train.steps=4", "train.lr=1e-2",
                                           "sample.steps=0", "checkpoint.every=2", "train.ema_decay=0.5"))


def test_the_file_has_a_dora_scale_per_layer_and_the_run_resumes_exactly(dora_run, tmp_path):
    root, result = dora_run
    lora = load_file(result.lora_path)
    layers = {k.rsplit(".lora_", 1)[0] for k in lora if ".lora_" in k}
    scales = {k[:-len(".dora_scale")]: v for k, v in lora.items() if k.endswith(".dora_scale")}
    assert layers and scales.keys() == layers                          # fused qkv layers included
    for layer, scale in scales.items():
        assert scale.shape == (lora[f"{layer}.lora_B.weight"].shape[0], 1)
    adapter = read_checkpoint(find_checkpoints(result.run_dir)[-1])[0]["adapter"]
    magnitudes = [k for k in adapter if k.endswith(".lora_magnitude_vector")]
    assert magnitudes and all(adapter[k].abs().min() > 0 for k in magnitudes)   # peft's own, kept to resume
    assert load_file(result.lora_path.with_name(f"{result.lora_path.stem}_ema.safetensors")).keys() == lora.keys()

    again = resume(find_checkpoints(result.run_dir)[0], output=str(tmp_path / "again"))      # from step 2 to 4
    resumed = load_file(again.lora_path)
    assert all(torch.equal(resumed[k], lora[k]) for k in lora)


def test_a_dora_file_is_not_converted_continued_or_trained_on_a_quantized_base(dora_run, tmp_path):
    root, result = dora_run
    with pytest.raises(ExportError, match="DoRA"):
        export_lora(result.lora_path, fmt="kohya", out=tmp_path / "kohya.safetensors")
    with pytest.raises(ConfigError) as error:
        trainer.setup(make_config(root, tmp_path, f"lora.init_from={result.lora_path}", "sample.steps=0"),
                      trainer.Callbacks())
    assert error.value.problems[0][0] == "lora.init_from" and "DoRA" in error.value.problems[0][1]
    with pytest.raises(ConfigError) as error:
        trainer.train(make_config(root, tmp_path, "lora.type=dora", "model.quantization=int8", "train.steps=1",
                                  "sample.steps=0"))
    assert error.value.problems[0][0] == "lora.type" and "quantized" in error.value.problems[0][1]


def test_dora_continues_a_plain_lora_starting_as_that_lora(training_files, tmp_path):
    """init_from a plain LoRA into a DoRA run: its magnitudes start at ||W + dW||, so the model starts as the LoRA."""
    root = training_files("klein", 4)
    plain = trainer.train(make_config(root, tmp_path / "plain", "train.steps=2", "train.lr=1e-2", "sample.steps=0"))
    s = trainer.setup(make_config(root, tmp_path / "d", "lora.type=dora", f"lora.init_from={plain.lora_path}",
                                  "sample.steps=0"), trainer.Callbacks())
    try:
        from peft.tuners.lora import LoraLayer

        worst, checked, moved = 0.0, 0, 0.0
        for module in (m for m in s.transformer.modules() if isinstance(m, LoraLayer)):
            layer = module.get_base_layer()
            x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                lora = module.scaling["default"] * (x @ module.lora_A["default"].weight.T
                                                    @ module.lora_B["default"].weight.T)
                worst = max(worst, float((module(x) - layer(x) - lora).abs().max()))
                moved = max(moved, float(lora.abs().max()))
            checked += 1
        assert checked > 10 and moved > 1e-3 and worst <= 1e-5, (checked, moved, worst)
        from flux2_lora_core.lora_files import lora_state_dict, read_lora

        expected, started = read_lora(plain.lora_path)[0], lora_state_dict(s.transformer)   # A and B: the file's
        assert expected.keys() <= started.keys()
        assert max(float((started[k] - expected[k]).abs().max()) for k in expected) <= 1e-6
    finally:
        trainer.cleanup(s, release_model=True)
