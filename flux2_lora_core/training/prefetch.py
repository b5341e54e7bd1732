"""Read the coming micro-batches from the latent cache on a background thread (audit 1.5).

Reading a batch means page faults in memory-mapped shards, a stack and a cast; on a GPU that time is the
accelerator's idle time between steps. A daemon thread does it ahead, a bounded queue (`depth` batches)
holds the results, pinned on CUDA so the step's host-to-device copy can be `non_blocking`.

Determinism: a run is bit-exact across resume, so prefetching must not move a single random draw or change
what a checkpoint saves. It does neither, because the thread decides nothing:
- the batch indices it reads come from *copies* of the loop's BatchStreams (`upcoming`): the order is a pure
  function of (epoch, position), so the copies give the same batches the loop will ask for, and the loop's own
  streams (the ones a checkpoint saves) advance exactly as without prefetching;
- the flips and caption dropout are still drawn by the training thread, from the run's generator, at the moment
  they were drawn before; the thread reads both orientations (when data.flip is on) and the captions, and
  `HostBatch.choose` picks rows after the draws. The rows are byte copies, so the batch is bit-identical.
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..data import resolution_at

log = logging.getLogger(__name__)

_END = object()          # the plan is exhausted: no batch follows
JOIN_SECONDS = 30.0      # how long close() waits for a read in progress before leaving the daemon thread behind
# Training on the CPU, the thread has nothing to hide (no host-to-device copy, the step's compute is on the same
# cores) and its torch ops start OpenMP teams whose spinning workers take those cores from the step: measured
# 1.82x the step time on 2 cores (benchmarks/train_step.py, 1.01x without it). So it reads ahead for
# accelerators only; the tests turn it on for the CPU to exercise it.
ON_CPU = False


@dataclass
class HostBatch:
    """One micro-batch in host memory, already in the training dtype (pinned on CUDA)."""

    resolution: int
    indices: list[int]
    latents: torch.Tensor                # (B, 128, h, w) as encoded
    flipped: torch.Tensor | None         # (B, 128, h, w) the mirrored encodings; None without data.flip
    texts: torch.Tensor                  # (B, L, D) the captions' embeddings
    empty: torch.Tensor                  # (L0, D) the empty caption's, for caption dropout
    references: torch.Tensor | None = None          # (B, n, 128, h, w) an edit dataset's reference latents
    flipped_references: torch.Tensor | None = None  # their mirrored encodings, with data.flip

    def choose(self, flips: torch.Tensor, dropped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                          torch.Tensor | None]:
        """(latents, texts, references) as the training thread's draws chose them. Rows are replaced in place: a
        HostBatch is used once, and its buffers stay pinned."""
        latents, texts = self.latents, self.texts
        for row in flips.nonzero().flatten().tolist():
            latents[row] = self.flipped[row]
            if self.references is not None:    # a mirrored target goes with its mirrored references
                self.references[row] = self.flipped_references[row]
        if dropped.any():
            if texts.shape[1:] == self.empty.shape:
                texts[dropped] = self.empty
            else:                # a batch of one (setup checks equal lengths when batch_size > 1)
                texts = self.empty[None]
        return latents, texts, self.references


def upcoming(streams: dict, step: int, total: int, resolutions: tuple[int, ...],
             accumulation: int) -> Iterator[tuple[int, list[int]]]:
    """(resolution, indices) of every micro-batch the loop will draw from `step` to `total`, in order, read from
    shallow copies of `streams` (BatchStream.next reassigns its fields, never mutates them: the originals stay
    where they are). The copies are taken now, by the caller's thread, before the loop draws anything."""
    streams = {r: copy.copy(stream) for r, stream in streams.items()}

    def plan():
        for at in range(step, total):
            resolution = resolution_at(at, resolutions, total)
            for _ in range(accumulation):
                yield resolution, streams[resolution].next()
    return plan()


