"""Block swap (model.blocks_to_swap) on the tiny FLUX.2 [klein]: real diffusers transformer, real peft LoRA, the
trainer's own step. On the CPU a "device copy" is a clone, so the scheduling and bookkeeping run as on a GPU."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from flux2_lora_core.config import load_config
from flux2_lora_core.errors import ConfigError
from flux2_lora_core.models.quantized_linear import QuantizedLinear, quantize_transformer
from flux2_lora_core.models.tiny_models import build_tiny_pipeline
from flux2_lora_core.training import Callbacks, trainer
from flux2_lora_core.training.block_swap import ATTRIBUTE, swap_blocks, transformer_blocks, unswap_blocks

from .test_trainer import make_config as trainer_config


@pytest.fixture(scope="module")
def workspace(training_files):
    return training_files("klein", 4)


def make_config(root, tmp_path, *overrides):
    """test_trainer's run, shortened: 2 steps of 2 accumulated micro-batches, no samples."""
    return trainer_config(root, tmp_path, "train.steps=2", "train.gradient_accumulation=2", "train.log_every=1",
                          "sample.steps=0", *overrides)


def trained(workspace, tmp_path, *overrides, transformer=None):
    """(losses, LoRA tensors) of a short run."""
    result = trainer.train(make_config(workspace, tmp_path, *overrides), transformer=transformer)
    return result.losses, load_file(result.lora_path)


def assert_identical(run, base):
    assert run[0] == base[0]                                              # every loss, bit for bit
    assert run[1].keys() == base[1].keys() and all(torch.equal(run[1][k], base[1][k]) for k in base[1])


def test_swapping_trains_bit_identically_and_hands_the_model_back(workspace, tmp_path):
    """Swapping moves weights, never changes them: same losses and LoRA as the same run without it (gradient
    checkpointing on in both, as swapping turns it on; every block swapped here, some in the nf4 test). A
    transformer given by the caller comes back whole."""
    base = trained(workspace, tmp_path, "train.gradient_checkpointing=true")
    given = build_tiny_pipeline("klein", seed=0).transformer             # the weights write_tiny_model wrote
    before = {k: v.clone() for k, v in given.state_dict().items()}
    assert_identical(trained(workspace, tmp_path, "model.blocks_to_swap=4", transformer=given), base)
    after = given.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert ATTRIBUTE not in given.__dict__ and not given._forward_pre_hooks and not given._forward_hooks
    assert not any(block._forward_pre_hooks for block in transformer_blocks(given))
    assert not given.gradient_checkpointing and not given.training


@pytest.mark.parametrize(("count", "ahead"), [(4, 1), (4, 2), (3, 1)])
def test_the_window_holds_at_most_ahead_plus_one_blocks(workspace, tmp_path, count, ahead):
    """At every block's start, forward and backward's re-run alike: the block is on the device (its tensors point
    at the copies), at most ahead + 1 swapped blocks have a device copy in the window, and no more are alive at all
    (autograd keeps none past a block's own backward)."""
    s = trainer.setup(make_config(workspace, tmp_path, f"model.blocks_to_swap={count}"), Callbacks())
    try:
        swap = swap_blocks(s.transformer, count, s.device, ahead=ahead)  # replaces the setup's swap (ahead 1)
        frozen = [t for tensors in swap.tensors.values() for t in tensors]
        assert frozen and not any(t.requires_grad for t in frozen)       # LoRA parameters never move
        seen = []

        def check(index, module, args):
            live = swap.live_blocks()
            seen.append((index, swap.backward))
            assert len(swap.resident) <= ahead + 1 and len(live) <= ahead + 1, (index, swap.resident, live)
            if index >= swap.first:
                copy = swap.resident[index]
                assert copy.ready and all(t.data_ptr() == c.data_ptr() for t, c in zip(swap.tensors[index],
                                                                                         copy.tensors))
                assert all(t.data_ptr() != h.data_ptr() for t, h in zip(swap.tensors[index], swap.host[index]))

        blocks = transformer_blocks(s.transformer)
        for i, block in enumerate(blocks):
            block.register_forward_pre_hook(lambda module, args, i=i: check(i, module, args))
        copies = []
        for _ in range(2):
            trainer.micro_step(s, s.streams[64].next(), 64, 1.0)
            trainer.optimizer_step(s, want_norm=False)
            assert len(swap.live_blocks()) <= ahead + 1
            copies.append(swap.copies)
        n = len(blocks)
        one_step = [(i, False) for i in range(n)] + [(i, True) for i in reversed(range(n))]
        assert seen == one_step * 2                                       # backward re-ran every block, in reverse
        assert swap.peak == ahead + 1
        # Neither turn (forward to backward, backward to the next forward) copies anything: the blocks just used
        # are the next ones needed and stay in the window, so a pass copies all but ahead + 1 of them.
        assert copies[1] - copies[0] == 2 * (count - (ahead + 1))
    finally:
        trainer.cleanup(s, release_model=True)


