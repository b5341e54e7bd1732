"""Everything a run needs to continue exactly where it stopped, as tensors and JSON (never pickles).

A checkpoint holds the LoRA weights (peft names, fp32, exact), the optimizer state (its tensors in
safetensors, its settings in JSON), the learning-rate schedule, the fp16 loss scaler, the step, each
resolution's place in the data order, every random generator (python, numpy, torch CPU and CUDA, and
the run's own noise generator) and the recent metrics. Restoring all of them is what makes "k steps,
then resume k steps" give the same losses and the same LoRA as 2k steps straight.

It also carries the LoRA in ComfyUI-native form, so any checkpoint can be used like the final file.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch

from ..checkpoints import prune_checkpoints, write_checkpoint
from ..errors import CheckpointError
from .ema import ema_state, restore_ema
from .lora import comfyui_dora
from .sharding import full, is_sharded, shard_like, shard_optimizer_state

log = logging.getLogger(__name__)

STATE_FORMAT = 1


def _split(value, tensors: dict, prefix: str):
    """A nested state with tensors replaced by {"tensor": key}, the tensors collected into `tensors`."""
    if isinstance(value, torch.Tensor):
        value = full(value)   # a sharded optimizer state (sharding.py) is saved whole, on every rank
        tensors[prefix] = value.detach().to("cpu", copy=True).contiguous()
        return {"tensor": prefix}
    if isinstance(value, dict):
        return {str(k): _split(v, tensors, f"{prefix}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_split(v, tensors, f"{prefix}.{i}") for i, v in enumerate(value)]
    return value


def _join(value, tensors: dict):
    if isinstance(value, dict):
        if set(value) == {"tensor"}:
            return tensors[value["tensor"]]
        return {k: _join(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_join(v, tensors) for v in value]
    return value


def _rng_state(s) -> tuple[dict, dict]:
    tensors = {"torch_cpu": torch.get_rng_state(), "noise": s.generator.get_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda_{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(keys.astype(np.int64))
    return tensors, {"python": [version, list(mt), gauss], "numpy": [kind, pos, has_gauss, cached]}


def _restore_rng(s, tensors: dict, doc: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    s.generator.set_state(tensors["noise"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda_")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])
    version, mt, gauss = doc["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, pos, has_gauss, cached = doc["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))


def capture(s) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, object]]:
    """(tensors by file, documents by file) for write_checkpoint."""
    from ..lora_files import lora_state_dict

    optimizer_tensors: dict = {}
    optimizer = _split(s.optimizer.state_dict(), optimizer_tensors, "optimizer")
    rng_tensors, rng = _rng_state(s)
    state = {
        "format": STATE_FORMAT, "step": s.step, "total_steps": s.config.train.steps,
        "streams": {str(r): {"epoch": st.epoch, "position": st.position, "batch": st.batch_size}
                    for r, st in s.streams.items()},
        "optimizer": optimizer, "scheduler": s.scheduler.state_dict(),
        "scaler": s.scaler.state_dict() if s.scaler else None, "rng": rng,
        "smoothed_loss": s.metrics.smoothed_loss(), "validation_loss": s.validation_loss,
        "variant": s.variant.name, "lora_targets": s.targets,
        "dataset_fingerprint": s.cache.fingerprint, "base_model_fingerprint": s.base_fingerprint,
        "optimizer_class": type(s.optimizer).__name__, "ema_updates": s.ema.optimization_step if s.ema else None,
    }
    metrics = {key: s.metrics.recent(key) for key in ("loss", "lr", "step_time", "grad_norm")}
    tensors = {"adapter": lora_state_dict(s.transformer), "optimizer": optimizer_tensors, "rng": rng_tensors}
    if s.ema:
        tensors["ema"] = ema_state(s.ema)
    return tensors, {"state": state, "config": s.config.to_dict(), "metrics": metrics}


def restore(s, tensors: dict, documents: dict) -> None:
    """Put a captured state back into a freshly set-up session (same LoRA layout, same optimizer type).

    A checkpoint that does not fit (another model, other data, a damaged state) is a CheckpointError that
    says why, raised before anything of the session has changed.
    """
    state = documents.get("state") or {}
    if state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"checkpoint state format {state.get('format')!r} is not {STATE_FORMAT}: this version "
                              "cannot resume it")
    if state.get("variant") != s.variant.name:
        raise CheckpointError(f"the checkpoint was trained on {state.get('variant')!r}, this run loads "
                              f"{s.variant.name!r}: resume with the same model.path")
    if state.get("base_model_fingerprint") != s.base_fingerprint:  # e.g. the same model as fp8 instead of bf16
        log.warning("the base model's files differ from the checkpoint's (same variant, %s): continuing, but the "
                    "continuation is not exact", s.variant.name)
    try:
        _restore(s, tensors, state)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"the checkpoint's state does not fit this run ({type(exc).__name__}: {exc}): "
                              "resume an earlier checkpoint, or start a new run") from None


def _restore(s, tensors: dict, state: dict) -> None:
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    # Fresh copies made here, where autograd is on: tensors read under a host's inference_mode (ComfyUI reads
    # the checkpoint before training starts) could not be updated in place by the optimizer.
    tensors = {name: {key: t.clone() for key, t in group.items()} for name, group in tensors.items()}
    if state.get("dataset_fingerprint") != s.cache.fingerprint:
        raise CheckpointError("the dataset, its settings or the encoders changed since this checkpoint (cache "
                              f"fingerprint {str(state.get('dataset_fingerprint'))[:12]} then, "
                              f"{s.cache.fingerprint[:12]} now): resume with the same data, or start a new run")
    if state["optimizer_class"] != type(s.optimizer).__name__:
        raise CheckpointError(f"the checkpoint's optimizer is {state['optimizer_class']}, this run builds "
                              f"{type(s.optimizer).__name__}: keep train.optimizer as it was to resume")
    if is_sharded(s.transformer):   # the checkpoint's full tensors, cut as this run's ranks hold them
        like = get_peft_model_state_dict(s.transformer)
        tensors["adapter"] = {k: shard_like(v, like.get(k)) for k, v in tensors["adapter"].items()}
    result = set_peft_model_state_dict(s.transformer, tensors["adapter"])
    if getattr(result, "unexpected_keys", None):
        raise CheckpointError(f"the checkpoint's LoRA has layers this model lacks: {result.unexpected_keys[:3]}")
    optimizer = _join(state["optimizer"], tensors["optimizer"])
    optimizer["state"] = {int(k): v for k, v in optimizer["state"].items()}
    if is_sharded(s.transformer):
        optimizer = shard_optimizer_state(optimizer, s.optimizer)
    s.optimizer.load_state_dict(optimizer)
    s.scheduler.load_state_dict(state["scheduler"])
    if s.ema:
        restore_ema(s.ema, tensors.get("ema"), int(state.get("ema_updates") or 0))
    _apply_changed_settings(s)
    if s.scaler and state["scaler"]:
        s.scaler.load_state_dict(state["scaler"])
    for resolution, place in state["streams"].items():
        if int(resolution) in s.streams:
            stream = s.streams[int(resolution)]
            stream.seek(place["epoch"], _position(place, stream.batch_size, s.ranks.world))
    _restore_rng(s, tensors["rng"], state["rng"])
    s.step = int(state["step"])


def _position(place: dict, batch: int, world: int) -> int:
    """Where a resumed stream goes on in its epoch. The data position is (epoch, batches into it) of the global
    batch, train.batch_size x ranks: a run resumed on another number of ranks with the same global batch (e.g. 2
    ranks x 1 -> 1 x 2) continues exactly. With another global batch the epoch's batches are cut differently: it
    goes on as many samples into the epoch as it had seen, and is not exact."""
    saved = int(place.get("batch", batch))
    if saved == batch:
        return int(place["position"])
    log.warning("the checkpoint's global batch was %d samples, this run's is %d (train.batch_size x %d ranks): "
                "continuing at the same point of the epoch, but not exactly as the run would have gone on; set "
                "train.batch_size so that it times the ranks is %d to continue exactly", saved, batch, world, saved)
    return round(int(place["position"]) * saved / batch)


def _apply_changed_settings(s) -> None:
    """The optimizer's saved settings give way to the config's: a resume that changes train.lr or
    train.weight_decay trains with the new values (the schedule keeps its place, at the new peak)."""
    t = s.config.train
    s.scheduler.base_lrs = [t.lr for _ in s.optimizer.param_groups]
    for group, factor in zip(s.optimizer.param_groups, s.scheduler.lr_lambdas):
        group["initial_lr"], group["weight_decay"] = t.lr, t.weight_decay
        group["lr"] = t.lr * factor(s.scheduler.last_epoch)
    s.scheduler._last_lr = [group["lr"] for group in s.optimizer.param_groups]


def save_checkpoint(s) -> Path | None:
    """checkpoints/step_NNNNNN: written atomically and verified; older ones pruned (checkpoint.keep + best).
    Every rank calls it; rank 0 writes (a sharded run's ranks first gather the state together), the others
    return None."""
    from ..lora_files import lora_metadata, to_format

    if not s.ranks.main and not s.sharded:
        return None
    tensors, documents = capture(s)
    if not s.ranks.main:
        return None
    c = s.config
    comfyui = comfyui_dora(s.transformer, tensors["adapter"], c.lora.alpha / c.lora.rank)
    tensors[f"{c.output.name}-step{s.step}"] = to_format(comfyui, fmt="comfyui", rank=c.lora.rank, alpha=c.lora.alpha)
    documents["lora_metadata"] = lora_metadata(variant=s.variant.name, rank=c.lora.rank, alpha=c.lora.alpha,
                                               targets=s.targets, extra={"steps": s.step, "name": c.output.name})
    folder = write_checkpoint(s.run_dir / "checkpoints" / f"step_{s.step:06d}", tensors, documents)
    removed = prune_checkpoints(s.run_dir / "checkpoints", keep=c.checkpoint.keep, keep_best=True,
                                max_age_days=c.checkpoint.max_age_days, protect=folder)
    log.info("checkpoint %s%s", folder, f" (removed {', '.join(p.name for p in removed)})" if removed else "")
    return folder
