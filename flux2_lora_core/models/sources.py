"""Where each FLUX.2 component lives, resolved before anything loads.

A run names the model once (`model.path`: a diffusers folder, or a ComfyUI transformer file) and the
other parts only where they cannot be found from it. Resolving all four locations up front reports
every missing part at once, by the config key that fixes it, instead of failing one load at a time
minutes apart.

The tokenizer is the part users least know where to find, so when none is named it is looked for, most
certain first: inside the text-encoder file (ComfyUI's [dev] Mistral files carry tekken.json as `tekken_model`),
beside the text encoder (a transformers folder's own files, a pipeline's tokenizer/ folder, tokenizer files next
to a single file), and, when this process is ComfyUI, the Qwen tokenizer ComfyUI itself uses for [klein]
(comfy/text_encoders/qwen25_tokenizer). ComfyUI is recognised by its `comfy` package being imported already;
the engine never imports it.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelError
from .files import identify, is_pipeline, read_header

EMBEDDED_TOKENIZERS = ("tekken_model",)  # entries of text-encoder files that hold their tokenizer
COMFYUI_QWEN_TOKENIZER = ("text_encoders", "qwen25_tokenizer")  # under comfy/: what ComfyUI tokenizes Qwen3 with


@dataclass(frozen=True)
class ModelSources:
    """Where each component lives: a diffusers folder (pipeline or component) or a single file."""

    transformer: Path
    vae: Path
    text_encoder: Path
    tokenizer: Path


def _holds_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()


def tokenizer_beside(text_encoder: Path | None) -> Path | None:
    """The tokenizer that belongs to a text encoder: a folder's own files (HF model folders), else a tokenizer/
    folder next to it (pipeline folders); for a single file, tokenizer files in the folder that holds it."""
    if text_encoder is None or not text_encoder.exists():
        return None
    if text_encoder.is_file():
        return text_encoder.parent if _holds_tokenizer(text_encoder.parent) else None
    if _holds_tokenizer(text_encoder):
        return text_encoder
    return text_encoder.parent / "tokenizer" if (text_encoder.parent / "tokenizer").is_dir() else None


def embeds_tokenizer(text_encoder: Path | None) -> bool:
    """Whether a text-encoder single file carries its own tokenizer (ComfyUI's [dev] files: `tekken_model`)."""
    if text_encoder is None or not text_encoder.is_file():
        return False
    try:
        shapes = read_header(text_encoder, key="model.text_encoder").shapes
    except ModelError:  # not safetensors: the loader reports that, with its fix
        return False
    return any(key in shapes for key in EMBEDDED_TOKENIZERS)


def comfyui_tokenizer_for(text_encoder: Path | None) -> Path | None:
    """ComfyUI's bundled Qwen tokenizer when this process is ComfyUI and `text_encoder` is a Qwen3 ([klein]) one.

    ComfyUI ships no tokenizer with its qwen_3_*.safetensors files: it tokenizes them with its own
    comfy/text_encoders/qwen25_tokenizer (same vocabulary and special tokens as Qwen3's). Found through the
    already imported `comfy` package (a namespace package: its folders are in `__path__`).
    """
    comfy = sys.modules.get("comfy")
    if comfy is None or text_encoder is None or not _is_qwen3(text_encoder):
        return None
    for root in getattr(comfy, "__path__", None) or []:
        folder = Path(root).joinpath(*COMFYUI_QWEN_TOKENIZER)
        if (folder / "tokenizer_config.json").is_file():
            return folder
    return None


def _is_qwen3(text_encoder: Path) -> bool:
    try:
        if text_encoder.is_file():
            return identify(read_header(text_encoder, key="model.text_encoder").shapes)[0] == "qwen3"
        config = text_encoder / "config.json"
        return config.is_file() and json.loads(config.read_text(encoding="utf-8")).get("model_type") == "qwen3"
    except (ModelError, OSError, ValueError):  # unreadable: the loader reports it, with its fix
        return False


def locate_tokenizer(text_encoder: Path | None, pipeline: Path | None = None) -> Path | None:
    """Where the tokenizer of `text_encoder` is when none was named, most certain first (see the module
    docstring): the text-encoder file itself, a tokenizer beside it, the pipeline's tokenizer/ folder,
    ComfyUI's bundled Qwen tokenizer. None when there is none."""
    if embeds_tokenizer(text_encoder):
        return text_encoder
    beside = tokenizer_beside(text_encoder)
    if beside is not None:
        return beside
    if pipeline is not None and (pipeline / "tokenizer").is_dir():
        return pipeline / "tokenizer"
    return comfyui_tokenizer_for(text_encoder)


def missing_tokenizer_hint(text_encoder: Path | None) -> str:
    """What to do when `locate_tokenizer` found nothing (the end of an error message)."""
    hint = ("set model.tokenizer to the tokenizer folder (tokenizer.json / tokenizer_config.json) of this text "
            "encoder")
    if text_encoder is not None and text_encoder.is_file() and _is_qwen3(text_encoder):
        hint += (", e.g. ComfyUI's comfy/text_encoders/qwen25_tokenizer (used automatically when training runs "
                 "inside ComfyUI)")
    return hint


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
        if part == "tokenizer" and "text_encoder" in found:
            located = locate_tokenizer(found["text_encoder"], pipeline)
            if located is not None:
                found[part] = located
            else:
                problems.append(("model.tokenizer", f"not set, and none was found inside or beside "
                                                    f"{str(found['text_encoder'])!r}: "
                                                    f"{missing_tokenizer_hint(found['text_encoder'])}"))
            continue
        if pipeline is not None and (pipeline / part).is_dir():
            found[part] = pipeline / part
        else:
            where = (f"{str(pipeline)!r} has no {part}/ folder" if pipeline else
                     "model.path gives only the transformer" if "transformer" in found else "model.path is unusable")
            problems.append((f"model.{part}", f"not set and {where}: set it to {hints[part]}"))
    if problems:
        raise ModelError("cannot locate the model:\n  " + "\n  ".join(f"{k}: {m}" for k, m in problems))
    return ModelSources(**found)
