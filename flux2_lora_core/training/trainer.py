"""Train a FLUX.2 LoRA: the recipe (setup -> train -> save -> cleanup) over small components.

Everything heavy happens once in `setup`: the latent cache is brought up to date (the encoders load
only if something changed and are released before the transformer loads), the transformer gets its
LoRA, the optimizer and schedule are built. `train_loop` is then only the FLUX.2 flow-matching step
(flow_matching.py) repeated, with gradient accumulation, clipping, mixed precision and logging.

Callers follow a run through `Callbacks` (callbacks.py: on_phase, on_step, should_stop, on_sample): the CLI maps
it to a progress bar and Ctrl+C, the ComfyUI node to its progress bar, live events, Cancel and "Stop and save". A fixed
`train.seed` gives the same run twice: the LoRA init, the data order, flips, caption dropout, noise
and timesteps all come from generators seeded from it (noise is drawn on the CPU, so the stream does
not depend on the device).
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import Config
from ..data import BatchStream, resolution_at
from ..errors import ConfigError, Flux2LoraError, TrainingDiverged
from ..models import choose_device, choose_dtype, free_memory, judge_distilled, peak_memory_mb, release
from ..preflight import check_training_config
from . import distributed
from .block_swap import unswap_blocks
from .callbacks import Callbacks, StepReport
from .flow_matching import PositionIds, sample_sigmas, session_loss, shift_sigmas
from .ema import make_ema
from .lora import add_lora, load_initial_lora, read_initial_lora, trainable_parameters
from .metrics import MetricsLog, step_profiler
from .model_setup import hand_back, prepare_model
from .optimization import make_optimizer
from .outputs import write_outputs
from .prefetch import Prefetcher, prefetcher_for
from .run_folder import new_run_dir, write_run_json
from .sharding import check_sharding, full, shard_transformer
from .sampling import DISTILLED_STEPS, sample, sample_prompts
from .validation import validation_cache, validator_for
from .state import save_checkpoint

log = logging.getLogger(__name__)

LOSS_HISTORY = 10_000         # per-step losses kept in memory for the result (metrics.jsonl has them all)


@dataclass
class TrainingResult:
    run_dir: Path
    lora_path: Path | None      # None when stopped before the first step
    steps: int                  # optimizer steps completed
    stopped_early: bool
    losses: list[float]         # per optimizer step of this call (mean of its micro-batches), the last LOSS_HISTORY
    samples: list[Path] = field(default_factory=list)
    curves: Path | None = None
    skipped: str = ""           # the dataset files left out, as validation words it (CacheSummary.screened)


# ---------------------------------------------------------------------------------------------- setup
@dataclass
class Session:
    """What one run holds between the recipe's phases."""

    config: Config
    run_dir: Path
    cache: object
    encoders: object
    transformer: torch.nn.Module
    variant: object
    targets: list[str]
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: object
    autocast_dtype: torch.dtype | None
    device: torch.device
    dtype: torch.dtype
    streams: dict
    generator: torch.Generator
    ids: PositionIds
    metrics: MetricsLog
    sample_prompts: list[str]
    sample_embeds: list[torch.Tensor]
    base_fingerprint: str
    step: int = 0
    start_step: int = 0
    losses: deque = field(default_factory=lambda: deque(maxlen=LOSS_HISTORY))   # bounded (audit 2.1)
    samples: list[Path] = field(default_factory=list)
    ranks: distributed.Ranks = distributed.SINGLE   # torchrun's processes: this one's place (distributed.py)
    sharded: bool = False                           # the base is sharded over the ranks (sharding.py)
    ema: object = None                              # the LoRA's moving average, train.ema_decay (ema.py)
    distilled: bool = False                         # a step-distilled [klein] base (models.judge_distilled)
    validator: object = None                        # the held-out images' loss (validation.py), or None
    validation_loss: float | None = None            # its latest value: the best checkpoint is chosen by it
    sample_references: list = field(default_factory=list)   # per sample prompt, the reference images it edits