class Prefetcher:
    """Background reads of `plan`'s micro-batches; `get` hands them over in order. Use as a context manager:
    leaving it stops the thread, whether training ended, was cancelled or raised."""

    def __init__(self, cache, plan: Iterator[tuple[int, list[int]]], *, dtype: torch.dtype, device: torch.device,
                 flip: bool, depth: int = 2):
        self.cache, self.plan, self.dtype, self.flip = cache, plan, dtype, flip
        self.device = device
        self.pin = device.type == "cuda"     # pinning only helps (and only works) for copies to a CUDA device
        self.waits = 0                       # get() calls that found the queue empty: the step waited on the cache
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flux2-lora-prefetch", daemon=True)
        self._thread.start()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _host(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        batch = torch.stack(tensors).to(self.dtype)     # the same cast micro_batch's .to(device, dtype) makes
        return batch.pin_memory() if self.pin else batch

    def _run(self) -> None:
        """The thread: read, stack, pin, queue. An error is queued in the batch's place, so the training thread
        raises it at the step that needed the batch, as the synchronous read would have."""
        try:
            if self.pin and self.device.index is not None:
                torch.cuda.set_device(self.device)    # pinned memory belongs to the training device's context
            empty = self._host([self.cache.text(None)])[0]
            for resolution, indices in self.plan:
                latents = self._host([self.cache.latent(i, resolution) for i in indices])
                flipped = self._host([self.cache.latent(i, resolution, flipped=True) for i in indices]) \
                    if self.flip else None
                texts = self._host([self.cache.text(i) for i in indices])
                refs = [self.cache.references(i, resolution) for i in indices]
                references = flipped_refs = None
                if refs[0] is not None:
                    references = self._host(refs)
                    flipped_refs = self._host([self.cache.references(i, resolution, flipped=True)
                                               for i in indices]) if self.flip else None
                batch = HostBatch(resolution, indices, latents, flipped, texts, empty, references, flipped_refs)
                if not self._put(batch):
                    return
            self._put(_END)
        except BaseException as exc:  # noqa: BLE001 - handed to the training thread, which raises it
            self._put(exc)

    def _put(self, item) -> bool:
        """Queue `item` unless close() was called meanwhile (then False: the thread ends)."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def get(self, resolution: int, indices: list[int]) -> HostBatch:
        """The next batch, which must be the one the loop drew (`resolution`, `indices`)."""
        if self._queue.empty():
            self.waits += 1
        while True:
            try:
                item = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError("the batch prefetch thread ended without a batch") from None
        if isinstance(item, BaseException):
            raise item
        if item is _END or (item.resolution, item.indices) != (resolution, indices):
            got = "nothing" if item is _END else f"{item.indices} at {item.resolution} px"
            raise RuntimeError(f"the prefetched batch ({got}) is not the one drawn ({indices} at {resolution} px): "
                               "run with train.prefetch_batches=0 and report this")
        return item

    def close(self) -> None:
        """Stop the thread; a read in progress finishes first (bounded by JOIN_SECONDS)."""
        self._stop.set()
        while True:               # free the slot a blocked put is waiting for
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(JOIN_SECONDS)
        if self._thread.is_alive():
            log.warning("the batch prefetch thread is still reading after %.0f s; leaving it (a daemon) behind",
                        JOIN_SECONDS)


def prefetcher_for(s) -> Prefetcher | None:
    """A session's prefetcher from its current step (after a resume: from the checkpoint's place); None when
    train.prefetch_batches is 0, or training runs on the CPU (see ON_CPU)."""
    t = s.config.train
    if not t.prefetch_batches or (s.device.type == "cpu" and not ON_CPU):
        return None
    plan = upcoming(s.streams, s.step, t.steps, s.config.data.resolution, t.gradient_accumulation)
    if s.ranks.many:   # this rank's share of each global batch (distributed.py); none of a batch it has no share in
        plan = ((resolution, mine) for resolution, batch in plan
                for mine in [batch[s.ranks.rows(len(batch), padded=s.sharded)]] if mine)
    return Prefetcher(s.cache, plan, dtype=s.dtype, device=s.device, flip=s.config.data.flip,
                      depth=t.prefetch_batches)
