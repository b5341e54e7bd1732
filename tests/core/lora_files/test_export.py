"""export.py: LoRA files for ComfyUI, diffusers and kohya tools, checked with the real loaders on the tiny models.

A peft LoRA (rank 4, alpha 8: scale 2, so baking alpha / rank is exercised) with random non-zero lora_B is
the reference. Each exported file must reproduce the peft model's transformer output (fp32, <= 1e-5):
applied the way ComfyUI applies LoRAs (comfy/lora.py `model_lora_keys_unet` names, comfy/weight_adapter/
lora.py `W += alpha / rank_of_that_layer * up @ down`, scale 1.0 without an `.alpha` key) to the BFL weights
and converted back with diffusers' single-file converter, and loaded with diffusers' `load_lora_weights`.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline, Flux2Transformer2DModel
from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from flux2_lora_core.errors import ConfigError, ExportError
from flux2_lora_core.lora_files.export import (
    FORMATS,
    export_lora,
    lora_metadata,
    lora_state_dict,
    read_lora,
    save_lora,
    to_format,
)
from flux2_lora_core.models.single_file import transformer_to_bfl
from flux2_lora_core.models.tiny_models import VARIANTS, build_tiny_pipeline, tiny_transformer_config

RANK, ALPHA = 4, 8.0
ATTENTION_MLP = (r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|"
                 r"to_add_out)|ff\.linear_in|ff\.linear_out|ff_context\.linear_in|ff_context\.linear_out)"
                 r"|single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out)")
# q and v without k, k alone: the fused qkv LoRA gets zero blocks for the missing parts.
QKV_SUBSET = (r"transformer_blocks\.\d+\.attn\.(to_q|to_v|add_k_proj)|single_transformer_blocks\.\d+\.attn\.to_out")
# Every Linear layer, the embedders, modulations and norm_out (whose output halves BFL swaps) included.
EVERY_LINEAR = "every Linear"


def forward(transformer, inputs) -> torch.Tensor:
    with torch.no_grad():
        return transformer(**inputs, return_dict=False)[0]


def trained_lora(variant: str, targets: str, seed: int = 0) -> SimpleNamespace:
    """A tiny pipeline whose transformer carries a peft LoRA with random A and B, its output and canonical state."""
    pipe = build_tiny_pipeline(variant, seed=0)
    base = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    if targets == EVERY_LINEAR:
        targets = [n for n, m in pipe.transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    pipe.transformer.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, init_lora_weights=True))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in pipe.transformer.named_parameters():
            if "lora_B" in name:  # peft starts B at zero
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
    text = torch.randn(1, 7, pipe.transformer.config.joint_attention_dim, generator=gen)
    latents = torch.randn(1, 128, 4, 6, generator=gen)                        # (B, 128, h, w)
    inputs = dict(hidden_states=pipe._pack_latents(latents), encoder_hidden_states=text,  # (B, h*w, 128)
                  timestep=torch.tensor([0.4]), img_ids=pipe._prepare_latent_ids(latents),
                  txt_ids=pipe._prepare_text_ids(text), guidance=torch.full([1], 4.0) if variant == "dev" else None)
    run = SimpleNamespace(variant=variant, base=base, inputs=inputs, reference=forward(pipe.transformer, inputs),
                          state=lora_state_dict(pipe.transformer))
    assert max_diff(run.reference, forward(fresh_transformer(variant, base), inputs)) > 1e-3  # 100x the tolerance
    return run


@pytest.fixture(scope="module")
def loras():
    return {v: trained_lora(v, ATTENTION_MLP) for v in VARIANTS}


def apply_like_comfyui(lora: dict[str, torch.Tensor], bfl: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's LoRA semantics on BFL weights; every LoRA key must find its layer and be used."""
    key_map = {}
    for key in bfl:
        if key.endswith(".weight"):
            key_map["diffusion_model." + key[:-len(".weight")]] = key
            key_map["lora_unet_" + key[:-len(".weight")].replace(".", "_")] = key
    patched, used = dict(bfl), set()
    for name in {k.rsplit(".lora_", 1)[0] for k in lora if ".lora_" in k}:
        up_key = next(f"{name}.{s}" for s in ("lora_up.weight", "lora_B.weight") if f"{name}.{s}" in lora)
        down_key = up_key.replace("lora_up", "lora_down").replace("lora_B", "lora_A")
        up, down, alpha = lora[up_key], lora[down_key], lora.get(f"{name}.alpha")
        scale = alpha.item() / down.shape[0] if alpha is not None else 1.0
        target = key_map[name]
        patched[target] = patched[target] + scale * (up @ down)
        used |= {up_key, down_key} | ({f"{name}.alpha"} if alpha is not None else set())
    assert used == set(lora)
    return patched


