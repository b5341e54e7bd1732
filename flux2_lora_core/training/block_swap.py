"""Block swap (`model.blocks_to_swap = N`): N transformer blocks keep their frozen weights in host memory, and
each is copied onto the GPU just before it runs, on a side CUDA stream, so the copies overlap compute.

Why not diffusers' group offloading: it is built for inference. It moves whole modules (the LoRA's trainable
parameters with them, which the optimizer and its state need on the device) and prefetches in forward order
only, while training runs the blocks forward and then backward in reverse order.

What moves: only frozen tensors (base weights and biases, norms, QuantizedLinear's quantized `weight` and its
`weight_scale` buffer). Trainable LoRA parameters (requires_grad) never move, so the optimizer is untouched. A
swapped block's host copy (pinned on CUDA) is its persistent storage; a device copy exists only while the block
is in the window: the block that runs next and the `ahead` swapped blocks used after it.

Which blocks: the last N of the forward order (the single blocks last). They are also the first of the
backward, so at the turn from forward to backward the blocks just used are the ones needed next and simply
stay in the window: no copy has to be waited for where there is no block compute to hide it (the loss). The
blocks never swapped (unless N is all of them) run first, while the first swapped ones are copied in.

Order of use: a pre-hook on the transformer starts a forward; its forward hook, when gradients are on, turns
the order around for backward. Backward needs gradient checkpointing (the trainer turns it on): the forward
then keeps no activation of a block, and backward re-runs each block's forward (its pre-hook fires again, in
reverse order) just before that block's backward. The re-run saves what backward needs as new tensors sharing
the device copy's storage, so pointing the parameter back at its host copy (`param.data = host`) leaves them
valid; that device memory goes when autograd drops them, at the end of the block's own backward. At each
block's pre-hook the window is worked out again from the order of use ahead (forward: the rest of the forward,
then the backward if gradients are on, else the next forward; backward: the rest of it, then the next
forward), so the end of one pass already copies in the start of the next.

On the CPU (compute device == host) the same code runs: a device copy is a clone of the host tensor and there
is no stream or event; the bookkeeping is identical, which is what the tests check.
"""

from __future__ import annotations

import functools
import itertools
import logging
import weakref
from dataclasses import dataclass

import torch

from ..errors import ConfigError

log = logging.getLogger(__name__)

AHEAD = 1                        # swapped blocks copied in while one computes: double buffering
ATTRIBUTE = "_flux2_block_swap"  # where the transformer holds its BlockSwap, for hand_back / cleanup


def transformer_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """Every transformer block in forward order: the double-stream blocks, then the single-stream ones."""
    return [*transformer.transformer_blocks, *transformer.single_transformer_blocks]


def check_blocks_to_swap(count, transformer: torch.nn.Module) -> None:
    """ConfigError unless `count` is a number of blocks this transformer has (read from the model, not assumed)."""
    double, single = len(transformer.transformer_blocks), len(transformer.single_transformer_blocks)
    total = double + single
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= total:
        raise ConfigError([("model.blocks_to_swap", f"{count!r} is not a number of blocks of this transformer: it "
                                                    f"has {total} ({double} double + {single} single), so use 0 "
                                                    f"(off) to {total}")])


def _frozen_tensors(block: torch.nn.Module) -> list[torch.Tensor]:
    """The block's parameters that do not train, and its buffers (QuantizedLinear's weight_scale), each once."""
    found: dict[int, torch.Tensor] = {}
    for tensor in itertools.chain((p for p in block.parameters() if not p.requires_grad), block.buffers()):
        found.setdefault(id(tensor), tensor)
    return list(found.values())


@dataclass
class _Copy:
    """One swapped block's device copies, in the order of BlockSwap.tensors[block]."""

    tensors: list[torch.Tensor]
    event: object = None        # torch.cuda.Event recorded on the side stream after the copies (None on the CPU)
    ready: bool = False         # compute waited for the copies and the block's tensors point at them


