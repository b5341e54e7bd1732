"""FLUX.2 models from the files users have: variants and the shipped configs, diffusers folders and ComfyUI/BFL
single files, quantized weights, tokenizers, devices and dtypes, and the tiny random-weight models for tests.
The bottom stage: imports nothing of the others."""

from ..exports import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "devices": ("choose_device", "choose_dtype", "free_memory", "peak_memory_mb", "release"),
    "encoder_memory": ("check_text_offload", "check_text_quantization", "remove_offload"),
    "gguf": ("read_transformer_header",),
    "loading": ("load_transformer", "load_vae", "probe_variant", "weights_fingerprint"),
    "text_encoder_loading": ("check_compatible", "load_text_encoder", "load_tokenizer"),
    "single_file": ("TRANSFORMER_RENAMES", "compile_template"),
    "sources": ("ModelSources", "locate_tokenizer", "resolve_sources"),
    "tiny_models": ("build_tiny_pipeline", "write_tiny_model"),
    "variants": ("FAMILIES", "SHIPPED", "TEXT_LAYERS", "Variant", "detect_variant", "judge_distilled", "shipped_config"),
})
