"""Distilled vs base FLUX.2 [klein]: told apart by model_index.json or the file name (model.distilled overrides);
a distilled base is sampled as it was distilled to be, in 4 steps without CFG."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from flux2_lora_core.models import judge_distilled
from flux2_lora_core.models.tiny_models import build_tiny_pipeline
from flux2_lora_core.training.sampling import generate, sample_tokens


@pytest.mark.parametrize("name, distilled", [("flux-2-klein-4b.safetensors", True),
                                             ("flux-2-klein-base-4b.safetensors", False),
                                             ("flux-2-klein-9b-fp8.safetensors", True),
                                             ("my_model.safetensors", False)])
def test_a_single_file_is_judged_by_its_name(tmp_path, name, distilled):
    (tmp_path / name).write_bytes(b"")
    assert judge_distilled(tmp_path / name, "klein")[0] is distilled
    assert judge_distilled(tmp_path / name, "dev")[0] is False                       # [dev] is no step-distilled klein
    assert judge_distilled(tmp_path / name, "klein", "true" if not distilled else "false")[0] is not distilled


def test_a_diffusers_folder_is_judged_by_its_model_index(tmp_path):
    for flag in (True, False):
        folder = tmp_path / f"FLUX.2-klein-base-4B-{flag}"   # a misleading name: the index decides
        (folder / "transformer").mkdir(parents=True)
        (folder / "model_index.json").write_text(json.dumps({"_class_name": "Flux2KleinPipeline", "is_distilled": flag}))
        weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
        weights.write_bytes(b"")
        assert judge_distilled(folder, "klein") == (flag, "model_index.json")
        assert judge_distilled(weights, "klein") == (flag, "model_index.json")
        assert judge_distilled(folder / "transformer", "klein") == (flag, "model_index.json")   # as resolve_sources


def test_a_distilled_base_samples_in_four_steps_without_cfg():
    pipe = build_tiny_pipeline("klein", seed=0)
    generator = torch.Generator().manual_seed(3)
    prompt = torch.randn(8, pipe.transformer.config.joint_attention_dim, generator=generator)
    negative = torch.randn(8, pipe.transformer.config.joint_attention_dim, generator=generator)

    def tokens(**settings):
        return sample_tokens(pipe.transformer, pipe.vae, "klein", [prompt], negative, size=64, seed=1,
                             dtype=torch.float32, **settings)[0]

    def image(**settings):
        (picture,) = generate(pipe.transformer, pipe.vae, "klein", [prompt], negative, size=64, seed=1,
                              dtype=torch.float32, **settings)
        return np.asarray(picture)

    # asked for 20 steps with guidance 4, a distilled base samples as a plain 4-step run without CFG
    assert np.array_equal(image(steps=20, guidance=4.0, distilled=True), image(steps=4, guidance=1.0))
    four_plain = tokens(steps=4, guidance=1.0)                       # no CFG: the negative is never used
    assert torch.equal(tokens(steps=4, guidance=4.0, distilled=True), four_plain)
    assert not torch.equal(tokens(steps=4, guidance=4.0), four_plain)                    # a base uses CFG