class BlockSwap:
    """The hooks and bookkeeping of one transformer's swapped blocks; see the module doc."""

    def __init__(self, transformer: torch.nn.Module, count: int, device, *, ahead: int = AHEAD):
        check_blocks_to_swap(count, transformer)
        if ahead < 0:
            raise ValueError(f"ahead must be >= 0, got {ahead!r}")
        self.transformer, self.device, self.ahead = transformer, torch.device(device), ahead
        self.blocks = transformer_blocks(transformer)
        self.first = len(self.blocks) - count                 # blocks[first:] are swapped
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.tensors: dict[int, list[torch.Tensor]] = {}     # block -> its frozen parameters and buffers
        self.host: dict[int, list[torch.Tensor]] = {}        # block -> their host copies (the storage)
        self.resident: dict[int, _Copy] = {}                 # the window: block -> its device copies
        self.backward = False      # order of use: the forward (False) or backward's re-run in reverse (True)
        self.grad = False          # the running forward will be followed by a backward
        self.copies = 0            # blocks copied in so far
        self.peak = 0              # most blocks in the window at once
        self._made: list[tuple[int, list[weakref.ref]]] = []   # every device copy still alive, see live_blocks
        moved = 0
        for i in range(self.first, len(self.blocks)):
            self.tensors[i] = _frozen_tensors(self.blocks[i])
            self.host[i] = [self._to_host(t) for t in self.tensors[i]]
            for tensor, host in zip(self.tensors[i], self.host[i]):
                tensor.data = host                           # the device memory goes with the last reference
            moved += sum(h.numel() * h.element_size() for h in self.host[i])
        self.handles = [transformer.register_forward_pre_hook(self._forward_starts),
                        transformer.register_forward_hook(self._forward_ends)]
        self.handles += [block.register_forward_pre_hook(functools.partial(self._before_block, i))
                         for i, block in enumerate(self.blocks)]
        log.info("block swap: transformer blocks %d..%d of %d (%d double + %d single) keep their frozen weights "
                 "(%.0f MB) in %shost memory, %d copied in ahead", self.first, len(self.blocks) - 1, len(self.blocks),
                 len(transformer.transformer_blocks), len(transformer.single_transformer_blocks), moved / 2**20,
                 "pinned " if self.cuda else "", ahead)

    def _to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.cuda:
            return tensor.detach()       # already in host memory: the same storage, a tensor of its own
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)   # pinned: truly async copies
        return host.copy_(tensor.detach())

    # ------------------------------------------------------------------------------------------ order of use
    def _order(self, start: int):
        """Block indices in the order they will run from `start` on (two passes: this one and the next)."""
        n = len(self.blocks)
        if self.backward:
            return itertools.chain(range(start, -1, -1), range(n))
        return itertools.chain(range(start, n), range(n - 1, -1, -1) if self.grad else range(n))

    def window(self, start: int) -> list[int]:
        """The swapped blocks wanted on the device from block `start` on: it (if swapped) and the `ahead` next."""
        wanted: list[int] = []
        for i in self._order(start):
            if i >= self.first and i not in wanted:
                wanted.append(i)
                if len(wanted) > self.ahead:
                    break
        return wanted

    def _schedule(self, start: int) -> None:
        wanted = self.window(start)
        for i in [i for i in self.resident if i not in wanted]:
            self._release(i)
        for i in wanted:
            if i not in self.resident:
                self._submit(i)
        self.peak = max(self.peak, len(self.resident))

    # ------------------------------------------------------------------------------------------ hooks
    def _forward_starts(self, module, args) -> None:
        self.grad = torch.is_grad_enabled()
        if self.grad and not getattr(self.transformer, "gradient_checkpointing", False):
            raise ConfigError([("train.gradient_checkpointing", "model.blocks_to_swap needs gradient checkpointing "
                                                                "to train: set train.gradient_checkpointing=true")])
        self.backward = False
        self._schedule(0)

    def _forward_ends(self, module, args, output) -> None:
        if self.grad:
            self.backward = True
            self._schedule(len(self.blocks) - 1)

    def _before_block(self, index: int, module, args) -> None:
        self._schedule(index)
        if index in self.resident:
            self._ready(index)

    # ------------------------------------------------------------------------------------------ copies
    def _submit(self, index: int) -> None:
        """Start copying a block in (on the side stream); its tensors keep pointing at the host until _ready."""
        hosts = self.host[index]
        if self.cuda:
            with torch.cuda.stream(self.stream):
                copies = [h.to(self.device, non_blocking=True) for h in hosts]
                event = torch.cuda.Event()
                event.record(self.stream)
        else:
            copies, event = [h.clone() for h in hosts], None
        self.resident[index] = _Copy(copies, event)
        self.copies += 1
        self._made = [(i, refs) for i, refs in self._made if any(r() is not None for r in refs)]
        self._made.append((index, [weakref.ref(c) for c in copies]))

    def _ready(self, index: int) -> None:
        """Make compute wait for the block's copies and point its tensors at them."""
        copy = self.resident[index]
        if copy.ready:
            return
        if self.cuda:
            stream = torch.cuda.current_stream(self.device)   # autograd's re-run runs on the forward's stream
            stream.wait_event(copy.event)
            for tensor in copy.tensors:
                tensor.record_stream(stream)   # allocated on the side stream: not reused before compute is done
        for tensor, device_copy in zip(self.tensors[index], copy.tensors):
            tensor.data = device_copy
        copy.ready = True

    def _release(self, index: int) -> None:
        """Point the block back at its host copies; what autograd saved from its re-run stays valid (see above)."""
        self.resident.pop(index)
        for tensor, host in zip(self.tensors[index], self.host[index]):
            tensor.data = host

    def live_blocks(self) -> set[int]:
        """Swapped blocks with a device copy alive anywhere: in the window or still held by autograd."""
        return {i for i, refs in self._made if any(r() is not None for r in refs)}

    def remove(self, *, restore: bool) -> None:
        """Remove the hooks and empty the window; `restore` puts every swapped block back on the device whole
        (a transformer the caller gave us goes back as it came), else the tensors stay in host memory."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
        if self.stream is not None:
            self.stream.synchronize()
        for index in list(self.resident):
            self._release(index)
        if restore:
            for index, tensors in self.tensors.items():
                for tensor, host in zip(tensors, self.host[index]):
                    tensor.data = host.to(self.device)
        self.tensors, self.host, self._made = {}, {}, []


def swap_blocks(transformer: torch.nn.Module, count: int, device, *, ahead: int = AHEAD) -> BlockSwap | None:
    """Swap the last `count` blocks of `transformer` (0: none, after checking the value); replaces an earlier
    swap. The BlockSwap is kept on the transformer, so unswap_blocks finds it wherever training ends."""
    check_blocks_to_swap(count, transformer)
    unswap_blocks(transformer, restore=True)
    if not count:
        return None
    swap = BlockSwap(transformer, count, device, ahead=ahead)
    setattr(transformer, ATTRIBUTE, swap)
    return swap


def unswap_blocks(transformer: torch.nn.Module, *, restore: bool) -> None:
    """Undo swap_blocks (nothing if none): hooks removed, weights on the device again if `restore`."""
    swap = transformer.__dict__.pop(ATTRIBUTE, None)
    if swap is not None:
        swap.remove(restore=restore)