def test_a_quantized_base_swaps_its_quantized_weights_and_scales(workspace, tmp_path):
    base = trained(workspace, tmp_path, "model.quantization=nf4", "train.gradient_checkpointing=true")
    assert_identical(trained(workspace, tmp_path, "model.quantization=nf4", "model.blocks_to_swap=3"), base)

    transformer = build_tiny_pipeline("klein").transformer
    quantize_transformer(transformer, "int8", dtype=torch.float32)
    layer = next(m for m in transformer.single_transformer_blocks[-1].modules() if isinstance(m, QuantizedLinear))
    swap = swap_blocks(transformer, 1, "cpu")
    assert any(t is layer.weight for t in swap.tensors[3]) and any(t is layer.weight_scale for t in swap.tensors[3])
    unswap_blocks(transformer, restore=True)


def test_bad_counts_name_the_key_and_the_block_count(workspace, tmp_path):
    transformer = build_tiny_pipeline("klein").transformer
    for bad in (5, -1):
        with pytest.raises(ConfigError) as error:
            swap_blocks(transformer, bad, "cpu")
        (key, message), = error.value.problems
        assert key == "model.blocks_to_swap" and repr(bad) in message and "4 (2 double + 2 single)" in message
    with pytest.raises(ConfigError, match="model.blocks_to_swap"):
        load_config(None, ["model.blocks_to_swap=-1"])
    with pytest.raises(ConfigError, match=r"model.blocks_to_swap: 9 .* 4 \(2 double \+ 2 single\)"):
        trainer.train(make_config(workspace, tmp_path, "model.blocks_to_swap=9"), transformer=transformer)
    with pytest.raises(ConfigError, match="train.compile"):
        trainer.train(make_config(workspace, tmp_path, "model.blocks_to_swap=1", "train.compile=true"),
                      transformer=transformer)
    assert not getattr(transformer, "peft_config", None) and ATTRIBUTE not in transformer.__dict__


def test_sampling_runs_swapped_and_training_without_checkpointing_is_refused():
    """Without gradients (sampling) the swapped model predicts exactly what the whole one does; with gradients it
    refuses to run without checkpointing, whose backward re-run is what brings each block back."""
    from flux2_lora_core.training.flow_matching import image_ids, predict_velocity, text_ids

    transformer = build_tiny_pipeline("klein").transformer.eval()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(1, 128, 4, 4, generator=generator)                                  # (B, 128, h, w)
    text = torch.randn(1, 8, transformer.config.joint_attention_dim, generator=generator)  # (B, L, D)

    def run():
        return predict_velocity(transformer, x, text, torch.tensor([0.7]), img_ids=image_ids(4, 4),
                                txt_ids=text_ids(8), guidance=None)

    with torch.no_grad():
        whole = run()
        swap = swap_blocks(transformer, 3, "cpu")
        assert torch.equal(run(), whole) and torch.equal(run(), whole) and swap.peak == 2
    with pytest.raises(ConfigError, match="train.gradient_checkpointing"):
        run()
    unswap_blocks(transformer, restore=True)
    assert torch.equal(run().detach(), whole)
