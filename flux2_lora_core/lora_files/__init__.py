"""LoRA files: ComfyUI-native (the default; loads in diffusers too), diffusers and kohya keys, with the metadata
LoRA managers read. Above models/ (it follows the single-file key renames), below training."""

from ..exports import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "export": ("export_lora", "lora_metadata", "lora_state_dict", "read_lora", "save_lora", "to_format"),
})
