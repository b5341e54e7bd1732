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

from ..flux2_lora_core.config import Config, ModelConfig, config_from_dict
from ..flux2_lora_core.errors import ConfigError, Flux2LoraError
from . import lora_settings
from .dataset_nodes import CATEGORY
from .folders import (FROM_DIFFUSERS, cache_folder, inside_output, lora_file_name, model_choices, model_path, read_roots,
                      run_name, run_to_resume, runs_folder)
from .sockets import Cache, Dataset, LoraConfig, Model, Run, check_values, refuse_at_queue


class LoadTrainingModel(io.ComfyNode):
    """Pickers over ComfyUI's own model folders, so a user picks the files its FLUX.2 templates downloaded. ComfyUI
    checks a picked name against the list when the prompt is queued: a name from elsewhere never reaches `execute`
    (which confines the path again, for a value that came through a link)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        choices = model_choices()
        return io.Schema(
            node_id="Flux2LoraLoadTrainingModel",
            display_name="Load Training Model (FLUX.2 LoRA)",
            category=CATEGORY,
            description="The FLUX.2 files to train on: nothing is loaded until Cache Latents / Train need it.",
            inputs=[
                io.Combo.Input("path", options=choices["path"][0], default=choices["path"][1], tooltip="The FLUX.2 transformer: a file in models/diffusion_models (flux-2-klein-base-4b.safetensors for [klein] 4B, flux2_dev_fp8mixed.safetensors for [dev]) or a diffusers folder in models/diffusers (one with a model_index.json). Train the base model, not a distilled one."),
                io.Combo.Input("vae", options=choices["vae"][0], default=choices["vae"][1], tooltip=f"A file in models/vae: flux2-vae.safetensors (the same for [klein] and [dev]). '{FROM_DIFFUSERS}': the vae/ inside the diffusers folder `path` names."),
                io.Combo.Input("text_encoder", options=choices["text_encoder"][0], default=choices["text_encoder"][1], tooltip=f"A file in models/text_encoders: qwen_3_4b.safetensors for [klein] 4B, mistral_3_small_flux2_fp8.safetensors (or _bf16) for [dev]. '{FROM_DIFFUSERS}': the text_encoder/ inside the diffusers folder `path` names."),
                io.Combo.Input("variant", options=["auto", "flux2-dev", "flux2-klein-4b", "flux2-klein-9b"], default="auto", tooltip="Which FLUX.2 model the files are; auto reads it from the weights (leave it on auto)."),
                io.Combo.Input("dtype", options=["auto", "bf16", "fp16", "fp32"], default="auto", tooltip="Weight precision while training; auto: bf16 on a GPU that supports it, else fp32."),
                io.Combo.Input("text_conditioning", options=["comfyui", "diffusers"], default="comfyui", tooltip="Whose prompt encoding the LoRA is trained on; comfyui for LoRAs used in ComfyUI."),
                io.String.Input("tokenizer", default="", optional=True, advanced=True, tooltip="Usually empty: [klein] uses ComfyUI's own qwen25_tokenizer, [dev] the one inside its text-encoder file, a diffusers folder its own. Only for models that need another: a tokenizer folder in models/text_encoders or models/ (e.g. 'tokenizer' for models/tokenizer)."),
                io.Combo.Input("quantization", options=["none", "fp8", "nf4", "int8"], default="none", optional=True, tooltip="Store the frozen transformer blocks quantized while training, to fit big models: fp8 halves bf16's memory, int8 too (closer to bf16), nf4 quarters it (least exact). The LoRA still loads into the full-precision model. An fp8 or GGUF file stays as it is under none."),
                io.Int.Input("blocks_to_swap", default=0, min=0, max=64, optional=True, tooltip="model.blocks_to_swap: keep the last N transformer blocks in (pinned) system memory and copy each to the GPU just before it runs, overlapping the copy with compute. Less GPU memory, slower steps; turns gradient checkpointing on. This node's note shows the predicted peak for the value set here."),
                io.Combo.Input("text_encoder_quantization", options=["none", "fp8", "int8", "nf4"], default="none", optional=True, tooltip="model.text_encoder_quantization: store the text encoder quantized while captions are cached ([dev]'s 48 GB Mistral: ~24 GB in fp8/int8, ~13 GB in nf4). Captions are re-encoded when it changes. Where it still does not fit, caching runs it one layer at a time on the GPU by itself."),
            ],
            outputs=[Model.Output(display_name="model")],
        )

    @classmethod
    def validate_inputs(cls, tokenizer=None):
        # Only the free-text input: naming path/vae/text_encoder here would turn off ComfyUI's own list check.
        return refuse_at_queue(cls, paths=[(partial(model_path, "tokenizer"), tokenizer)])

    @classmethod
    def execute(cls, path, vae, text_encoder, variant, dtype, text_conditioning, tokenizer="",
                quantization="none", blocks_to_swap=0, text_encoder_quantization="none") -> io.NodeOutput:
        from ..flux2_lora_core.training import gpu_memory_gib, model_note

        files = dict(path=path, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)
        model = ModelConfig(**{key: model_path(key, "" if text == FROM_DIFFUSERS else text)
                               for key, text in files.items()}, variant=variant, dtype=dtype,
                            text_conditioning=text_conditioning, quantization=quantization,
                            blocks_to_swap=blocks_to_swap, text_encoder_quantization=text_encoder_quantization)
        return io.NodeOutput(model, ui=ui.PreviewText(model_note(model, vram_gib=gpu_memory_gib())))


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
            references=dataset.references,
            resolution=resolution, buckets=buckets, max_aspect=max_aspect, flip=flip, confine_to=list(read_roots())))
        free_comfy_memory()
        with ComfyProgress("cache") as progress:
            progress.on_phase("caching")
            cache, _ = cache_for_config(config, progress=progress.on_progress)
            summary = progress.finish("done", cache.summary.format_text(), **cache_counts(cache.summary))
        return io.NodeOutput(config, ui=ui.PreviewText(summary))


class ConfigureLora(io.ComfyNode):
    """Every setting a user tunes; lora_settings.py maps each widget to its config key and applies the preset."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Flux2LoraConfigureLora",
            display_name="Configure LoRA (FLUX.2 LoRA)",
            category=CATEGORY,
            description="Every training setting in one place; the names are the CLI's keys (lora.rank, train.lr, sample_steps is sample.steps, ...). A preset fills in the widgets left at their defaults.",
            inputs=lora_settings.inputs(),
            outputs=[LoraConfig.Output(display_name="lora_config")],
        )

    @classmethod
    def execute(cls, **widgets) -> io.NodeOutput:
        defaults = {i.id: i.default for i in cls.define_schema().inputs}
        sections = lora_settings.sections(widgets, defaults)
        config_from_dict(sections)  # every bad value reported now, by its key (the widget's name)
        from ..flux2_lora_core.training import settings_summary

        train = sections["train"]
        return io.NodeOutput(sections, ui=ui.PreviewText(settings_summary(
            rank=sections["lora"]["rank"], batch_size=train["batch_size"], optimizer=train["optimizer"],
            checkpointing=train["gradient_checkpointing"])))


