"""lora.init_from: training continues from a LoRA file (ComfyUI, diffusers or kohya keys), its rank and alpha
read from it; a file that does not fit the model or the targets is refused by name. Tiny FLUX.2 [klein], real
peft adapter, real files."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from flux2_lora_core.errors import ConfigError
from flux2_lora_core.lora_files import export_lora, lora_state_dict, read_lora
from flux2_lora_core.training import Callbacks, trainer

from .test_trainer import make_config


@pytest.fixture(scope="module")
def trained(training_files, tmp_path_factory):
    """(workspace, the LoRA file of a 2-step run at rank 4, alpha 8)."""
    root = training_files("klein", 4)
    out = tmp_path_factory.mktemp("init-from")
    result = trainer.train(make_config(root, out, "train.steps=2", "lora.alpha=8", "sample.steps=0"))
    return root, result.lora_path


def started(root, tmp_path, *overrides):
    """The LoRA weights (peft names) and lora settings a run starts with."""
    s = trainer.setup(make_config(root, tmp_path, "sample.steps=0", *overrides), Callbacks())
    try:
        return lora_state_dict(s.transformer), s.config.lora
    finally:
        trainer.cleanup(s, release_model=True)


@pytest.mark.parametrize("fmt", ["comfyui", "diffusers", "kohya"])
def test_a_run_starts_from_the_file_with_its_rank_and_alpha(trained, tmp_path, fmt):
    root, path = trained
    if fmt != "comfyui":
        path = export_lora(path, fmt=fmt, out=tmp_path / f"lora.{fmt}.safetensors")
    expected, _, _, _ = read_lora(trained[1])
    weights, lora = started(root, tmp_path, "lora.rank=16", "lora.alpha=1", f"lora.init_from={path}")
    assert (lora.rank, lora.alpha) == (4, 8.0)                                  # the file's, not the config's
    assert weights.keys() == expected.keys()
    assert max(float((weights[k] - expected[k]).abs().max()) for k in expected) <= 1e-6
    assert max(float(v.abs().max()) for k, v in weights.items() if "lora_B" in k) > 0   # trained, not fresh


def test_a_file_that_does_not_fit_is_refused_by_name(trained, tmp_path):
    root, path = trained
    with pytest.raises(ConfigError) as error:                     # attention_mlp layers, attention targets
        started(root, tmp_path, f"lora.init_from={path}", "lora.targets=attention")
    assert error.value.problems[0][0] == "lora.targets" and "ff.linear_in" in error.value.problems[0][1]

    with safe_open(str(path), "pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    key = next(k for k in sorted(tensors) if k.endswith("lora_down.weight") or k.endswith("lora_A.weight"))
    for name, change, words in (("wider.safetensors", lambda t: torch.cat([t, t], dim=1), "another FLUX.2 model"),
                                ("mixed.safetensors", lambda t: t[:2], "ranks [2, 4]")):
        save_file({**tensors, key: change(tensors[key]).contiguous()}, tmp_path / name, metadata=metadata)
        with pytest.raises(ConfigError) as error:
            started(root, tmp_path, f"lora.init_from={tmp_path / name}")
        assert error.value.problems[0][0] == "lora.init_from" and words in error.value.problems[0][1], \
            error.value.problems
