"""A test-only ComfyUI custom node pack: stock-like loaders for the tiny FLUX.2 text encoders and VAE.

ComfyUI's CLIPLoader and VAELoader size a model from its real widths and cannot load the tiny test models, so the
real-server tests that run a whole template (training, then generation with the trained LoRA) swap those two stock
nodes for these. They build the models exactly as tests/integration/comfyui_fidelity.py does for the fidelity
checks (ComfyUI's own classes, with the size overrides ComfyUI accepts), so both tests load the tiny files one
way. The conftest installs this folder into the test server's custom_nodes beside the pack; the pack itself never
needs it, and a user's ComfyUI never has it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import folder_paths

_spec = importlib.util.spec_from_file_location("flux2_lora_comfyui_fidelity",
                                               Path(__file__).resolve().parents[1] / "comfyui_fidelity.py")
fidelity = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fidelity)


def _variant(path: str) -> str:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return (f.metadata() or {}).get("flux2_lora.variant", "")


class TinyFlux2CLIPLoader:
    """CLIPLoader for a tiny FLUX.2 text encoder; [klein] takes its tiny tokenizer folder from models/."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip_name": (folder_paths.get_filename_list("text_encoders"),),
                             "tokenizer": ("STRING", {"default": "tokenizer"})}}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, clip_name, tokenizer):
        path = folder_paths.get_full_path_or_raise("text_encoders", clip_name)
        job = {"text_encoder": path, "tokenizer": str(Path(folder_paths.models_dir) / tokenizer)}
        variant = _variant(path)
        if variant not in ("klein", "dev"):
            raise ValueError(f"{clip_name} is no tiny FLUX.2 text encoder (variant {variant!r})")
        return ((fidelity.klein_clip if variant == "klein" else fidelity.dev_clip)(job, []),)


class TinyFlux2VAELoader:
    """VAELoader for the tiny FLUX.2 VAE."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vae_name": (folder_paths.get_filename_list("vae"),)}}

    RETURN_TYPES = ("VAE",)
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, vae_name):
        return (fidelity.tiny_vae(folder_paths.get_full_path_or_raise("vae", vae_name), []),)


NODE_CLASS_MAPPINGS = {"TinyFlux2CLIPLoader": TinyFlux2CLIPLoader, "TinyFlux2VAELoader": TinyFlux2VAELoader}
__all__ = ["NODE_CLASS_MAPPINGS"]
