"""Load Dataset and Validate Dataset: the first two nodes of every training graph.

The FLUX2_DATASET socket carries the engine's `Dataset` (paths, caption sources and settings,
no pixels), so it is cheap for ComfyUI to cache and to pass along.
"""

from __future__ import annotations

from comfy_api.latest import io, ui

from ..flux2_lora_core.errors import DatasetError, Flux2LoraError
from .folders import dataset_folder, read_roots
from .sockets import Dataset, Model, check_values, refuse_at_queue

CATEGORY = "FLUX.2 LoRA"


class LoadDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Flux2LoraLoadDataset",
            display_name="Load Dataset (FLUX.2 LoRA)",
            category=CATEGORY,
            description="A folder of images with sidecar captions or a metadata.jsonl; kohya-style N_name folders repeat their images N times. For an edit LoRA, <name>_ref.png beside <name>.png and images in a references/ sub-folder are the reference images of their targets (the caption is the edit instruction); they are never trained on as targets.",
            inputs=[
                io.String.Input("folder", default="", placeholder="my_dataset (in ComfyUI/input)", tooltip="Dataset folder in ComfyUI's input directory; an absolute path only inside a folder the server's owner allowed (FLUX2_LORA_ALLOWED_ROOTS)."),
                io.String.Input("caption_extensions", default="txt", tooltip="Sidecar caption extensions, comma-separated, first match wins."),
                io.String.Input("trigger_word", default="", tooltip="Prepended to every caption ('trigger, caption')."),
                io.Int.Input("repeats", default=1, min=1, max=1000, tooltip="Times each image is seen per epoch (multiplies N_name folder repeats)."),
                io.Boolean.Input("recursive", default=True, tooltip="Also scan sub-folders."),
                io.Boolean.Input("references", default=True, optional=True, tooltip="Use reference images (<name>_ref.png, references/<name>.png, a metadata.jsonl \"references\" list) with their targets, to train an edit LoRA. Off: text-to-image on the targets only; reference images are still never trained on as targets."),
            ],
            outputs=[Dataset.Output(display_name="dataset")],
        )

    @classmethod
    def validate_inputs(cls, folder=None):
        return refuse_at_queue(cls, paths=[(dataset_folder, folder)])

    @classmethod
    def fingerprint_inputs(cls, folder, caption_extensions, trigger_word, repeats, recursive, references=True):
        # Re-run when files in the folder change, not only when the widgets do. Sizes and mtimes (plus
        # every caption) are enough to notice an edit and cost no image reads on each queue.
        try:
            dataset = cls._load(folder, caption_extensions, trigger_word, repeats, recursive, references)
            return dataset.fingerprint(content=False)
        except (Flux2LoraError, OSError):
            return float("nan")  # execute reports the problem

    @classmethod
    def execute(cls, folder, caption_extensions, trigger_word, repeats, recursive, references=True) -> io.NodeOutput:
        return io.NodeOutput(cls._load(folder, caption_extensions, trigger_word, repeats, recursive, references))

    @staticmethod
    def _load(folder, caption_extensions, trigger_word, repeats, recursive, references):
        from ..flux2_lora_core.data import load_dataset

        return load_dataset(dataset_folder(folder), caption_extensions=caption_extensions, trigger_word=trigger_word,
                            repeats=repeats, recursive=recursive, confine_to=read_roots(), references=references)


class ValidateDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Flux2LoraValidateDataset",
            display_name="Validate Dataset (FLUX.2 LoRA)",
            category=CATEGORY,
            description="Checks every image and caption at once. Files with errors are named and skipped (Cache Latents and Train skip the same ones); the graph stops with the full report when the dataset is unusable: too few good images left, an unreadable folder or metadata file, or any problem when strict.",
            inputs=[
                Dataset.Input("dataset"),
                io.Boolean.Input("strict", default=False, tooltip="Any problem, warnings included (missing captions, small images, duplicates), stops the graph instead of files with errors being skipped."),
                io.Int.Input("min_images", default=1, min=1, max=100000, tooltip="Fewest usable images once the files with errors are skipped."),
                io.Int.Input("resolution", default=1024, min=256, max=4096, step=64, tooltip="Training resolution, for bucket and cache-size statistics."),
                Model.Input("model", optional=True, tooltip="Optional, from Load Training Model: its tokenizer counts caption tokens exactly (else they are estimated), and its text_conditioning says what happens to tokens past 512."),
            ],
            outputs=[Dataset.Output(display_name="dataset"), io.String.Output(display_name="report")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, input_types, dataset=None, model=None):
        # `model` is optional: a literal is refused, nothing linked is fine.
        return refuse_at_queue(cls, input_types, dict(dataset=dataset, **({} if model is None else {"model": model})))

    @classmethod
    def execute(cls, dataset, strict, min_images, resolution, model=None) -> io.NodeOutput:
        from ..flux2_lora_core.cache import open_encoders
        from ..flux2_lora_core.data import validate_dataset

        check_values(dataset=dataset, **({} if model is None else {"model": model}))
        tokenizer = open_encoders(model).tokenizer() if model is not None else None
        report = validate_dataset(dataset, strict=strict, min_images=min_images, resolution=resolution,
                                  tokenizer=tokenizer, text_conditioning=getattr(model, "text_conditioning", "comfyui"))
        text = report.format_text()
        if not report.usable:
            raise DatasetError(f"the dataset is not usable for training:\n{text}")
        return io.NodeOutput(dataset, text, ui=ui.PreviewText(text))