def setup(config: Config, callbacks: Callbacks, encoders=None, transformer=None, *, resume=None) -> Session:
    """Cache, model, LoRA, optimizer: everything before the first step. `encoders`/`transformer` may be
    given already loaded (tests, the demo, a ComfyUI graph); otherwise they load from config.model.
    `resume` = (run_dir, tensors, documents) of a verified checkpoint continues that run in run_dir."""
    from ..cache import cache_for_config, source_fingerprint
    from ..models import load_transformer, resolve_sources, weights_fingerprint

    check_training_config(config, run_dir=resume[0] if resume else None)   # every path, before anything loads
    if config.train.fsdp:
        check_sharding(config)
    initial = None
    if config.lora.init_from and resume is None:   # read first: a file that cannot be continued fails fast
        initial, rank, alpha = read_initial_lora(config.lora.init_from)
        if (rank, alpha) != (config.lora.rank, config.lora.alpha):
            log.info("lora.init_from: rank %d, alpha %g, as %s was trained (not lora.rank=%d, alpha=%g)", rank,
                     alpha, config.lora.init_from, config.lora.rank, config.lora.alpha)
            config = config.replace(lora={"rank": rank, "alpha": alpha})
    t, given = config.train, transformer is not None
    device = choose_device(config.model.device)
    ranks, device = distributed.join(device)
    callbacks.on_phase("caching")
    cache, encoders = cache_for_config(config, encoders=encoders, progress=callbacks.on_progress,
                                       prompts=config.sample.prompts,
                                       team=distributed.Team(ranks) if ranks.many else None)   # a share each
    held_cache = validation_cache(config, encoders, distributed.Team(ranks) if ranks.many else None)
    prompts, embeds, references = sample_prompts(config, cache)
    if t.batch_size > 1:
        lengths = {i: cache.text_length(i) for i in range(len(cache))}
        common = cache.text_length(None)
        longer = sorted(cache.items[i].path for i, n in lengths.items() if n != common)
        if longer:
            raise ConfigError([("train.batch_size", f"{len(longer)} captions encode to more than {common} tokens "
                                                    f"(e.g. {longer[0]}), and a batch needs equal lengths: shorten "
                                                    "them or use train.batch_size=1")])

    dtype = choose_dtype(config.model.dtype, device)
    callbacks.on_phase("loading")
    if transformer is None:
        transformer, variant = load_transformer(config.model.path, variant=config.model.variant, dtype=dtype,
                                                device=device, quantization=config.model.quantization)
        m = config.model
        sources = resolve_sources(m.path, vae=m.vae, text_encoder=m.text_encoder, tokenizer=m.tokenizer)
        quantized = config.model.quantization != "none"   # the same files quantized are another base to resume on
        base_fingerprint = source_fingerprint(sources.transformer,
                                              extra={"quantization": config.model.quantization} if quantized else None)
    else:
        from ..models import detect_variant

        variant = detect_variant(dict(transformer.config))
        dtype, device = transformer.dtype, transformer.device
        base_fingerprint = weights_fingerprint(transformer)
    if variant.family != cache.family:
        raise ConfigError([("model.path", f"the transformer is FLUX.2 [{variant.family}] but the latent cache was "
                                          f"encoded for [{cache.family}]: use matching files")])
    distributed.agree(ranks, {"config": config.to_dict(), "cache": cache.fingerprint, "model.path": base_fingerprint})
    distilled, told = judge_distilled(config.model.path, variant.family, config.model.distilled)
    if distilled:
        log.warning("the base is the step-distilled FLUX.2 [klein] (told by %s): LoRAs train poorly on it (grey, "
                    "washed-out results). Train on the base checkpoint (e.g. flux-2-klein-base-4b) and use the LoRA "
                    "on either; samples here use %d steps and no CFG (set model.distilled=false if it is a base)",
                    told, DISTILLED_STEPS)
    torch.manual_seed(t.seed)  # LoRA dropout draws from torch's global generator (forked by train())
    if getattr(transformer, "peft_config", None):
        raise ConfigError([("model.path", "the transformer given already has a LoRA adapter "
                                          f"({', '.join(transformer.peft_config)}): pass the base model")])
    targets = add_lora(transformer, rank=config.lora.rank, alpha=config.lora.alpha, dropout=config.lora.dropout,
                       targets=config.lora.targets, seed=t.seed, kind=config.lora.type)
    try:
        if initial:
            load_initial_lora(transformer, initial, config.lora.init_from, targets=config.lora.targets)
        return _finish_setup(config, callbacks, cache, encoders, transformer, variant, targets, dtype, device,
                             base_fingerprint, (prompts, embeds, references), resume, ranks, held_cache, distilled)
    except BaseException:
        hand_back(transformer) if given else release(transformer)
        raise


