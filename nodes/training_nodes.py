"""Load Training Model, Cache Latents, Configure LoRA, Train and Save LoRA: the rest of a training graph.

Sockets carry the engine's config objects (small, picklable): FLUX2_MODEL is a `ModelConfig`, FLUX2_CACHE
the `Config` the cache was built for (model, data, cache), FLUX2_LORA_CONFIG the lora/train/sample/
checkpoint sections. Train joins them into one Config and calls the same `train` as the CLI, so a run
started here has the same run folder, checkpoints and `flux2-lora resume` as one started in a terminal.
Widget names are the config keys, so an error message names the widget to fix.
"""

from __future__ import annotations

import math
import os
import shutil
from functools import partial
from pathlib import Path

import folder_paths
from comfy import model_management
from comfy_api.latest import io, ui
from safetensors.torch import load_file

from ..flux2_lora_core.config import SCHEDULES, Config, ModelConfig, config_from_dict
from ..flux2_lora_core.errors import Flux2LoraError
from .dataset_nodes import CATEGORY
from .folders import (cache_folder, inside_output, lora_file_name, model_path, read_roots, run_name, run_to_resume,
                      runs_folder)
from .sockets import Cache, Dataset, LoraConfig, Model, Run, check_values, refuse_at_queue


class LoadTrainingModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Flux2LoraLoadTrainingModel",
            display_name="Load Training Model (FLUX.2 LoRA)",
            category=CATEGORY,
            description="The FLUX.2 files to train on: nothing is loaded until Cache Latents / Train need it.",
            inputs=[
                io.String.Input("path", default="", tooltip="Transformer file in models/diffusion_models (e.g. flux-2-klein-base-4b.safetensors), or a diffusers folder in models/diffusers."),
                io.String.Input("vae", default="", tooltip="File in models/vae (flux2-vae.safetensors); empty: the diffusers folder's."),
                io.String.Input("text_encoder", default="", tooltip="File in models/text_encoders (qwen_3_4b.safetensors for [klein]); empty: the diffusers folder's."),
                io.String.Input("tokenizer", default="", tooltip="Tokenizer folder in models/text_encoders or models/ (e.g. 'tokenizer' for models/tokenizer); empty: the one inside the text-encoder file ([dev]), beside it or in the diffusers folder, else ComfyUI's own qwen25_tokenizer ([klein])."),
                io.Combo.Input("variant", options=["auto", "flux2-dev", "flux2-klein-4b", "flux2-klein-9b"], default="auto"),
                io.Combo.Input("dtype", options=["auto", "bf16", "fp16", "fp32"], default="auto"),
                io.Combo.Input("text_conditioning", options=["comfyui", "diffusers"], default="comfyui", tooltip="Whose prompt encoding the LoRA is trained on; comfyui for LoRAs used in ComfyUI."),
            ],
            outputs=[Model.Output(display_name="model")],
        )

    @classmethod
    def validate_inputs(cls, path=None, vae=None, text_encoder=None, tokenizer=None):
        files = dict(path=path, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)
        return refuse_at_queue(cls, paths=[(partial(model_path, key), text) for key, text in files.items()])

    @classmethod
    def execute(cls, path, vae, text_encoder, tokenizer, variant, dtype, text_conditioning) -> io.NodeOutput:
        files = dict(path=path, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)
        return io.NodeOutput(ModelConfig(**{key: model_path(key, text) for key, text in files.items()},
                                         variant=variant, dtype=dtype, text_conditioning=text_conditioning))


class CacheLatents(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Flux2LoraCacheLatents",
            display_name="Cache Latents (FLUX.2 LoRA)",
            category=CATEGORY,
            description="Encodes every image and caption once and keeps them on disk: later runs reuse them and load no encoder.",
            inputs=[
                Dataset.Input("dataset"),
                Model.Input("model"),
                io.String.Input("resolution", default="1024", tooltip="A side in pixels, or a schedule '512,1024' (each is cached)."),
                io.Boolean.Input("buckets", default=True, tooltip="Aspect-ratio buckets; off: centre square crops."),
                io.Float.Input("max_aspect", default=4.0, min=1.0, max=8.0, step=0.1),
                io.Boolean.Input("flip", default=False, tooltip="Random horizontal flips (both orientations are cached)."),
                io.String.Input("cache_dir", default="", optional=True, tooltip="A name for the cache folder under output/flux2_lora/cache; empty: that folder itself."),
            ],
            outputs=[Cache.Output(display_name="cache")],
        )

    @classmethod
    def validate_inputs(cls, input_types, dataset=None, model=None, cache_dir=None):
        return refuse_at_queue(cls, input_types, dict(dataset=dataset, model=model), [(cache_folder, cache_dir)])

    @classmethod
    def execute(cls, dataset, model, resolution, buckets, max_aspect, flip, cache_dir="") -> io.NodeOutput:
        from ..flux2_lora_core.cache import cache_for_config
        from .progress import ComfyProgress

        check_values(dataset=dataset, model=model)
        config = Config(model=model).replace(cache={"dir": cache_folder(cache_dir)}, data=dict(
            path=str(dataset.root), caption_extensions=list(dataset.caption_extensions),
            trigger_word=dataset.trigger_word, repeats=dataset.repeats, recursive=dataset.recursive,
            resolution=resolution, buckets=buckets, max_aspect=max_aspect, flip=flip, confine_to=list(read_roots())))
        free_comfy_memory()
        cache, _ = cache_for_config(config, progress=ComfyProgress().on_progress)
        return io.NodeOutput(config, ui=ui.PreviewText(cache.summary.format_text()))


