"""The LoRA-wrapped transformer made ready to train as the config says: gradient checkpointing resolved (auto:
from the memory plan and the device's free memory), blocks swapped, blocks compiled, train mode, mixed precision.
Shared by the trainer and the GPU benchmark, so what the benchmark measures is what training runs. `hand_back`
undoes all of it for a transformer the caller lent."""

from __future__ import annotations

import logging

import torch

from ..errors import ConfigError
from .block_swap import swap_blocks, unswap_blocks
from .optimization import mixed_precision

log = logging.getLogger(__name__)


def _checkpointing(config, transformer, device, compute_dtype, images: int) -> bool:
    """train.gradient_checkpointing resolved for this model and device (memory_plan.resolve_checkpointing)."""
    from .memory_plan import free_memory_gib, resolve_checkpointing

    t = config.train
    on, why = resolve_checkpointing(t.gradient_checkpointing, dict(transformer.config),
                                    resolution=max(config.data.resolution), batch_size=t.batch_size,
                                    rank=config.lora.rank, optimizer=t.optimizer, targets=config.lora.targets,
                                    dtype_bytes=compute_dtype.itemsize, free_gib=free_memory_gib(device),
                                    images=images)
    log.info("%s", why)
    return on


def prepare_model(config, transformer, device, dtype, references: int = 0) -> tuple[torch.dtype | None, object]:
    """The LoRA-wrapped transformer made ready to train as `config` says (checkpointing resolved, blocks swapped,
    blocks compiled, train mode); returns (autocast dtype, grad scaler). The GPU benchmark runs this too, so what
    it measures is the trainer's own setting of the model. `references`: the most reference images a sample of
    an edit dataset has (each adds the target's token count to the step)."""
    t, swapped = config.train, config.model.blocks_to_swap
    if swapped and t.compile:   # compiled blocks would trace the swap hooks and recompile at every weight swap
        raise ConfigError([("model.blocks_to_swap", f"{swapped!r} cannot be combined with train.compile=true: "
                                                    "use one of them")])
    autocast_dtype, scaler = mixed_precision(device, dtype, t.mixed_precision)
    checkpointing = _checkpointing(config, transformer, device, autocast_dtype or dtype, 1 + references)
    if checkpointing or swapped:
        if not checkpointing:   # backward must re-run each swapped block to bring its weights back
            log.info("model.blocks_to_swap=%d turns train.gradient_checkpointing on", swapped)
        transformer.enable_gradient_checkpointing()
    swap_blocks(transformer, swapped, device)   # checks the count against the model's blocks; 0: nothing
    if t.compile:
        for block in [*transformer.transformer_blocks, *transformer.single_transformer_blocks]:
            block.compile()
    transformer.train()
    return autocast_dtype, scaler


def hand_back(transformer) -> None:
    """A transformer the caller gave us goes back as it came: no adapter, no checkpointing, no swapped blocks,
    no compiled blocks, eval mode. Compiled blocks left behind would keep graphs traced over the LoRA wrappers
    that unload_lora removes: ComfyUI's sampler, or the next run, would call code guarding on modules gone."""
    unswap_blocks(transformer, restore=True)
    for block in [*transformer.transformer_blocks, *transformer.single_transformer_blocks]:
        vars(block).pop("_compiled_call_impl", None)   # what Module.compile() set; torch has no public undo
    if getattr(transformer, "peft_config", None):
        transformer.unload_lora()   # removes peft's wrapper layers too: the original modules and state-dict keys
    transformer.disable_gradient_checkpointing()
    transformer.eval()
