"""The memory plan: exact parameter counts, the measured H200 peaks, and a real step's peak on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flux2_lora_core.models.variants import SHIPPED, shipped_config
from flux2_lora_core.training.memory_plan import (GiB, format_plan, lora_parameter_count, parameter_count,
                                                  plan_for_variant, plan_memory)

H200 = Path(__file__).parents[3] / "benchmarks" / "results" / "2026-11-29-nvidia-h200.jsonl"
MODELS = {"klein-4b": "flux2-klein-4b", "klein-9b": "flux2-klein-9b", "dev": "flux2-dev"}
# The CPU model: FLUX.2's architecture at reduced width and depth, large enough that its weights and activations
# (~0.6 GB) dominate what the process allocates besides (threads, oneDNN scratch: tens of MB).
CPU_CONFIG = {**shipped_config("flux2-klein-4b", "transformer"), "num_attention_heads": 4, "num_layers": 2,
              "num_single_layers": 4, "joint_attention_dim": 96}
CPU_RESOLUTION, CPU_TEXT_TOKENS = 512, 128


@pytest.mark.parametrize("name", list(SHIPPED))
def test_parameter_counts_are_diffusers_own(name):
    torch = pytest.importorskip("torch")
    from diffusers import Flux2Transformer2DModel

    from flux2_lora_core.training.lora import add_lora

    config = shipped_config(name, "transformer")
    with torch.device("meta"):   # shapes only: no memory, no time
        built = Flux2Transformer2DModel.from_config(config)
        assert parameter_count(config) == sum(p.numel() for p in built.parameters())
        for targets in ("attention_mlp", "attention"):
            model = Flux2Transformer2DModel.from_config(config).requires_grad_(False)
            add_lora(model, rank=16, alpha=16, dropout=0.0, targets=targets, seed=0)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            assert lora_parameter_count(config, 16, targets) == trainable


def test_predicts_every_measured_h200_peak_within_15_percent():
    """benchmarks/results/2026-11-29-nvidia-h200.md: bf16 base, batch 1, rank 16, 512 text tokens, AdamW. Every
    row: the engine's eager and compiled steps and diffusers' loop (the constants were fitted to the eager
    engine rows)."""
    rows = [json.loads(line) for line in H200.read_text().splitlines() if line.strip()]
    assert len(rows) == 21
    errors = {}
    for r in rows:
        assert (r["batch"], r["rank"]) == (1, 16)
        plan = plan_for_variant(MODELS[r["model"]], r["resolution"])
        predicted = plan.estimate("none", r["checkpointing"]).total
        errors[(r["model"], r["loop"], r["resolution"], r["checkpointing"], r["compile"])] = \
            predicted / r["peak_gib"] - 1
    assert all(abs(e) <= 0.15 for e in errors.values()), errors
    eager_engine = [e for (_, loop, _, _, compiled), e in errors.items() if loop == "engine" and not compiled]
    assert len(eager_engine) == 8 and all(abs(e) <= 0.02 for e in eager_engine), errors


def test_fastest_fitting_setting_follows_the_speed_order():
    dev = plan_for_variant("flux2-dev", 1024, vram_gib=24)
    assert [(r.quantization, r.checkpointing) for r in dev.rows[:5]] == [
        ("none", False), ("fp8", False), ("int8", False), ("nf4", False), ("none", True)]
    assert (dev.best.quantization, dev.best.checkpointing) == ("nf4", True)   # 17 GiB of nf4 weights + checkpointing
    assert plan_for_variant("flux2-dev", 1024, vram_gib=141).best.checkpointing is False
    klein = plan_for_variant("flux2-klein-4b", 1024, vram_gib=24)
    assert (klein.best.quantization, klein.best.checkpointing) == ("fp8", False)
    assert plan_for_variant("flux2-dev", 1024, vram_gib=8).best is None
    assert plan_for_variant("flux2-klein-4b", 512, vram_gib=16, batch_size=2).estimate("none", False).activations \
        == pytest.approx(2 * plan_for_variant("flux2-klein-4b", 512).estimate("none", False).activations)
    text = format_plan(dev)
    assert "fastest that fits: quantization=nf4 gradient_checkpointing=on" in text
    assert "Mistral Small 3.x 24B" in text and "cache.text_encoder_offload=layers (bf16)" in text
    assert "nothing fits in 8 GiB" in format_plan(plan_for_variant("flux2-dev", 1024, vram_gib=8))


def test_block_swap_rows_take_the_fewest_blocks_that_fit_and_come_last():
    from flux2_lora_core.training.memory_plan import QUANTIZATIONS, block_parameters, swap_saving

    config = shipped_config("flux2-dev", "transformer")
    assert parameter_count(config) > sum(block_parameters(config)) > 0.95 * parameter_count(config)
    assert swap_saving(config, 2, 2.0) == 0   # the window: the two blocks in use stay on the device
    dev = plan_for_variant("flux2-dev", 1024, vram_gib=24)
    swaps = [r for r in dev.rows if r.swapped]
    assert list(dev.rows[-len(swaps):]) == swaps and [r.quantization for r in swaps] == ["nf4", "fp8", "int8", "none"]
    for row in swaps:   # fits with N blocks swapped, not with N - 1
        assert row.fits(24) and row.checkpointing
        unswapped = dev.estimate(row.quantization, True)
        bytes_per = QUANTIZATIONS[row.quantization]
        assert unswapped.total - swap_saving(config, row.swapped - 1, bytes_per) + 1 > 24
    assert dev.estimate("none", True, 50).weights == pytest.approx(16.1, abs=0.05)   # 60 GiB less 48 single blocks
    # [dev] NF4 at 1024 px: 18.0 GiB of weights (blocks nf4, the rest bf16) + 7.1 of LoRA, AdamW and activations
    # misses 24 GB; 10 swapped blocks (the fewest bytes copied of every setting that fits) make it fit.
    assert (dev.best.quantization, dev.best.swapped) == ("nf4", 10)
    assert "fastest that fits: quantization=nf4 gradient_checkpointing=on model.blocks_to_swap=10" in format_plan(dev)
    assert plan_for_variant("flux2-dev", 1024, vram_gib=32).best.swapped == 0   # nothing swapped where it fits
    blocks = sum(block_parameters(config))                                       # quantized: the blocks' linears
    assert dev.estimate("nf4", True).weights * GiB == pytest.approx(
        blocks * QUANTIZATIONS["nf4"] + (parameter_count(config) - blocks) * 2)
    encoder = dict(dev.text_encoder_settings)
    assert encoder["model.text_encoder_quantization=nf4"] < 14 < encoder["model.text_encoder_quantization=fp8/int8"] \
        < 24 < dev.text_encoder_gib and encoder["cache.text_encoder_offload=layers (bf16)"] < 5


def measure_cpu_step(checkpointing: bool) -> int:
    """Peak bytes one real training step (forward, backward, AdamW step) adds to this process, on the CPU in fp32.

    Run in a fresh subprocess with MALLOC_MMAP_THRESHOLD_ set: glibc then serves every allocation above 64 KiB
    with its own mmap and unmaps it on free (the threshold stays fixed instead of growing to 32 MiB), so the
    resident set follows the bytes torch holds, and the kernel's high-water mark (VmHWM) minus the resident set
    before the model is built is the step's peak, weights included.
    """
    import peft.tuners.lora  # noqa: F401  (imported before the baseline: add_lora imports it lazily)
    import torch
    from diffusers import Flux2Transformer2DModel

    from flux2_lora_core.training.flow_matching import PositionIds, training_loss
    from flux2_lora_core.training.lora import add_lora, trainable_parameters

    def rss(field):
        return next(int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith(field))

    torch.manual_seed(0)
    side = CPU_RESOLUTION // 16
    x0, noise = torch.randn(1, 128, side, side), torch.randn(1, 128, side, side)
    text = torch.randn(1, CPU_TEXT_TOKENS, CPU_CONFIG["joint_attention_dim"])
    img_ids, txt_ids = PositionIds().get(side, side, CPU_TEXT_TOKENS, "cpu")
    before = rss("VmRSS:")
    model = Flux2Transformer2DModel.from_config(CPU_CONFIG)
    model.requires_grad_(False)
    add_lora(model, rank=16, alpha=16, dropout=0.0, targets="attention_mlp", seed=0)
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-4, fused=True)
    loss = training_loss(model, x0, text, noise=noise, sigmas=torch.tensor([0.5]), img_ids=img_ids,
                         txt_ids=txt_ids, guidance=None)
    loss.backward()
    optimizer.step()
    return rss("VmHWM:") - before


@pytest.mark.parametrize("checkpointing", [False, True])
def test_predicts_a_real_cpu_step_within_15_percent(checkpointing):
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_memory_plan as t; "
            f"print(t.measure_cpu_step({checkpointing}))")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    measured = int(done.stdout.split()[-1])
    plan = plan_memory(CPU_CONFIG, CPU_RESOLUTION, text_tokens=CPU_TEXT_TOKENS, dtype_bytes=4)
    predicted = plan.estimate("none", checkpointing).total * GiB
    assert measured > 0.2 * GiB   # weights + activations, far above what the process allocates besides
    assert abs(predicted / measured - 1) <= 0.15, (predicted / 2**20, measured / 2**20)


def test_plan_command_prints_the_table_and_the_fastest_fitting_setting(capsys):
    from flux2_lora_core.cli import main

    assert main(["plan", "--variant", "dev", "--resolution", "1024", "--vram", "24"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") >= 12 and "none         off                     60.0" in out
    assert "fastest that fits: quantization=nf4 gradient_checkpointing=on" in out
    assert main(["plan", "--variant", "klein-4b", "--vram", "24", "--quantization", "nf4", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "batch 2" in out and "fp8" not in out.split("text encoder")[0]
    assert main(["plan", "--variant", "dev", "--vram", "8"]) == 1   # nothing fits
    capsys.readouterr()
    from flux2_lora_core.training import plan_for_variant

    plain, edit = (plan_for_variant("flux2-klein-4b", 1024, references=n) for n in (0, 1))
    assert main(["plan", "--variant", "klein-4b", "--references", "1"]) == 0
    assert "at 1024 px, 1 reference image per target" in capsys.readouterr().out
    assert plain.rows and len(plain.rows) == len(edit.rows)
    for a, b in zip(plain.rows, edit.rows):   # a reference doubles the image tokens: more activations, same weights
        assert b.weights == a.weights and b.activations > 1.5 * a.activations
    with pytest.raises(SystemExit) as usage:
        main(["plan", "--variant", "schnell"])
    assert usage.value.code == 2


def test_configure_lora_notes_the_peaks():
    from flux2_lora_core.training.memory_plan import settings_summary

    note = settings_summary(rank=16, batch_size=1, optimizer="adamw", checkpointing="true")
    assert "flux2-klein-4b: 12.8 / 8.2 at 512 px, 23.3 / 9.4 at 1024 px" in note and "has it on" in note
    assert "has it auto (on where" in settings_summary(rank=16, batch_size=1, optimizer="adamw", checkpointing="auto")


def test_auto_checkpointing_turns_on_exactly_where_the_step_would_not_fit():
    from flux2_lora_core.training.memory_plan import free_memory_gib, resolve_checkpointing

    config = shipped_config("flux2-klein-4b", "transformer")
    step = {"resolution": 1024, "batch_size": 1, "rank": 16, "optimizer": "adamw", "targets": "attention_mlp",
            "dtype_bytes": 2}
    plan = plan_for_variant("flux2-klein-4b", 1024, quantizations=("none",))
    added = plan.estimate("none", False).total - plan.estimate("none", False).weights   # what a step adds: ~15.6 GiB
    assert resolve_checkpointing("auto", config, free_gib=added + 1.5, **step)[0] is False
    on, why = resolve_checkpointing("auto", config, free_gib=added + 0.5, **step)
    assert on and "auto: on" in why and f"~{added:.1f} GiB" in why
    assert resolve_checkpointing("auto", config, free_gib=None, **step)[0] is True      # unknown: the safe side
    assert resolve_checkpointing("false", config, free_gib=1.0, **step)[0] is False     # as asked, even if short
    assert resolve_checkpointing("true", config, free_gib=1e6, **step)[0] is True
    assert free_memory_gib(torch.device("cpu")) > 0                                       # this host's MemAvailable