class Train(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Flux2LoraTrain",
            display_name="Train (FLUX.2 LoRA)",
            category=CATEGORY,
            description="Trains the LoRA. 'Stop and save' (on the node) finishes the step, writes a resumable checkpoint and returns the LoRA so far; Cancel does the same but ends the prompt. The LoRA output goes straight into 'Load LoRA Model'.",
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
        from .progress import ComfyProgress

        check_values(cache=cache, lora_config=lora_config)
        with ComfyProgress("train") as progress:
            result = run_training(cache, lora_config, name, resume, progress)
            summary = progress.finish_training(result)   # after Cancel: says so, then raises (checkpoint written)
        return io.NodeOutput(load_file(result.lora_path), {"loss": run_losses(result.run_dir)},
                             {"run": str(result.run_dir), "lora": str(result.lora_path)}, ui=ui.PreviewText(summary))


def run_training(cache: Config, lora_config: dict, name: str, resume: str, progress):
    """The engine's `train` (or `resume`) for Train's sockets: the same run folder, checkpoints and resume as the
    CLI. On resume the run's own config is the base; what this graph sets wins, each change logged."""
    from ..flux2_lora_core.resume import resume as resume_run
    from ..flux2_lora_core.training import train

    config = cache.replace(output={"dir": runs_folder(), "name": run_name(name)}, **lora_config)
    run = run_to_resume(resume) if resume.strip() else None
    free_comfy_memory()
    if run:
        graph = {k: v for k, v in cache.to_dict().items() if k in ("model", "data", "cache")}
        for section, values in lora_config.items():   # Configure LoRA sets some data.* keys too: merged, not replaced
            graph[section] = {**graph.get(section, {}), **values}
        updates = {f"{s}.{k}": v for s, values in graph.items() for k, v in values.items()}
        return resume_run(run, updates=updates, callbacks=progress)
    return train(config, progress)


def cache_counts(summary) -> dict:
    """Cache Latents' summary as numbers for the browser."""
    return {"images_encoded": summary.images_encoded, "images_reused": summary.images_reused,
            "captions_encoded": summary.captions_encoded, "captions_reused": summary.captions_reused,
            "mib_on_disk": round(summary.bytes_on_disk / 2**20, 2), "skipped": len(summary.skipped) + summary.screened_out}


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
            inputs=[Run.Input("run"), io.String.Input("filename", default="flux2_lora"),
                    io.Combo.Input("weights", options=WEIGHTS, default="final", optional=True, tooltip="final: the weights of the last step; moving average: the run's average of its last steps (Configure LoRA's ema_decay must have been on).")],
            outputs=[io.String.Output(display_name="path")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, input_types, run=None, filename=None, weights=None):
        return refuse_at_queue(cls, input_types, dict(run=run), [(lora_file_name, filename)])

    @classmethod
    def execute(cls, run, filename, weights="final") -> io.NodeOutput:
        check_values(run=run)
        path = save_to_loras(run_lora_file(run, weights), filename)
        return io.NodeOutput(str(path), ui=ui.PreviewText(f"saved as {path.name}: Load LoRA lists it under that name"))


WEIGHTS = ["final", "moving average"]   # Save LoRA's choice: the run's LoRA, or its average (training.ema_lora_path)


def run_lora_file(run: dict, weights: str) -> Path:
    """The run's LoRA file for Save LoRA's `weights`, inside ComfyUI's output directory."""
    from ..flux2_lora_core.training import ema_lora_path

    lora = Path(inside_output(run["lora"], "run"))
    path = lora if weights == "final" else ema_lora_path(lora)
    if not path.is_file() and weights != "final":
        raise ConfigError([("weights", f"the run {lora.parent.parent.name} kept no moving average: set ema_decay on "
                                       "Configure LoRA (e.g. 0.999) and train again, or save the final weights")])
    return path


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