def output_via_comfyui(lora_file, run) -> torch.Tensor:
    """The LoRA file applied to the BFL single-file weights, converted back by diffusers' from_single_file path."""
    patched = apply_like_comfyui(load_file(str(lora_file)), transformer_to_bfl(run.base))
    weights = convert_flux2_transformer_checkpoint_to_diffusers(patched)
    return forward(fresh_transformer(run.variant, weights), run.inputs)


def fresh_transformer(variant: str, weights: dict) -> Flux2Transformer2DModel:
    model = Flux2Transformer2DModel.from_config(tiny_transformer_config(variant))
    model.load_state_dict(weights)  # strict: every weight of the model, nothing else
    return model


def output_via_diffusers(lora_file, run) -> torch.Tensor:
    """`load_lora_weights` of a fresh pipeline (only its transformer matters here: the others stay None)."""
    pipeline = Flux2KleinPipeline if run.variant == "klein" else Flux2Pipeline
    pipe = pipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None,
                    transformer=fresh_transformer(run.variant, run.base))
    pipe.load_lora_weights(str(lora_file))
    return forward(pipe.transformer, run.inputs)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:6]
    assert not [k for k in a if a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]


def header(path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def metadata_for(variant="klein", **extra) -> dict[str, str]:
    extra = {"name": "tiny", "steps": 10, "resolution": [512, 1024], "trigger_word": "ohwx", "images": 3, **extra}
    return lora_metadata(variant=variant, rank=RANK, alpha=ALPHA, targets=["attention_mlp"], extra=extra)


# ---------------------------------------------------------------------------------------------- the comfyui file
@pytest.mark.parametrize("variant", VARIANTS)
def test_comfyui_file_reproduces_the_peft_model_in_comfyui_and_diffusers(loras, tmp_path, variant):
    run = loras[variant]
    path = save_lora(tmp_path / "lora.safetensors", run.state, rank=RANK, alpha=ALPHA, metadata=metadata_for())
    keys = load_file(str(path))
    assert all(k.startswith("diffusion_model.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    assert keys["diffusion_model.double_blocks.1.img_attn.qkv.lora_A.weight"].shape == (3 * RANK, 128)
    assert keys["diffusion_model.double_blocks.1.txt_attn.qkv.lora_B.weight"].shape == (3 * 128, 3 * RANK)
    assert "diffusion_model.single_blocks.1.linear1.lora_B.weight" in keys
    assert max_diff(output_via_comfyui(path, run), run.reference) <= 1e-5
    assert max_diff(output_via_diffusers(path, run), run.reference) <= 1e-5


def test_why_alpha_is_baked_diffusers_refuses_alpha_keys_in_comfyui_files(loras, tmp_path):
    # The same file with `.alpha` keys (alpha = each layer's rank: scale 1.0, no change in ComfyUI) is refused.
    lora = to_format(loras["klein"].state, fmt="comfyui", rank=RANK, alpha=ALPHA)
    for key in [k for k in lora if k.endswith(".lora_A.weight")]:
        lora[key.replace(".lora_A.weight", ".alpha")] = torch.tensor(float(lora[key].shape[0]))
    save_file(lora, str(tmp_path / "with_alpha.safetensors"))
    with pytest.raises(ValueError, match="should be empty"):
        output_via_diffusers(tmp_path / "with_alpha.safetensors", loras["klein"])


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_diffusers_and_kohya_files_load_in_diffusers(loras, tmp_path, variant, fmt):
    run = loras[variant]
    path = save_lora(tmp_path / f"lora.{fmt}.safetensors", run.state, fmt=fmt, rank=RANK, alpha=ALPHA,
                     metadata=metadata_for())
    assert max_diff(output_via_diffusers(path, run), run.reference) <= 1e-5
    if fmt == "kohya":  # ComfyUI keys lora_unet_<BFL name> and scales by alpha / rank of each layer
        assert max_diff(output_via_comfyui(path, run), run.reference) <= 1e-5


def test_diffusers_file_is_what_diffusers_writes(loras, tmp_path):
    path = save_lora(tmp_path / "lora.safetensors", loras["klein"].state, fmt="diffusers", rank=RANK, alpha=ALPHA,
                     metadata=metadata_for())
    adapter = json.loads(header(path)["lora_adapter_metadata"])
    assert adapter["transformer.r"] == RANK and adapter["transformer.lora_alpha"] == ALPHA
    assert set(load_file(str(path))) == {f"transformer.{k}" for k in loras["klein"].state}


def test_kohya_alpha_gives_each_layer_the_trained_scale(loras):
    out = to_format(loras["dev"].state, fmt="kohya", rank=RANK, alpha=ALPHA)
    assert out["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape[0] == 3 * RANK
    assert out["lora_unet_double_blocks_0_img_attn_qkv.alpha"].item() == 3 * ALPHA
    assert out["lora_unet_single_blocks_1_linear2.alpha"].item() == ALPHA
    assert torch.equal(out["lora_unet_double_blocks_1_img_mlp_2.lora_up.weight"],
                       loras["dev"].state["transformer_blocks.1.ff.linear_out.lora_B.weight"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_linear_layer_lands_where_transformer_to_bfl_puts_its_weight(tmp_path, variant):
    # Embedders, modulations, guidance and norm_out (rows half-swapped in BFL) too: ComfyUI applies them all.
    run = trained_lora(variant, EVERY_LINEAR, seed=1)
    assert "norm_out.linear.lora_B.weight" in run.state
    for fmt in ("comfyui", "kohya"):
        path = save_lora(tmp_path / f"{fmt}.safetensors", run.state, fmt=fmt, rank=RANK, alpha=ALPHA, metadata={})
        assert max_diff(output_via_comfyui(path, run), run.reference) <= 1e-5
        assert_same_state(read_lora(path)[0], run.state)


def test_a_qkv_subset_fuses_with_zero_blocks_and_splits_back(tmp_path):
    run = trained_lora("klein", QKV_SUBSET, seed=2)
    path = save_lora(tmp_path / "subset.safetensors", run.state, rank=RANK, alpha=ALPHA, metadata={})
    up = load_file(str(path))["diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight"]  # (q, k, v) x 3 ranks
    assert up.shape == (3 * 128, 3 * RANK) and not up[128:256].any() and up[:128, :RANK].any()
    assert max_diff(output_via_comfyui(path, run), run.reference) <= 1e-5
    assert max_diff(output_via_diffusers(path, run), run.reference) <= 1e-5
    assert_same_state(read_lora(path)[0], run.state)


# ---------------------------------------------------------------------------------------------- reading back
@pytest.mark.parametrize("fmt", FORMATS)
def test_read_lora_returns_the_canonical_state_exactly(loras, tmp_path, fmt):
    run = loras["dev"]
    path = save_lora(tmp_path / "x.safetensors", run.state, fmt=fmt, rank=RANK, alpha=ALPHA,
                     metadata=metadata_for("flux2-dev"))
    state, rank, alpha, metadata = read_lora(path)
    assert_same_state(state, run.state)
    assert (rank, alpha) == (RANK, ALPHA)
    assert metadata["flux2_lora.format"] == fmt and metadata["modelspec.architecture"] == "Flux.2-dev/lora"


def test_a_scale_that_is_no_power_of_two_round_trips_within_rounding(loras, tmp_path):
    path = save_lora(tmp_path / "x.safetensors", loras["klein"].state, rank=RANK, alpha=3.0, metadata={})
    state, rank, alpha, _ = read_lora(path)
    assert (rank, alpha) == (RANK, 3.0)
    assert all(torch.allclose(state[k], v, rtol=1e-6, atol=0) for k, v in loras["klein"].state.items())


def test_files_without_this_packages_metadata_read_at_the_scale_their_loaders_apply(loras, tmp_path):
    state = loras["klein"].state
    for fmt in ("comfyui", "kohya"):
        bare = tmp_path / f"bare-{fmt}.safetensors"
        save_file(to_format(state, fmt=fmt, rank=RANK, alpha=ALPHA), str(bare))
        read, rank, alpha, _ = read_lora(bare)
        if fmt == "kohya":  # the .alpha keys keep the scale
            assert (rank, alpha) == (RANK, ALPHA)
            assert_same_state(read, state)
        else:  # no alpha: scale 1.0, as ComfyUI and diffusers apply it; the product is unchanged
            assert (rank, alpha) == (RANK, RANK)
            assert all(torch.equal(read[k], v * (ALPHA / RANK) if "lora_B" in k else v) for k, v in state.items())


def test_metadata_for_lora_managers(loras, tmp_path):
    md = metadata_for("flux2-klein-4b", base_model_fingerprint="abc", text_conditioning="comfyui", lr=1e-4, seed=7)
    path = save_lora(tmp_path / "x.safetensors", loras["klein"].state, rank=RANK, alpha=ALPHA, metadata=md)
    h = header(path)
    expected = {
        "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "Flux.2-klein-4b/lora",
        "modelspec.implementation": "https://github.com/black-forest-labs/flux2", "modelspec.title": "tiny",
        "modelspec.resolution": "1024x1024", "modelspec.trigger_phrase": "ohwx",
        "ss_base_model_version": "flux_2_klein_4b", "ss_network_dim": "4", "ss_network_alpha": "8.0",
        "ss_resolution": "(1024, 1024)", "ss_steps": "10", "ss_max_train_steps": "10", "ss_output_name": "tiny",
        "ss_seed": "7", "ss_learning_rate": "0.0001", "ss_tag_frequency": json.dumps({"dataset": {"ohwx": 3}}),
        "flux2_lora.format": "comfyui", "flux2_lora.rank": "4", "flux2_lora.alpha": "8.0",
        "flux2_lora.alpha_baked": "true", "flux2_lora.variant": "flux2-klein-4b",
        "flux2_lora.targets": '["attention_mlp"]', "flux2_lora.base_model_fingerprint": "abc",
        "flux2_lora.text_conditioning": "comfyui", "flux2_lora.resolution": "[512, 1024]",
        "flux2_lora.trigger_word": "ohwx", "format": "pt",
    }
    assert {k: h.get(k) for k in expected} == expected
    assert h["flux2_lora.version"] and h["modelspec.date"] and h["ss_network_module"]
    assert h["modelspec.hash_sha256"] == "0x" + h["sshs_model_hash"] and len(h["sshs_model_hash"]) == 64
    assert "lora_adapter_metadata" not in h


# ---------------------------------------------------------------------------------------------- export_lora
def test_export_converts_between_all_formats_and_carries_the_metadata(loras, tmp_path):
    run = loras["klein"]
    source = save_lora(tmp_path / "run" / "lora" / "tiny.safetensors", run.state, rank=RANK, alpha=ALPHA,
                       metadata=metadata_for())
    as_diffusers = export_lora(tmp_path / "run", fmt="diffusers")           # a run folder: its one LoRA
    assert as_diffusers == source.with_name("tiny.diffusers.safetensors")
    back = export_lora(as_diffusers, fmt="comfyui")                          # the format suffix is replaced
    assert back == source.with_name("tiny.comfyui.safetensors")
    as_kohya = export_lora(back, fmt="kohya", out=tmp_path / "k.safetensors")
    assert export_lora(back, fmt="kohya", out=tmp_path) == tmp_path / "tiny.kohya.safetensors"  # into a folder
    for path, fmt in ((as_diffusers, "diffusers"), (back, "comfyui"), (as_kohya, "kohya")):
        state, rank, alpha, metadata = read_lora(path)
        assert_same_state(state, run.state)
        assert metadata["flux2_lora.format"] == fmt and metadata["modelspec.trigger_phrase"] == "ohwx"
    assert "lora_adapter_metadata" not in header(back)  # would make diffusers re-apply alpha / rank
    assert header(back)["flux2_lora.exported_from"] == "tiny.diffusers.safetensors"
    assert max_diff(output_via_diffusers(back, run), run.reference) <= 1e-5


def test_export_never_overwrites(loras, tmp_path):
    source = save_lora(tmp_path / "a.safetensors", loras["klein"].state, rank=RANK, alpha=ALPHA, metadata={})
    out = export_lora(source, fmt="kohya")
    before = out.read_bytes()
    with pytest.raises(ExportError, match="a.kohya.safetensors: already exists"):
        export_lora(source, fmt="kohya")
    with pytest.raises(ExportError, match="already exists"):
        export_lora(source, fmt="comfyui", out=source)
    assert out.read_bytes() == before


def test_run_folder_must_hold_one_lora(loras, tmp_path):
    (tmp_path / "run" / "lora").mkdir(parents=True)
    with pytest.raises(ExportError, match="no LoRA file"):
        export_lora(tmp_path / "run")
    for name in ("a", "b"):
        save_lora(tmp_path / "run" / "lora" / f"{name}.safetensors", loras["klein"].state, rank=RANK, alpha=ALPHA,
                  metadata={})
    with pytest.raises(ExportError, match=r"2 LoRA files \(a.safetensors, b.safetensors\)"):
        export_lora(tmp_path / "run")


# ---------------------------------------------------------------------------------------------- errors
def test_files_that_are_no_flux2_lora_are_refused_by_name(loras, tmp_path):
    text = tmp_path / "notes.safetensors"
    text.write_text("not a tensor file")
    pickled = tmp_path / "lora.pt"
    torch.save(loras["klein"].state, pickled)
    plain = tmp_path / "model.safetensors"
    save_file({"img_in.weight": torch.zeros(2, 2)}, str(plain))
    foreign = tmp_path / "foreign.safetensors"
    save_file({"unet.down.lora_A.weight": torch.zeros(1, 2), "unet.down.lora_B.weight": torch.zeros(2, 1)},
              str(foreign))
    for path, message in ((text, "not a readable .safetensors file"), (pickled, "never unpickled"),
                          (plain, "holds no LoRA weights"), (foreign, "unknown LoRA key layout"),
                          (tmp_path / "missing.safetensors", "no such LoRA file")):
        with pytest.raises(ExportError, match=message) as info:
            read_lora(path)
        assert str(path) in str(info.value)


def test_a_qkv_lora_that_is_not_block_diagonal_cannot_be_split(tmp_path):
    path = tmp_path / "fused.safetensors"
    save_file({"diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": torch.ones(6, 128),
               "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": torch.ones(384, 6)}, str(path))
    with pytest.raises(ExportError, match="not block-diagonal"):
        read_lora(path)


def test_bad_arguments_are_reported_together(loras, tmp_path):
    with pytest.raises(ConfigError) as info:
        save_lora(tmp_path / "x.safetensors", loras["klein"].state, fmt="a1111", rank=0, alpha=-1, metadata={})
    assert [key for key, _ in info.value.problems] == ["format", "lora.rank", "lora.alpha"]
    with pytest.raises(ExportError, match="transformer_blocks.0.attn.norm_q.lora_A.weight"):
        to_format({"transformer_blocks.0.attn.norm_q.lora_A.weight": torch.zeros(1, 1)}, fmt="comfyui", rank=1,
                  alpha=1)
