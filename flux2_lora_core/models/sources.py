"""Where each FLUX.2 component lives, resolved before anything loads.

A run names the model once (`model.path`: a diffusers folder, or a ComfyUI transformer file) and the
other parts only where they cannot be found from it. Resolving all four locations up front reports
every missing part at once, by the config key that fixes it, instead of failing one load at a time
minutes apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelError
from .files import is_pipeline


@dataclass(frozen=True)
class ModelSources:
    """Where each component lives: a diffusers folder (pipeline or component) or a single file."""

    transformer: Path
    vae: Path
    text_encoder: Path
    tokenizer: Path


def tokenizer_beside(text_encoder: Path | None) -> Path | None:
    """The tokenizer that belongs to a text-encoder folder: its own files (HF model folders), else a
    tokenizer/ folder next to it (pipeline folders)."""
    if text_encoder is None or not text_encoder.is_dir():
        return None
    if (text_encoder / "tokenizer.json").is_file() or (text_encoder / "tokenizer_config.json").is_file():
        return text_encoder
    return text_encoder.parent / "tokenizer" if (text_encoder.parent / "tokenizer").is_dir() else None


def resolve_sources(path="", *, vae="", text_encoder="", tokenizer="") -> ModelSources:
    """Each component's location: a pipeline folder provides all of them, explicit paths override.

    Every missing or nonexistent part is reported at once, by the config key that fixes it.
    """
    problems, found = [], {}
    pipeline = None
    root = Path(path) if str(path or "") else None
    if root is None:
        problems.append(("model.path", "not set: give a FLUX.2 diffusers folder or a transformer .safetensors file"))
    elif not root.exists():
        problems.append(("model.path", f"{str(root)!r} does not exist"))
    elif root.is_dir() and not (is_pipeline(root) or (root / "config.json").is_file()):
        problems.append(("model.path", f"{str(root)!r} is not a FLUX.2 folder: it has no model_index.json "
                                       f"(pipeline) or config.json (transformer folder)"))
    else:
        pipeline = root if is_pipeline(root) else root.parent if root.is_dir() and is_pipeline(root.parent) else None
        found["transformer"] = root / "transformer" if root == pipeline else root
    hints = {"vae": "the FLUX.2 VAE file (ComfyUI models/vae/flux2-vae.safetensors) or a vae/ folder",
             "text_encoder": "the text encoder file (ComfyUI models/text_encoders: qwen_3_*.safetensors for "
                             "[klein], mistral_3_small_flux2_*.safetensors for [dev]) or a text_encoder/ folder",
             "tokenizer": "a tokenizer folder (tokenizer.json / tokenizer_config.json) matching the text encoder"}
    for part, given in (("vae", vae), ("text_encoder", text_encoder), ("tokenizer", tokenizer)):
        if str(given or ""):
            if Path(given).exists():
                found[part] = Path(given)
            else:
                problems.append((f"model.{part}", f"{str(given)!r} does not exist"))
            continue
        beside = tokenizer_beside(found.get("text_encoder")) if part == "tokenizer" else None
        if beside is not None:
            found[part] = beside
        elif pipeline is not None and (pipeline / part).is_dir():
            found[part] = pipeline / part
        else:
            where = (f"{str(pipeline)!r} has no {part}/ folder" if pipeline else
                     "model.path gives only the transformer" if "transformer" in found else "model.path is unusable")
            problems.append((f"model.{part}", f"not set and {where}: set it to {hints[part]}"))
    if problems:
        raise ModelError("cannot locate the model:\n  " + "\n  ".join(f"{k}: {m}" for k, m in problems))
    return ModelSources(**found)
