"""Data-parallel training on PyTorch's distributed engine, launched by `torchrun` (one process per GPU).

    torchrun --nproc-per-node 4 -m flux2_lora_core train --config my.yaml
    torchrun --nnodes 2 --node-rank R --master-addr HOST --master-port 29500 --nproc-per-node 8 \
        -m flux2_lora_core train --config my.yaml

torchrun rather than `accelerate launch`: it ships with torch (every install has it), sets the same environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and restarts nothing behind the engine's back.

Every rank runs the same config on the same seed and draws the same random numbers for the whole global batch
(train.batch_size per rank x ranks): it trains its own contiguous share of those samples. Each rank's loss is
weighted by its share of the global batch and the LoRA gradients are summed over the ranks once per optimizer
step, so the update is the single-process update on the global batch (tested to 1e-5), whatever gradient
accumulation is used. Why summing the gradients here instead of wrapping the model in DistributedDataParallel:
a bucket's last batch may be short, so ranks can hold different sample counts (DDP's equal-weight average would
then be wrong) or none at all (DDP would wait forever for that rank's backward); and the LoRA is a few MB, so
DDP's overlap of communication with backward has little to hide. Only rank 0 writes (run folder, metrics,
checkpoints, samples, the LoRA) and reports progress; a stop request on any rank stops all of them at the same
step.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .callbacks import Callbacks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes."""

    rank: int = 0
    world: int = 1
    local: int = 0                # its GPU on its machine

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def many(self) -> bool:
        return self.world > 1

    def share(self, count: int) -> slice:
        """This rank's rows of a global batch of `count` samples: contiguous and as even as possible (a bucket's
        short last batch can leave a rank with none)."""
        base, extra = divmod(count, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def rows(self, count: int, *, padded: bool = False) -> slice:
        """`share`, except that with `padded` (a sharded base: every rank must run every block) an empty share
        becomes the batch's first sample, which micro_step then weighs 0."""
        share = self.share(count)
        return slice(0, 1) if padded and share.start == share.stop and count else share


SINGLE = Ranks()
_host_group = None               # a gloo group for host-side agreement, so it never waits on a GPU stream


def start(device_type: str) -> Ranks:
    """Join torchrun's process group (once per process): NCCL for CUDA, gloo otherwise. SINGLE when not launched by
    torchrun."""
    global _host_group
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return SINGLE
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
        _host_group = dist.new_group(backend="gloo") if device_type == "cuda" else dist.group.WORLD
    ranks = Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    log.info("rank %d of %d (local %d)", ranks.rank, ranks.world, ranks.local)
    return ranks


def join(device: torch.device) -> tuple[Ranks, torch.device]:
    """(this process's place, its device): under torchrun on CUDA each rank takes its machine's GPU LOCAL_RANK
    (made current, so "cuda" means it everywhere after)."""
    ranks = start(device.type)
    if ranks.many and device.type == "cuda":
        device = torch.device("cuda", ranks.local)
        torch.cuda.set_device(device)
    return ranks, device


def leave() -> None:
    """Leave the process group (after the last collective of a run)."""
    global _host_group
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    _host_group = None


def barrier(ranks: Ranks) -> None:
    if ranks.many:
        import torch.distributed as dist

        dist.barrier(group=_host_group)


def broadcast(ranks: Ranks, value):
    """Rank 0's `value` on every rank (a picklable object: a path, a dict)."""
    if not ranks.many:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0, group=_host_group)
    return box[0]


def agree(ranks: Ranks, values: dict) -> None:
    """ConfigError unless every rank has the same `values` (key -> a picklable value), naming each that differs:
    ranks that trained on other settings, data or weights would average gradients of different problems."""
    if not ranks.many:
        return
    import torch.distributed as dist

    gathered: list = [None] * ranks.world
    dist.all_gather_object(gathered, values, group=_host_group)
    problems = [(key, f"rank {r} has {theirs.get(key)!r} but rank 0 has {gathered[0].get(key)!r}: every rank "
                      "must run the same config on the same files (copy them to every machine, same paths)")
                for key in values for r, theirs in enumerate(gathered) if theirs.get(key) != gathered[0].get(key)]
    if problems:
        raise ConfigError(problems)


def any_rank(ranks: Ranks, flag: bool) -> bool:
    """Whether `flag` is true on any rank: every rank then acts on it at the same step."""
    if not ranks.many:
        return flag
    import torch.distributed as dist

    value = torch.tensor([int(flag)])
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=_host_group)
    return bool(value.item())


def sum_over_ranks(ranks: Ranks, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over the ranks (in place; on the training device's group)."""
    if ranks.many:
        import torch.distributed as dist

        dist.all_reduce(tensor)
    return tensor


def sum_gradients(ranks: Ranks, params: list[torch.Tensor]) -> None:
    """The LoRA gradients summed over the ranks in one collective (a rank that had no sample sends zeros)."""
    if not ranks.many:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = sum_over_ranks(ranks, torch.cat([g.reshape(-1) for g in grads]))
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(p)   # views of the one summed buffer: no copies
        offset += g.numel()


class Team:
    """The ranks as the latent cache sees them when they fill it together (cache/latent_cache.py): it needs to
    pass objects around, not to know torch.distributed."""

    def __init__(self, ranks: Ranks):
        self.ranks, self.rank, self.world, self.main = ranks, ranks.rank, ranks.world, ranks.main

    def broadcast(self, value):
        return broadcast(self.ranks, value)

    def gather(self, value) -> list:
        """Every rank's `value`, in rank order, on every rank."""
        import torch.distributed as dist

        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, value, group=_host_group)
        return gathered

    def barrier(self) -> None:
        barrier(self.ranks)


class Follower(Callbacks):
    """A rank other than 0: it reports nothing (rank 0 does), but its stop requests still count, and its host
    still learns the phases (a terminal defers a signal to the end of a step once training runs)."""

    def __init__(self, callbacks: Callbacks):
        self.inner = callbacks

    def should_stop(self) -> bool:
        return self.inner.should_stop()

    def on_phase(self, phase: str) -> None:
        self.inner.on_phase(phase)


def follower() -> bool:
    """Whether this process is a torchrun rank other than 0 (known before any process group exists)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) != 0