class ConfigureLora(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Flux2LoraConfigureLora",
            display_name="Configure LoRA (FLUX.2 LoRA)",
            category=CATEGORY,
            description="Every training setting in one place; the names are the CLI's keys (lora.rank, train.lr, ...).",
            inputs=[
                io.Int.Input("rank", default=16, min=1, max=256),
                io.Float.Input("alpha", default=16.0, min=0.01, max=1024.0, step=0.5),
                io.String.Input("targets", default="attention_mlp", tooltip="attention | attention_mlp | module names 'to_q,to_k' | 'regex:<pattern>'"),
                io.Combo.Input("optimizer", options=["adamw", "adamw8bit", "sgd"], default="adamw"),
                io.Float.Input("lr", default=1e-4, min=1e-7, max=1.0, step=1e-5, round=False),
                io.Combo.Input("lr_scheduler", options=list(SCHEDULES), default="constant"),
                io.Int.Input("warmup_steps", default=0, min=0, max=100000),
                io.Int.Input("steps", default=1000, min=1, max=1000000),
                io.Int.Input("batch_size", default=1, min=1, max=64),
                io.Int.Input("gradient_accumulation", default=1, min=1, max=256),
                io.Combo.Input("timestep_sampling", options=["logit_normal", "uniform", "mode"], default="logit_normal"),
                io.Float.Input("caption_dropout", default=0.0, min=0.0, max=0.99, step=0.01),
                io.Boolean.Input("gradient_checkpointing", default=True, tooltip="Much less memory for ~40% more time."),
                io.Int.Input("seed", default=42, min=0, max=2**31 - 1, control_after_generate=False),
                io.Int.Input("sample_every", default=0, min=0, max=1000000, tooltip="Sample images every N steps; 0: only after training."),
                io.String.Input("sample_prompts", default="", multiline=True, tooltip="One prompt per line; empty: the first two training captions."),
                io.Int.Input("checkpoint_every", default=500, min=0, max=1000000, tooltip="Resumable checkpoint every N steps (and always at the end)."),
            ],
            outputs=[LoraConfig.Output(display_name="lora_config")],
        )

    @classmethod
    def execute(cls, rank, alpha, targets, optimizer, lr, lr_scheduler, warmup_steps, steps, batch_size,
                gradient_accumulation, timestep_sampling, caption_dropout, gradient_checkpointing, seed, sample_every,
                sample_prompts, checkpoint_every) -> io.NodeOutput:
        sections = {"lora": dict(rank=rank, alpha=alpha, targets=targets),
                    "train": dict(optimizer=optimizer, lr=lr, lr_scheduler=lr_scheduler, warmup_steps=warmup_steps,
                                  steps=steps, batch_size=batch_size, gradient_accumulation=gradient_accumulation,
                                  timestep_sampling=timestep_sampling, caption_dropout=caption_dropout,
                                  gradient_checkpointing=gradient_checkpointing, seed=seed),
                    "sample": dict(every=sample_every, prompts=[p for p in sample_prompts.splitlines() if p.strip()]),
                    "checkpoint": dict(every=checkpoint_every)}
        config_from_dict(sections)  # every bad value reported now, by its widget's name
        return io.NodeOutput(sections)


