"""The frozen base sharded over torchrun's ranks (`train.fsdp`): PyTorch's FSDP2 `fully_shard` over each
transformer block and then the whole transformer, so [dev] (32B, 64 GB in bf16) trains on several 24-48 GB cards.

Each rank holds 1/N of every weight, the LoRA's included; a block's weights are gathered just before it runs and
freed after (again in backward, and in checkpointing's re-run), and the LoRA gradients are reduce-scattered: each
rank's optimizer updates its own rows. What changes for the rest of the engine:

- every rank must run every block's collectives, so a rank whose share of a global batch is empty trains on the
  batch's first sample with weight 0 (distributed.Ranks.rows) instead of skipping the step;
- reduce-scatter sums (divide factor 1): each rank's loss is already weighted by its share, as without sharding;
- saving gathers the full LoRA and optimizer state on every rank (a collective), and only rank 0 writes; a
  checkpoint therefore holds full tensors, whatever the rank count, and `shard_like` cuts them again on resume;
- samples are drawn by every rank together (their forward passes gather the weights), and saved by rank 0.
"""

from __future__ import annotations

import logging

import torch

from ..errors import ConfigError

log = logging.getLogger(__name__)


def check_sharding(config) -> None:
    """ConfigError for what sharding cannot be combined with yet."""
    m = config.model
    if m.blocks_to_swap:
        raise ConfigError([("train.fsdp", "cannot be combined with model.blocks_to_swap: sharding already spreads "
                                          "the weights over the GPUs; use one of them")])
    if config.lora.type != "lora":
        raise ConfigError([("train.fsdp", f"cannot be combined with lora.type={config.lora.type} yet: sharding is "
                                          "tested for LoRA only (a DoRA's file needs the whole base weights)")])
    if m.quantization != "none":
        raise ConfigError([("train.fsdp", f"cannot be combined with model.quantization={m.quantization!r} yet: "
                                          "shard a bf16 base, or quantize on one GPU")])


def shard_transformer(transformer) -> None:
    """fully_shard each block, then the rest (embedders, final norm and projection) as the root group."""
    from torch.distributed.fsdp import fully_shard

    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    for module in [*blocks, transformer]:
        fully_shard(module)
        module.set_gradient_divide_factor(1.0)   # per module: each holds its own parameter group
        module.set_force_sum_reduction_for_comms(True)   # a plain SUM: gloo has no PREMUL_SUM (NCCL's 1/factor)
    log.info("base sharded over the ranks (FSDP2): %d blocks", len(blocks))


def is_sharded(transformer) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(transformer, FSDPModule)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded one (a collective: every rank must call it, in the same order)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def shard_like(tensor: torch.Tensor, like) -> torch.Tensor:
    """A full tensor (read from a checkpoint on every rank) cut as `like` is; unchanged when `like` is not sharded.
    No communication: every rank holds the same full tensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor) or tensor.shape != like.shape:
        return tensor
    return distribute_tensor(tensor.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def shard_optimizer_state(state: dict, optimizer) -> dict:
    """An optimizer state_dict's per-parameter tensors (full, from a checkpoint) cut as their parameters are."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state["state"] = {index: {name: shard_like(value, params[index]) if isinstance(value, torch.Tensor) else value
                              for name, value in values.items()} for index, values in state["state"].items()}
    return state
