"""Configure LoRA's widgets: each one's config key, its tooltip, and how a preset fills them in.

Widget names are the config keys; a `lora_` / `sample_` / `checkpoint_` prefix names the section where the key
alone would be ambiguous (`sample_steps` is sample.steps, `steps` is train.steps), so an error about `sample.steps`
points at one widget. One exception: `validation_folder` is data.validation_path (a folder picked like Load
Dataset's); it and `init_from` are resolved into ComfyUI's folders by `sections`. The widgets added after the first seventeen are optional inputs with the engine's defaults:
graphs saved before them, and API prompts that leave them out, keep working and train as before.

Presets (the CLI's --preset, config.PRESETS): a widget still at its default takes the preset's value; a widget the
user changed keeps the user's value. A widget cannot tell "left at the default" from "set to the default": to use a
default value the preset changes, pick preset "none". data.flip, which the presets also set, is Cache Latents'
`flip` widget.
"""

from __future__ import annotations

from comfy_api.latest import io

from ..flux2_lora_core.config import PRESETS, SCHEDULES
from .folders import NEW_LORA, dataset_folder, lora_choices, lora_to_continue

# widget -> config key
KEYS = {
    "rank": "lora.rank", "alpha": "lora.alpha", "targets": "lora.targets", "optimizer": "train.optimizer",
    "lr": "train.lr", "lr_scheduler": "train.lr_scheduler", "warmup_steps": "train.warmup_steps",
    "steps": "train.steps", "batch_size": "train.batch_size", "gradient_accumulation": "train.gradient_accumulation",
    "timestep_sampling": "train.timestep_sampling", "caption_dropout": "train.caption_dropout",
    "gradient_checkpointing": "train.gradient_checkpointing", "seed": "train.seed", "sample_every": "sample.every",
    "sample_prompts": "sample.prompts", "checkpoint_every": "checkpoint.every",
    "sample_steps": "sample.steps", "sample_at_start": "sample.at_start", "sample_resolution": "sample.resolution",
    "sample_guidance": "sample.guidance", "sample_seed": "sample.seed", "lora_dropout": "lora.dropout",
    "checkpoint_keep": "checkpoint.keep", "mixed_precision": "train.mixed_precision",
    "timestep_shift": "train.timestep_shift", "logit_mean": "train.logit_mean", "logit_std": "train.logit_std",
    "loss_weighting": "train.loss_weighting", "max_grad_norm": "train.max_grad_norm",
    "weight_decay": "train.weight_decay", "guidance": "train.guidance", "compile": "train.compile",
    "init_from": "lora.init_from", "ema_decay": "train.ema_decay", "validation_split": "data.validation_split",
    "validate_every": "train.validate_every", "lora_type": "lora.type", "validation_folder": "data.validation_path",
}
PRESET_NAMES = ["none", *PRESETS]