def _finish_setup(config, callbacks, cache, encoders, transformer, variant, targets, dtype, device,
                  base_fingerprint, samples, resume, ranks=distributed.SINGLE, held_cache=None,
                  distilled=False) -> Session:
    """`samples`: (prompts, their embeddings, their reference images), sampling.sample_prompts."""
    from diffusers.optimization import get_scheduler

    data, t = config.data, config.train
    autocast_dtype, scaler = prepare_model(config, transformer, device, dtype,   # model_setup.py
                                           max(len(item.references) for item in cache.items))
    sharded = t.fsdp and ranks.many
    if sharded:
        shard_transformer(transformer)   # before the optimizer: it holds each rank's rows of the LoRA
    elif t.fsdp:
        log.info("train.fsdp: one process, so nothing to shard")
    params = trainable_parameters(transformer)
    optimizer = make_optimizer(params, t)
    scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=t.warmup_steps,
                              num_training_steps=t.steps)
    run_dir = resume[0] if resume else distributed.broadcast(ranks, new_run_dir(config) if ranks.main else None)
    # One stream of global batches (train.batch_size per rank x ranks): every rank draws the same, trains its share.
    validator, held = validator_for(config, cache, held_cache)
    streams = {r: BatchStream(cache, r, t.batch_size * ranks.world, t.seed, exclude=held) for r in data.resolution}
    session = Session(config, run_dir, cache, encoders, transformer, variant, targets, optimizer, scheduler, scaler,
                      autocast_dtype, device, dtype, streams, torch.Generator("cpu").manual_seed(t.seed),
                      PositionIds(), MetricsLog(None), samples[0], samples[1], base_fingerprint, ranks=ranks,
                      sharded=sharded, ema=make_ema(transformer, params, t.ema_decay), distilled=distilled,
                      validator=validator, sample_references=samples[2])
    if resume:
        from .state import restore

        restore(session, resume[1], resume[2])   # first: a checkpoint that cannot be used changes no file
    # On resume, the records after the checkpoint (of the steps being redone) are dropped from the file.
    if ranks.main:   # only rank 0 writes
        session.metrics = MetricsLog(run_dir / "metrics.jsonl", truncate_after=session.step if resume else None)
    if resume:
        session.metrics.restore_history(resume[2].get("metrics", {}))
    session.start_step = session.step
    if ranks.main:
        write_run_json(session)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)   # memory_mb: training's peak, not the encoders' before it
    return session


