"""The FLUX.2 LoRA training engine.

This package is the part of the pack that runs without ComfyUI: the CLI, the library API and the
ComfyUI nodes all call into it. Its subpackages are the pipeline's stages (data, models, cache,
training, checkpoints, lora_files; README's Layout says what each owns and how imports run). It
must never import ComfyUI modules (`comfy`, `comfy_api`, `folder_paths`, `server`), and importing
it must stay cheap: heavy libraries (torch, diffusers, transformers) are imported by the modules
that need them, not here.
"""

__version__ = "0.1.0"