class Train(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Flux2LoraTrain",
            display_name="Train (FLUX.2 LoRA)",
            category=CATEGORY,
            description="Trains the LoRA. Cancel finishes the step and writes a resumable checkpoint. The LoRA output goes straight into 'Load LoRA Model'.",
            inputs=[
                Cache.Input("cache"),
                LoraConfig.Input("lora_config"),
                io.String.Input("name", default="flux2_lora", tooltip="Run folder (output/flux2_lora/<name>) and LoRA file name."),
                io.String.Input("resume", default="", optional=True, tooltip="A run to continue: its name under output/flux2_lora (or one of its checkpoints, 'name/checkpoints/step_000500')."),
            ],
            outputs=[io.Custom("LORA_MODEL").Output(display_name="lora"), io.Custom("LOSS_MAP").Output(display_name="loss"),
                     Run.Output(display_name="run")],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, **inputs):
        return float("nan")  # a re-queued graph trains again rather than being served from ComfyUI's cache

    @classmethod
    def validate_inputs(cls, input_types, cache=None, lora_config=None, name=None, resume=None):
        return refuse_at_queue(cls, input_types, dict(cache=cache, lora_config=lora_config),
                               [(run_name, name), (run_to_resume, resume)])

    @classmethod
    def execute(cls, cache, lora_config, name, resume="") -> io.NodeOutput:
        from ..flux2_lora_core.resume import resume as resume_run
        from ..flux2_lora_core.training import train
        from .progress import ComfyProgress

        check_values(cache=cache, lora_config=lora_config)
        config = cache.replace(output={"dir": runs_folder(), "name": run_name(name)}, **lora_config)
        run, progress = run_to_resume(resume) if resume.strip() else None, ComfyProgress()
        free_comfy_memory()
        if run:  # the run's config; what this graph sets (its files and widgets) wins, each change logged
            graph = {**{k: v for k, v in cache.to_dict().items() if k in ("model", "data", "cache")}, **lora_config}
            updates = {f"{s}.{k}": v for s, values in graph.items() for k, v in values.items()}
            result = resume_run(run, updates=updates, callbacks=progress)
        else:
            result = train(config, progress)
        if result.stopped_early:
            raise model_management.InterruptProcessingException()   # after the checkpoint: resume continues it
        return io.NodeOutput(load_file(result.lora_path), {"loss": run_losses(result.run_dir)},
                             {"run": str(result.run_dir), "lora": str(result.lora_path)},
                             ui=ui.PreviewText(f"{result.steps} steps; LoRA {result.lora_path}"))


def run_losses(run_dir: Path) -> list[float]:
    """The whole run's losses (a resumed run's too) for Plot Loss Graph, which needs two points and divides by
    max - min: a flat list (one step, or a constant loss) gets its last value raised by one ulp, which no printed
    digit shows."""
    from ..flux2_lora_core.training import read_metrics

    losses = [r["loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if r.get("loss") is not None]
    losses = losses * 2 if len(losses) == 1 else losses
    if losses and min(losses) == max(losses):
        losses[-1] = math.nextafter(losses[-1], math.inf)
    return losses


def free_comfy_memory() -> None:
    """Models an image graph left loaded would otherwise share the GPU with training."""
    model_management.unload_all_models()
    model_management.soft_empty_cache()


class SaveLora(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Flux2LoraSaveLora",
            display_name="Save LoRA (FLUX.2 LoRA)",
            category=CATEGORY,
            description="Copies the run's LoRA (ComfyUI-native keys, with its metadata) into models/loras, where LoraLoader lists it at once. Never overwrites a file.",
            inputs=[Run.Input("run"), io.String.Input("filename", default="flux2_lora")],
            outputs=[io.String.Output(display_name="path")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, input_types, run=None, filename=None):
        return refuse_at_queue(cls, input_types, dict(run=run), [(lora_file_name, filename)])

    @classmethod
    def execute(cls, run, filename) -> io.NodeOutput:
        check_values(run=run)
        path = save_to_loras(Path(inside_output(run["lora"], "run")), filename)
        return io.NodeOutput(str(path), ui=ui.PreviewText(f"saved {path}"))


def save_to_loras(source: Path, filename: str) -> Path:
    """The run's LoRA copied under the first models/loras folder as <filename>.safetensors (or -2, -3...),
    complete before LoraLoader can see it (copied to a hidden name, then renamed)."""
    if not source.is_file():
        raise Flux2LoraError(f"{source} does not exist: train the run to the end (or resume it) first")
    stem = lora_file_name(filename)
    folder = Path(folder_paths.get_folder_paths("loras")[0])
    folder.mkdir(parents=True, exist_ok=True)
    target, n = folder / f"{stem}.safetensors", 1
    while target.exists():
        n += 1
        target = folder / f"{stem}-{n}.safetensors"
    partial = folder / f".{target.name}.partial"
    shutil.copyfile(source, partial)
    os.replace(partial, target)
    return target