# ---------------------------------------------------------------------------------------------- the step
def micro_batch(s: Session, indices: list[int], resolution: int, batches: Prefetcher | None = None):
    """(latents (B, 128, h, w), prompt embeddings (B, L, D), an edit dataset's references (B, n, 128, h, w) or None)
    with flips and caption dropout drawn from the run's generator: a mirrored target has mirrored references, a
    dropped caption keeps them. With `batches` the tensors were read ahead (prefetch.py); the draws are the same
    either way."""
    draws = torch.rand(2, len(indices), generator=s.generator)          # for the global batch: ranks stay in step
    flips = draws[0] < 0.5 if s.config.data.flip else torch.zeros(len(indices), dtype=torch.bool)
    dropped = draws[1] < s.config.train.caption_dropout
    share = s.ranks.rows(len(indices), padded=s.sharded)
    indices, flips, dropped = indices[share], flips[share], dropped[share]
    if not indices:   # this rank has no sample of this (short) batch: its draws are made, nothing to read
        return None, None, None
    if batches is not None:
        chosen = batches.get(resolution, indices).choose(flips, dropped)   # pinned on CUDA
        return tuple(t if t is None else t.to(s.device, non_blocking=True) for t in chosen)
    latents = torch.stack([s.cache.latent(i, resolution, flipped=bool(f)) for i, f in zip(indices, flips)])
    texts = [s.cache.text(None if d else i) for i, d in zip(indices, dropped)]   # equal lengths: checked in setup
    refs = [s.cache.references(i, resolution, flipped=bool(f)) for i, f in zip(indices, flips)]  # batches share n
    refs = None if refs[0] is None else to_device(s, torch.stack(refs), s.dtype)
    return to_device(s, latents, s.dtype), to_device(s, torch.stack(texts), s.dtype), refs