def inputs() -> list:
    """The widgets, in the order saved workflows store their values (new ones only ever appended)."""
    return [
        io.Int.Input("rank", default=16, min=1, max=256, tooltip="lora.rank: the LoRA's capacity (and file size). 16 for a character or object, 32-64 for a style; 4-8 for small, quick LoRAs."),
        io.Float.Input("alpha", default=16.0, min=0.01, max=1024.0, step=0.5, tooltip="lora.alpha: updates are scaled by alpha / rank. Usually equal to rank (scale 1); half the rank halves the effective learning rate."),
        io.String.Input("targets", default="attention_mlp", tooltip="lora.targets: which layers get a LoRA. attention_mlp (default: attention and feed-forward), attention (smaller, weaker), module names 'to_q,to_k', or 'regex:<pattern>'."),
        io.Combo.Input("optimizer", options=["adamw", "adamw8bit", "sgd"], default="adamw", tooltip="train.optimizer: adamw (default); adamw8bit saves optimizer memory (needs bitsandbytes); sgd rarely."),
        io.Float.Input("lr", default=1e-4, min=1e-7, max=1.0, step=1e-5, round=False, tooltip="train.lr: peak learning rate. 1e-4 is the usual FLUX LoRA value; 5e-5 for slower, safer runs; above 4e-4 often breaks the model."),
        io.Combo.Input("lr_scheduler", options=list(SCHEDULES), default="constant", tooltip="train.lr_scheduler: how the learning rate changes over the run. constant (default); cosine to settle at the end; *_with_warmup / linear / cosine use warmup_steps."),
        io.Int.Input("warmup_steps", default=0, min=0, max=100000, tooltip="train.warmup_steps: steps of linear warm-up from 0 to lr (not with 'constant': use constant_with_warmup). 0-100 typical."),
        io.Int.Input("steps", default=1000, min=1, max=1000000, tooltip="train.steps: optimizer steps. ~1000-1500 for a character, 2000+ for a style; about 100 x the number of images is a common start."),
        io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="train.batch_size: images per forward pass (one aspect bucket per batch). 1 on most GPUs; more needs more memory."),
        io.Int.Input("gradient_accumulation", default=1, min=1, max=256, tooltip="train.gradient_accumulation: forward passes per optimizer step: a larger effective batch without more memory. 1-4."),
        io.Combo.Input("timestep_sampling", options=["logit_normal", "uniform", "mode"], default="logit_normal", tooltip="train.timestep_sampling: which noise levels are trained. logit_normal (default) favours the middle; uniform trains all alike."),
        io.Float.Input("caption_dropout", default=0.0, min=0.0, max=0.99, step=0.01, tooltip="train.caption_dropout: fraction of steps trained on the empty caption, so the LoRA also acts without its trigger. 0-0.1; 0.05 typical."),
        io.Combo.Input("gradient_checkpointing", options=["auto", "true", "false"], default="auto", tooltip="train.gradient_checkpointing: much less GPU memory for 1.4-2x the step time (klein-4B at 1024 px: ~23 GiB off, ~9 GiB on). auto (the CLI's default too): on only where the step would not fit the GPU's free memory without it, as this node's memory note predicts; the run's log says which it chose."),
        io.Int.Input("seed", default=42, min=0, max=2**31 - 1, control_after_generate=False, tooltip="train.seed: LoRA init, data order, noise and timesteps. Same seed and settings, same run."),
        io.Int.Input("sample_every", default=0, min=0, max=1000000, tooltip="sample.every: sample images every N steps (written to the run's samples/ folder). 0: only after training. 250-500 typical."),
        io.String.Input("sample_prompts", default="", multiline=True, tooltip="sample.prompts: one prompt per line; empty: the first two training captions."),
        io.Int.Input("checkpoint_every", default=500, min=0, max=1000000, tooltip="checkpoint.every: a resumable checkpoint every N steps (and always at the end). 0: only at the end."),
        io.Combo.Input("preset", options=PRESET_NAMES, default="none", optional=True, tooltip="Starting values for a kind of LoRA (the CLI's --preset): character (rank 16, 1500 steps, caption dropout 0.05), style (rank 32, 2000 steps, 0.1), concept (rank 16, 1200 steps, 0.05). A widget still at its default takes the preset's value; one you changed keeps yours. The presets' flips are Cache Latents' `flip`."),
        io.Int.Input("sample_steps", default=20, min=0, max=200, optional=True, tooltip="sample.steps: denoising steps per sample image. 20-30 for [dev] and [klein] base. 0: no samples at all (sample_every and sample_at_start are ignored): the fastest run on a slow machine."),
        io.Boolean.Input("sample_at_start", default=False, optional=True, tooltip="sample.at_start: also sample before the first step, to compare against the base model."),
        io.Int.Input("sample_resolution", default=0, min=0, max=4096, step=16, optional=True, tooltip="sample.resolution: sample side in pixels (a multiple of 16); 0: the last training resolution. 512-1024 typical."),
        io.Float.Input("sample_guidance", default=4.0, min=0.0, max=30.0, step=0.1, optional=True, tooltip="sample.guidance: guidance scale of the sample images ([klein] base: classifier-free, ~4; [dev]: embedded, ~4)."),
        io.Int.Input("sample_seed", default=0, min=0, max=2**31 - 1, control_after_generate=False, optional=True, advanced=True, tooltip="sample.seed: noise seed of the samples, the same at every sampling step so they compare."),
        io.Float.Input("lora_dropout", default=0.0, min=0.0, max=0.5, step=0.01, optional=True, tooltip="lora.dropout: dropout on the LoRA's input, against overfitting small datasets. 0 (default) to 0.1."),
        io.Int.Input("checkpoint_keep", default=3, min=0, max=1000, optional=True, tooltip="checkpoint.keep: newest checkpoints kept (plus the best-loss one); older ones are deleted. 0: keep all. 2-5 typical."),
        io.Combo.Input("mixed_precision", options=["auto", "bf16", "fp16", "no"], default="auto", optional=True, advanced=True, tooltip="train.mixed_precision: compute precision. auto: bf16 where the GPU supports it, else off; fp16 for older GPUs (with loss scaling); no: full precision (slow, most memory)."),
        io.Combo.Input("timestep_shift", options=["linear", "empirical", "none"], default="linear", optional=True, advanced=True, tooltip="train.timestep_shift: shift of the trained noise levels towards noise at high resolution. linear (default, FLUX.1's rule); empirical (the FLUX.2 pipelines' inference shift, much stronger); none (diffusers' script)."),
        io.Float.Input("logit_mean", default=0.0, min=-3.0, max=3.0, step=0.1, optional=True, advanced=True, tooltip="train.logit_mean: centre of logit_normal timestep sampling; above 0 trains more on high noise (composition), below on low noise (detail). 0 default."),
        io.Float.Input("logit_std", default=1.0, min=0.1, max=3.0, step=0.1, optional=True, advanced=True, tooltip="train.logit_std: spread of logit_normal timestep sampling. 1.0 default."),
        io.Combo.Input("loss_weighting", options=["none", "sigma_sqrt", "cosmap"], default="none", optional=True, advanced=True, tooltip="train.loss_weighting: per-noise-level loss weights (diffusers' SD3 options). none (default) for FLUX."),
        io.Float.Input("max_grad_norm", default=1.0, min=0.0, max=100.0, step=0.1, optional=True, advanced=True, tooltip="train.max_grad_norm: gradients are clipped to this norm; 0 turns clipping off. 1.0 default."),
        io.Float.Input("weight_decay", default=1e-4, min=0.0, max=1.0, step=1e-4, round=False, optional=True, advanced=True, tooltip="train.weight_decay: decoupled weight decay on the LoRA weights. 1e-4 default; 0-0.01."),
        io.Float.Input("guidance", default=3.5, min=0.0, max=30.0, step=0.1, optional=True, advanced=True, tooltip="train.guidance: [dev]'s guidance embedding while training (3.5, as diffusers' script); [klein] has none and ignores it."),
        io.Boolean.Input("compile", default=False, optional=True, advanced=True, tooltip="train.compile: torch.compile each transformer block: faster steps on a recent GPU after a few minutes of compiling. Off on CPU or Windows without a compiler."),
        io.Combo.Input("init_from", options=lora_choices(), default=NEW_LORA, optional=True, tooltip="lora.init_from: continue training a LoRA from models/loras (ComfyUI, diffusers or kohya keys; one this pack saved, or another trainer's). Its rank and alpha replace the widgets'; its layers start as trained. Its layers must be among `targets`."),
        io.Float.Input("ema_decay", default=0.0, min=0.0, max=0.9999, step=0.001, round=False, optional=True, advanced=True, tooltip="train.ema_decay: also keep a moving average of the LoRA weights (0.99-0.999), often smoother than the last step; Save LoRA's `weights` picks it. 0: off."),
        io.Float.Input("validation_split", default=0.0, min=0.0, max=0.5, step=0.01, optional=True, tooltip="data.validation_split: fraction of the images held out of training; their loss at fixed noise is measured every validate_every steps, drawn in red on the live chart, and picks the best checkpoint. 0.1-0.2 with 20+ images; 0: off."),
        io.Int.Input("validate_every", default=100, min=1, max=1000000, optional=True, tooltip="train.validate_every: measure the held-out loss every N steps (and at each checkpoint and the end)."),
        io.Combo.Input("lora_type", options=["lora", "dora", "lokr", "loha"], default="lora", optional=True, advanced=True, tooltip="lora.type: lora (default); dora: a trained magnitude per output row as well (weight-decomposed LoRA), often closer to full fine-tuning at the same rank; lokr / loha: LyCORIS's Kronecker / Hadamard-product adapters. Each is saved in keys ComfyUI's LoRA loader reads; dora, lokr and loha need a bf16/fp32 base (no quantization)."),
        io.String.Input("validation_folder", default="", optional=True, tooltip="data.validation_path: a folder of held-out images with captions in ComfyUI's input directory (like Load Dataset's folder), scored every validate_every steps instead of validation_split. Empty: none."),
    ]


def sections(widgets: dict, defaults: dict) -> dict:
    """{section: {key: value}} for the config, from the widgets' values (`defaults` fills those a prompt left out),
    the preset applied to the widgets still at their default (see the module doc); init_from and
    validation_folder resolved to paths inside models/loras and the dataset folders (refused outside them)."""
    values = {**defaults, **widgets}
    preset = PRESETS.get(values.pop("preset", "none"), {})
    widget_of = {key: widget for widget, key in KEYS.items()}
    for key, value in ((f"{s}.{k}", v) for s, keys in preset.items() for k, v in keys.items()):
        if key in widget_of and values[widget_of[key]] == defaults[widget_of[key]]:
            values[widget_of[key]] = value
    values["sample_prompts"] = [p for p in values["sample_prompts"].splitlines() if p.strip()]
    result: dict = {}
    for widget, key in KEYS.items():
        section, name = key.split(".")
        result.setdefault(section, {})[name] = values[widget]
    result["lora"]["init_from"] = lora_to_continue(result["lora"]["init_from"])   # a name in models/loras
    held = result["data"]["validation_path"].strip()
    result["data"]["validation_path"] = dataset_folder(held, "validation_folder") if held else ""   # input/ only
    return result