def to_device(s: Session, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A tensor drawn on the host (noise, sigmas: the seeded, device-independent stream resume depends on) onto the
    device without making the host wait: cast on the host (the same values as on the device), then on CUDA pinned
    and copied non_blocking, so the host keeps queuing the step's kernels."""
    tensor = tensor.to(dtype) if dtype is not None else tensor
    if s.device.type != "cuda":
        return tensor.to(s.device)
    return tensor.pin_memory().to(s.device, non_blocking=True)


def micro_step(s: Session, indices: list[int], resolution: int, scale: float,
               batches: Prefetcher | None = None, sync: bool = True) -> torch.Tensor:
    """Forward and backward of this rank's share of one micro-batch; returns its loss weighted by that share (a
    detached device scalar; the ranks' values sum to the global batch's loss). A rank whose share is empty draws
    the same random numbers and computes nothing (with a sharded base it computes its stand-in sample, weighed 0:
    its blocks' collectives must run)."""
    t = s.config.train
    count = len(indices)
    mine = len(indices[s.ranks.share(count)])
    if not mine and not s.sharded:
        shape = s.cache.latent(indices[0], resolution).shape                  # (128, h, w) of the global batch
        micro_batch(s, indices, resolution, batches)                           # its draws, and no read
        torch.randn((count, *shape), generator=s.generator)
        sample_sigmas(count, method=t.timestep_sampling, generator=s.generator, logit_mean=t.logit_mean,
                      logit_std=t.logit_std)
        return torch.zeros((), device=s.device)
    x0, text, refs = micro_batch(s, indices, resolution, batches)        # (b, 128, h, w), (b, L, D): this rank's
    share = s.ranks.rows(count, padded=s.sharded)
    noise = to_device(s, torch.randn((count, *x0.shape[1:]), generator=s.generator)[share], s.dtype)
    sigmas = sample_sigmas(count, method=t.timestep_sampling, generator=s.generator, logit_mean=t.logit_mean,
                           logit_std=t.logit_std)[share]                # (b,)
    if t.timestep_shift != "none":
        sigmas = shift_sigmas(sigmas, x0.shape[2] * x0.shape[3], mu_schedule=t.timestep_shift)
    loss = session_loss(s, x0, text, noise, to_device(s, sigmas), refs)
    weighted = loss * (mine / count)
    scaled = weighted * scale
    if s.sharded:   # reduce-scatter the gradients once per optimizer step, not after every micro-batch
        s.transformer.set_requires_gradient_sync(sync)
    (s.scaler.scale(scaled) if s.scaler else scaled).backward()
    return weighted.detach()


def optimizer_step(s: Session, want_norm: bool) -> torch.Tensor | None:
    """Unscale, clip, step; the gradient norm only when clipping needs it anyway or it will be logged."""
    t, params = s.config.train, trainable_parameters(s.transformer)
    if not s.sharded:   # a sharded base's gradients were reduce-scattered in backward
        distributed.sum_gradients(s.ranks, params)   # once per optimizer step, accumulation included
    if s.scaler:
        s.scaler.unscale_(s.optimizer)
    norm = None
    if t.max_grad_norm > 0:
        norm = full(torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm))
    elif want_norm:
        norm = full(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
    if s.scaler:
        scale = s.scaler.get_scale()
        s.scaler.step(s.optimizer)
        s.scaler.update()
        skipped = s.scaler.get_scale() < scale   # inf/NaN gradients: no update happened, so no schedule step
    else:
        s.optimizer.step()
        skipped = False
    if not skipped:
        s.scheduler.step()
        if s.ema:
            s.ema.step(params)
    s.optimizer.zero_grad(set_to_none=True)
    return norm.detach() if norm is not None and want_norm else None


# ---------------------------------------------------------------------------------------------- the loop
def train_loop(s: Session, callbacks: Callbacks) -> bool:
    """Run to train.steps; returns True when a stop request ended it early."""
    t, accumulation = s.config.train, s.config.train.gradient_accumulation
    if s.config.sample.at_start and s.step == 0:
        sample(s, callbacks)
    pending: list[tuple[int, torch.Tensor, float, float]] = []      # (step, loss, lr, seconds): read at log steps
    started, first_step, last_loss = time.perf_counter(), s.step, None
    callbacks.on_phase("training")
    profiler = step_profiler(s.config.train.profile_steps, s.device, s.run_dir)
    if profiler:
        profiler.start()
    batches = None
    try:
        batches = prefetcher_for(s)       # None with train.prefetch_batches=0: the step reads the cache itself
        while s.step < t.steps:
            if distributed.any_rank(s.ranks, callbacks.should_stop()):   # every rank stops at the same step
                return True
            tick = time.perf_counter()
            resolution = resolution_at(s.step, s.config.data.resolution, t.steps)
            lr = s.scheduler.get_last_lr()[0]
            step_loss = sum(micro_step(s, s.streams[resolution].next(), resolution, 1 / accumulation, batches,
                                       sync=i == accumulation - 1) for i in range(accumulation)) / accumulation
            s.step += 1
            checkpoint_now = s.config.checkpoint.every and s.step % s.config.checkpoint.every == 0
            # A checkpoint keeps the validation loss of its own step: the "best" one is chosen by it.
            validate_now = s.validator is not None and (s.step % t.validate_every == 0 or s.step == t.steps
                                                        or bool(checkpoint_now))
            log_now = s.step % t.log_every == 0 or s.step == t.steps or validate_now
            norm = optimizer_step(s, want_norm=log_now)
            if validate_now and (s.ranks.main or s.sharded):   # a sharded base needs every rank's forward
                s.validation_loss = s.validator.loss(s)
            if profiler:
                profiler.step()
            pending.append((s.step, step_loss, lr, time.perf_counter() - tick))
            logged = ()
            if log_now or checkpoint_now:   # a checkpoint's metrics.jsonl must hold every step before it
                batch, pending = pending, []
                logged = tuple(zip([step for step, *_ in batch],
                                   _log(s, batch, norm if log_now else None,
                                        s.validation_loss if validate_now and s.ranks.main else None)))
                last_loss = logged[-1][1]
            done = s.step - first_step
            rate = done / max(time.perf_counter() - started, 1e-9)
            callbacks.on_step(StepReport(s.step, t.steps, last_loss, lr, rate, (t.steps - s.step) / rate,
                                         s.metrics.smoothed_loss(), peak_memory_mb(s.device), logged,
                                         s.validation_loss if validate_now else None))
            if s.config.sample.every and s.step % s.config.sample.every == 0 and s.step < t.steps:
                sample(s, callbacks)
            if checkpoint_now and s.step < t.steps:
                save_checkpoint(s)   # rank 0 writes; a sharded run's ranks gather the state for it first
        return False
    finally:
        if batches is not None:
            batches.close()
        if pending:
            _log(s, pending, None)
        if profiler:
            profiler.stop()


def _log(s: Session, pending, norm, validation_loss: float | None = None) -> list[float]:
    """Write the metrics of the steps since the last log: one device sync per logging interval (the gradient norm
    and validation loss go on the last step's row). Returns their losses, in step order."""
    losses = distributed.sum_over_ranks(s.ranks, torch.stack([loss for _, loss, _, _ in pending]).float())
    losses = losses.cpu().tolist()   # each rank's share of the loss, summed: the global batch's
    for (step, _, lr, seconds), loss in zip(pending, losses):
        last = step == pending[-1][0]
        extra = {"grad_norm": float(norm)} if last and norm is not None else {}
        if last and validation_loss is not None:
            extra["validation_loss"] = validation_loss
        memory = peak_memory_mb(s.device) if last else None
        if memory is not None:
            extra["memory_mb"] = memory
        s.metrics.record(step, loss=loss, lr=lr, step_time=seconds, **extra)
    s.losses.extend(losses)
    bad = next((step for (step, *_), v in zip(pending, losses) if not math.isfinite(v)), None)
    if bad is not None:
        raise TrainingDiverged(f"the loss became {losses[-1]} at step {bad} (lr {pending[-1][2]:.3g}): the LoRA "
                               "weights are no longer usable. Resume from an earlier checkpoint with a lower "
                               "train.lr, or use train.mixed_precision=bf16 instead of fp16")
    return losses


# ---------------------------------------------------------------------------------------------- the end
def cleanup(s: Session, *, release_model: bool) -> None:
    s.metrics.close()
    s.cache.close()
    if s.validator is not None:
        s.validator.close()
    if release_model:
        unswap_blocks(s.transformer, restore=False)
        release(s.transformer)
    else:
        hand_back(s.transformer)
    free_memory()


def train(config: Config, callbacks: Callbacks | None = None, *, encoders=None, transformer=None,
          resume=None) -> TrainingResult:
    """The whole run. Encoders and transformer load from config.model unless given (then they are not freed).
    `resume`: see setup (resume.py builds it from a checkpoint)."""
    callbacks = callbacks or Callbacks()
    if distributed.follower():
        callbacks = distributed.Follower(callbacks)   # torchrun's other ranks: rank 0 reports for all
    # A host may call this under no_grad or inference_mode (ComfyUI runs every node so): training needs autograd.
    # The host's random generators are left as they were.
    with torch.inference_mode(False), torch.enable_grad(), torch.random.fork_rng(
            devices=range(torch.cuda.device_count())):
        s = setup(config, callbacks, encoders, transformer, resume=resume)
        try:
            stopped = train_loop(s, callbacks)
            if stopped and s.step == s.start_step:   # stopped before the first step: nothing new to save
                return TrainingResult(s.run_dir, None, s.step, True, [], [], None)
            callbacks.on_phase("saving")
            lora_path, curves = write_outputs(s)   # checkpoint, LoRA (and its average), curves: outputs.py
            if not stopped:
                try:
                    sample(s, callbacks)
                except (RuntimeError, Flux2LoraError) as exc:  # the LoRA is saved: a failed sample loses nothing
                    log.warning("the final samples failed (%s); the LoRA is at %s", exc, lora_path)
        finally:
            cleanup(s, release_model=transformer is None)
            if s.ranks.many:
                distributed.leave()
    return TrainingResult(s.run_dir, lora_path, s.step, stopped, list(s.losses), list(s.samples), curves,
                          s.cache.summary.screened)
