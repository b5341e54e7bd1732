"""LoRA files: the trained adapter written in the layouts ComfyUI, diffusers and kohya tools load, and read back.

The canonical form is peft's: {"transformer_blocks.0.attn.to_q.lora_A.weight": (r, in), ".lora_B.weight":
(out, r), ...} plus (rank, alpha); the layer computes W x + (alpha / rank) B A x. The formats (FORMATS):

- "comfyui" (default): `diffusion_model.<BFL layer>.lora_A.weight` / `.lora_B.weight`, the names ComfyUI's
  own LoRA loader keys on. BFL fuses q, k and v into one Linear, so their LoRAs are fused exactly into one of
  rank 3r: A = cat(A_q, A_k, A_v), B = blockdiag(B_q, B_k, B_v), zeros standing in for an untargeted part.
  alpha / rank is baked into lora_B and no `.alpha` key is written: ComfyUI then applies scale 1.0, and
  diffusers' `Flux2Pipeline.load_lora_weights` (which rejects `.alpha` keys in `diffusion_model.*` files)
  loads the same file.
- "diffusers": `transformer.<peft name>.lora_A.weight`, written by diffusers' own `save_lora_weights` with
  r and lora_alpha in its `lora_adapter_metadata` header. ComfyUI maps these names too, but it ignores that
  header and applies scale 1.0: give ComfyUI the "comfyui" file unless alpha == rank.
- "kohya": `lora_unet_<BFL layer, dots as underscores>.lora_down.weight` / `.lora_up.weight` / `.alpha`
  (musubi-tuner's FLUX.2 layout), B unscaled, alpha per layer so that alpha / that layer's rank is the
  scale (3 alpha for a fused qkv of rank 3r). Loads in ComfyUI and in diffusers.

Every file carries its rank, alpha and layout in `flux2_lora.*` header entries, so read_lora turns any of
them back into the canonical form: exactly, except that un-baking alpha / rank from the "comfyui" file is
exact only when that scale is a power of two (otherwise within one rounding of each weight).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections import Counter
from datetime import datetime
from pathlib import Path

import torch

from .. import __version__
from ..errors import ConfigError, ExportError
from . import lora_keys
from .adapter_keys import dora_split, is_dora, is_lycoris, lycoris_keys

log = logging.getLogger(__name__)

FORMATS = ("comfyui", "diffusers", "kohya")
_PREFIX = {"comfyui": "diffusion_model.", "diffusers": "transformer.", "kohya": lora_keys.KOHYA_PREFIX}
_SUFFIX = {"comfyui": ("lora_A.weight", "lora_B.weight"), "diffusers": ("lora_A.weight", "lora_B.weight"),
           "kohya": ("lora_down.weight", "lora_up.weight")}
# Header entries that describe one file's layout: replaced, never carried over, when a LoRA is re-exported.
_FORMAT_KEYS = ("format", "lora_adapter_metadata", "flux2_lora.format", "flux2_lora.alpha_baked", "ss_network_module",
                "modelspec.hash_sha256", "sshs_model_hash", "sshs_legacy_hash")
# modelspec.architecture and ss_base_model_version as musubi-tuner (kohya's FLUX.2 trainer) writes them.
_ARCHITECTURES = {"flux2-dev": ("Flux.2-dev", "flux_2_dev"), "flux2-klein-4b": ("Flux.2-klein-4b", "flux_2_klein_4b"),
                  "flux2-klein-9b": ("Flux.2-klein-9b", "flux_2_klein_9b")}
IMPLEMENTATION = "https://github.com/black-forest-labs/flux2"
# lora_metadata's documented `extra` keys: (the kohya entry each also fills, what it is). Every extra key, these
# or others, is also kept as `flux2_lora.<key>` (strings as they are, anything else as JSON).
EXTRA_KEYS = {
    "name": ("ss_output_name", "the LoRA's name, also modelspec.title"),
    "steps": ("ss_steps", "optimizer steps trained, also ss_max_train_steps unless max_steps is given"),
    "max_steps": ("ss_max_train_steps", "steps planned"), "epochs": ("ss_num_epochs", "epochs trained"),
    "resolution": ("", "side in pixels or a schedule [512, 1024]: ss_resolution, modelspec.resolution of the last"),
    "trigger_word": ("", "the concept's caption token: modelspec.trigger_phrase, ss_tag_frequency"),
    "dataset_fingerprint": ("", "the latent cache's dataset fingerprint"),
    "base_model_fingerprint": ("", "models.weights_fingerprint of the base transformer"),
    "base_model_hash": ("ss_new_sd_model_hash", "SHA-256 of the base model file"),
    "base_model_name": ("ss_sd_model_name", "base model file or folder name"),
    "family": ("", "'klein' or 'dev' for a custom variant: modelspec.architecture"),
    "text_conditioning": ("", "'comfyui' or 'diffusers': the prompt layout trained with"),
    "lr": ("ss_learning_rate", "learning rate"), "batch_size": ("ss_batch_size_per_device", "batch size"),
    "images": ("ss_num_train_images", "training images"), "seed": ("ss_seed", "training seed"),
    "comment": ("ss_training_comment", "free text"), "description": ("", "modelspec.description"),
    "author": ("", "modelspec.author"), "date": ("", "ISO-8601 creation time, modelspec.date (default: now)"),
}


def _text(value) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value) if isinstance(value, (bool, list, tuple, dict)) else str(value)


def _check(fmt: str, rank=1, alpha=1.0) -> None:
    problems = []
    if fmt not in FORMATS:
        problems.append(("format", f"unknown LoRA format {fmt!r}: choose one of {', '.join(FORMATS)}"))
    if not isinstance(rank, int) or rank < 1:
        problems.append(("lora.rank", f"rank must be a positive integer, got {rank!r}"))
    if not isinstance(alpha, (int, float)) or not alpha > 0:
        problems.append(("lora.alpha", f"alpha must be a positive number, got {alpha!r}"))
    if problems:
        raise ConfigError(problems)


# ---------------------------------------------------------------------------------------------- canonical state
def lora_state_dict(transformer, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's weights with peft names (no adapter name, no "transformer." prefix): float32 CPU copies."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(transformer, adapter_name=adapter_name)
    # A base sharded over torchrun's ranks (training/sharding.py) holds DTensors: gathered whole, on every rank.
    state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in state.items()}
    return {k: v.detach().to(device="cpu", dtype=torch.float32, copy=True).contiguous() for k, v in state.items()}


def _modules(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{peft module: (A (r, in), B (out, r))}, every key and name checked."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    bad = []
    for key, tensor in state.items():
        module, dot, kind = key.rpartition(".lora_")
        if not dot or kind not in ("A.weight", "B.weight") or lora_keys.bfl_target(module) is None:
            bad.append(key)
        else:
            pairs.setdefault(module, {})[kind[0]] = tensor
    bad += [f"{m} (no lora_{'B' if 'A' in p else 'A'})" for m, p in pairs.items() if len(p) != 2]
    if bad:
        raise ExportError(f"not a FLUX.2 transformer LoRA in peft names: {', '.join(map(repr, bad[:5]))}"
                          f"{f' and {len(bad) - 5} more' if len(bad) > 5 else ''}; expected keys like "
                          f"'transformer_blocks.0.attn.to_q.lora_A.weight' from lora_state_dict(transformer)")
    return {m: (p["A"], p["B"]) for m, p in pairs.items()}


def to_format(state: dict[str, torch.Tensor], *, fmt: str, rank: int, alpha: float) -> dict[str, torch.Tensor]:
    """The canonical state in `fmt`'s names (see the module docstring); the tensors keep their dtype. DoRA
    entries (`<module>.dora_scale`, see adapter_keys.dora_split) become ComfyUI's `<layer>.dora_scale`, (out, 1); a LoKr or
    LoHa is written by adapter_keys.lycoris_keys."""
    _check(fmt, rank, alpha)
    if is_lycoris(state):
        return lycoris_keys(state, fmt, rank, alpha)
    state, scales = dora_split(state, fmt)
    modules = _modules(state)
    if fmt == "diffusers":
        return {f"transformer.{k}": v for k, v in state.items()}
    grouped: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for module, pair in modules.items():
        target = lora_keys.bfl_target(module)
        grouped.setdefault(target.module, {})[target.part] = pair
    scale, out = alpha / rank, {}
    for bfl, parts in grouped.items():
        if set(parts) <= set(lora_keys.PARTS):
            down, up = lora_keys.fuse_qkv(bfl, parts)
        else:
            (part, (down, up)), = parts.items()
            if part == lora_keys.SWAP:  # follow transformer_to_bfl: BFL holds these output rows half-swapped
                log.warning("%s: diffusers' LoRA loader does not swap its halves back: right for ComfyUI only", bfl)
                up = torch.cat(up.chunk(2)[::-1])
        name = f"diffusion_model.{bfl}" if fmt == "comfyui" else lora_keys.kohya_name(bfl)
        members = lora_keys.diffusers_modules(bfl)
        order = [members[p] for p in lora_keys.PARTS] if set(members) == set(lora_keys.PARTS) else list(members.values())
        layer_scales = [scales.get(m) for m in order]                     # in fuse_qkv's order of the parts
        if any(v is not None for v in layer_scales):
            if any(v is None for v in layer_scales):
                raise ExportError(f"{bfl}: DoRA scales for only some of its parts: pass comfyui_dora's whole output")
            dora = torch.cat(layer_scales)
            if set(parts) == {lora_keys.SWAP}:
                dora = torch.cat(dora.chunk(2)[::-1])
            out[f"{name}.dora_scale"] = dora[:, None].contiguous()
        a_key, b_key = _SUFFIX[fmt]
        out[f"{name}.{a_key}"] = down.contiguous()
        if fmt == "comfyui":
            out[f"{name}.{b_key}"] = (up * scale).contiguous()
        else:
            out[f"{name}.{b_key}"] = up.contiguous()
            out[f"{name}.alpha"] = torch.tensor(alpha * down.shape[0] / rank, dtype=torch.float32)
    return out


# ---------------------------------------------------------------------------------------------- metadata
def lora_metadata(*, variant: str, rank: int, alpha: float, targets: list[str], extra: dict) -> dict[str, str]:
    """Header entries for save_lora: `flux2_lora.*` (everything, read back by read_lora), the kohya `ss_*`
    entries and the Stability ModelSpec 1.0 `modelspec.*` entries that LoRA managers (kohya, Civitai,
    ComfyUI-Lora-Manager) read. `variant` is a Variant name ("flux2-klein-4b", ... or "custom"); the `extra`
    keys are documented in EXTRA_KEYS."""
    extra = {k: v for k, v in extra.items() if v is not None and v != ""}
    family = extra.get("family") or next((f for f in ("klein", "dev") if f in variant), "")
    arch, base = _ARCHITECTURES.get(variant, (f"Flux.2-{family}" if family else "Flux.2",
                                              f"flux_2_{family}" if family else "flux_2"))
    sides = extra.get("resolution")
    side = (sides[-1] if isinstance(sides, (list, tuple)) and sides else sides) or None
    name = str(extra.get("name", "flux2-lora"))
    md = {"flux2_lora.variant": variant, "flux2_lora.rank": str(rank), "flux2_lora.alpha": repr(float(alpha)),
          "flux2_lora.targets": json.dumps(list(targets)), "flux2_lora.version": __version__,
          **{f"flux2_lora.{k}": _text(v) for k, v in extra.items()},
          "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": f"{arch}/lora",
          "modelspec.implementation": IMPLEMENTATION, "modelspec.title": name,
          "modelspec.date": str(extra.get("date") or datetime.now().astimezone().replace(microsecond=0).isoformat()),
          "ss_base_model_version": base, "ss_network_dim": str(rank), "ss_network_alpha": repr(float(alpha)),
          "ss_max_train_steps": _text(extra.get("steps", ""))}
    md.update({ss: _text(extra[k]) for k, (ss, _) in EXTRA_KEYS.items() if ss and k in extra})
    if side:
        md.update({"modelspec.resolution": f"{side}x{side}", "ss_resolution": f"({side}, {side})"})
    if trigger := extra.get("trigger_word"):
        md["modelspec.trigger_phrase"] = str(trigger)
        md["ss_tag_frequency"] = json.dumps({"dataset": {str(trigger): int(extra.get("images", 1))}})
    md.update({f"modelspec.{k}": str(extra[k]) for k in ("description", "author") if k in extra})
    return {k: v for k, v in md.items() if v != ""}


# ---------------------------------------------------------------------------------------------- files
def _diffusers_file(state, rank: int, alpha: float, folder: Path) -> tuple[dict, dict[str, str]]:
    """Tensors and header exactly as diffusers' own `save_lora_weights` writes them."""
    from diffusers.loaders import Flux2LoraLoaderMixin
    from peft import LoraConfig
    from safetensors import safe_open

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=sorted(_modules(state))).to_dict()
    with tempfile.TemporaryDirectory(dir=folder, prefix=".flux2-lora-") as tmp:
        Flux2LoraLoaderMixin.save_lora_weights(tmp, transformer_lora_layers=state, weight_name="lora.safetensors",
                                               transformer_lora_adapter_metadata=config)
        with safe_open(str(Path(tmp, "lora.safetensors")), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def save_lora(path, state: dict[str, torch.Tensor], *, fmt: str = "comfyui", rank: int, alpha: float,
              metadata: dict[str, str]) -> Path:
    """Write `state` (canonical) as a `fmt` LoRA file, atomically, with `metadata` plus the layout entries."""
    from safetensors.torch import save

    from ..disk import write_atomically

    _check(fmt, rank, alpha)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {k: str(v) for k, v in metadata.items() if k not in _FORMAT_KEYS}
    if fmt == "diffusers":
        tensors, written = _diffusers_file(state, rank, alpha, path.parent)
        header.update(written)
    else:
        tensors = to_format(state, fmt=fmt, rank=rank, alpha=alpha)
    header.update({"format": "pt", "flux2_lora.format": fmt, "flux2_lora.rank": str(rank),
                   "flux2_lora.alpha": repr(float(alpha)), "flux2_lora.alpha_baked": str(fmt == "comfyui").lower(),
                   "ss_network_module": "networks.lora_flux_2" if fmt == "kohya" else f"flux2_lora_core.{fmt}",
                   "ss_network_dim": str(rank), "ss_network_alpha": repr(float(alpha))})
    header.setdefault("flux2_lora.version", __version__)
    data = save(tensors)  # the tensor bytes, hashed as kohya (sshs_model_hash) and ModelSpec define it
    digest = hashlib.sha256(memoryview(data)[8 + int.from_bytes(data[:8], "little"):]).hexdigest()
    header.update({"modelspec.hash_sha256": f"0x{digest}", "sshs_model_hash": digest})
    write_atomically(path, save(tensors, metadata=header))
    # debug: the caller says it once (the trainer's log, `flux2-lora export`'s line), not this and then that
    log.debug("wrote %s LoRA (%d tensors, rank %d, alpha %g) to %s", fmt, len(tensors), rank, alpha, path)
    return path


def _layout(path: Path, keys) -> str:
    if not any(".lora_" in k for k in keys):
        raise ExportError(f"{path}: holds no LoRA weights (no *.lora_A / lora_B or lora_down / lora_up keys): "
                          "pass a LoRA .safetensors file written by flux2-lora")
    for fmt, prefix in _PREFIX.items():
        if all(k.startswith(prefix) for k in keys):
            return fmt
    shown = ", ".join(repr(k) for k in sorted(keys)[:3])
    raise ExportError(f"{path}: unknown LoRA key layout ({shown}, ...): expected only 'diffusion_model.*' (ComfyUI), "
                      "'transformer.*' (diffusers) or 'lora_unet_*' (kohya) keys as flux2-lora writes them")


def _peft_names(fmt: str, name: str) -> dict[str, str] | None:
    """{part: peft module} of one layer named in `fmt`'s layout (without prefix), or None if it is no FLUX.2 layer."""
    if fmt == "diffusers":
        return {"": name} if lora_keys.bfl_target(name) else None
    bfl = name if fmt == "comfyui" else lora_keys.bfl_from_kohya(lora_keys.KOHYA_PREFIX + name)
    return lora_keys.diffusers_modules(bfl) if bfl else None


def _file_layers(path: Path, fmt: str, tensors: dict, adapter: dict) -> dict[str, tuple]:
    """{peft module: (A, B, the scale the file's own loaders apply: 1.0 without an alpha)}."""
    a_kind, b_kind = _SUFFIX[fmt]
    kinds = (a_kind, b_kind) if fmt == "diffusers" else (a_kind, b_kind, "alpha")
    groups, bad = {}, []
    for key, tensor in tensors.items():
        name = key[len(_PREFIX[fmt]):]
        kind = next((k for k in kinds if name.endswith(f".{k}")), None)
        if kind:
            groups.setdefault(name[: -len(kind) - 1], {})[kind] = tensor
        else:
            bad.append(key)
    layers = {}
    for name, entry in groups.items():
        peft_names = _peft_names(fmt, name)
        if peft_names is None or a_kind not in entry or b_kind not in entry:
            bad.append(_PREFIX[fmt] + name)
            continue
        down, up = entry[a_kind], entry[b_kind]
        if fmt == "diffusers":  # without its adapter metadata diffusers loads a LoRA at scale 1.0
            r = adapter.get("transformer.r")
            scale = adapter.get("transformer.lora_alpha", r) / r if r else 1.0
        else:
            scale = float(entry["alpha"]) / down.shape[0] if "alpha" in entry else 1.0
        if set(peft_names) == set(lora_keys.PARTS):
            parts = lora_keys.split_qkv(f"{path}: {_PREFIX[fmt]}{name}", down, up)
        else:
            (part,) = peft_names
            parts = {part: (down, torch.cat(up.chunk(2)[::-1]) if part == lora_keys.SWAP else up)}
        layers.update({peft_names[part]: (a, b, scale) for part, (a, b) in parts.items()})
    if bad:
        raise ExportError(f"{path}: {len(bad)} keys are no FLUX.2 transformer LoRA layer in the {fmt} layout: "
                          f"{', '.join(map(repr, sorted(bad)[:5]))}")
    return layers


def read_lora(path) -> tuple[dict[str, torch.Tensor], int, float, dict[str, str]]:
    """(canonical state, rank, alpha, header metadata) from a file in any of FORMATS. Never unpickles."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such LoRA file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ExportError(f"{path}: not a readable .safetensors file ({exc}); LoRAs are read from safetensors "
                          "only (never unpickled): convert .ckpt/.pt files elsewhere first") from None
    if is_dora(tensors):
        raise ExportError(f"{path}: a DoRA LoRA: it cannot be converted or continued here (its dora_scale depends "
                          "on the base weights it was trained on); use it in ComfyUI as it is")
    if is_lycoris(tensors):
        raise ExportError(f"{path}: a LoKr or LoHa: it cannot be converted or continued here (only LoRAs can); use "
                          "it in ComfyUI as it is")
    fmt = _layout(path, tensors)
    adapter = json.loads(metadata.get("lora_adapter_metadata") or "{}")
    unsupported = [k for k in ("rank_pattern", "alpha_pattern", "use_rslora", "use_dora")
                   if adapter.get(f"transformer.{k}")]
    if unsupported:
        raise ExportError(f"{path}: LoRAs with {', '.join(unsupported)} are not supported; export plain LoRAs")
    layers = _file_layers(path, fmt, tensors, adapter)
    if "flux2_lora.rank" in metadata and "flux2_lora.alpha" in metadata:
        rank, alpha = int(metadata["flux2_lora.rank"]), float(metadata["flux2_lora.alpha"])
    else:  # another tool's file: its most common rank, at the scale its loaders apply
        rank = Counter(a.shape[0] for a, _, _ in layers.values()).most_common(1)[0][0]
        alpha = rank * Counter(scale for _, _, scale in layers.values()).most_common(1)[0][0]
    state = {}
    for module, (a, b, scale) in layers.items():
        factor = (alpha / rank) / scale  # the same product at the canonical scale: B = B_file * scale / (alpha / rank)
        state[f"{module}.lora_A.weight"] = a.contiguous()
        state[f"{module}.lora_B.weight"] = (b if abs(factor - 1) < 1e-6 else b / factor).contiguous()
    return state, rank, alpha, metadata


def _run_lora(folder: Path) -> Path:
    """The one LoRA a run folder holds in lora/ (earlier exports, "<stem>.<format>.safetensors", aside)."""
    found = [p for p in sorted((folder / "lora").glob("*.safetensors"))
             if not any(p.name.endswith(f".{fmt}.safetensors") for fmt in FORMATS)]
    if len(found) != 1:
        what = "no LoRA file" if not found else f"{len(found)} LoRA files ({', '.join(p.name for p in found)})"
        raise ExportError(f"{folder}: lora/ holds {what}: pass the .safetensors file to export instead of the folder")
    return found[0]


def export_lora(source, *, fmt: str = "comfyui", out=None) -> Path:
    """Convert a LoRA written by this package (any format; or a run folder's lora/<name>.safetensors) to `fmt`.

    `out`: a file, or a folder for "<stem>.<fmt>.safetensors" (default: the source's). Never overwrites a file.
    """
    _check(fmt)
    source = Path(source)
    if source.is_dir():
        source = _run_lora(source)
    stem = source.name[: -len(".safetensors")] if source.name.endswith(".safetensors") else source.stem
    name = next((stem[: -len(f".{f}")] for f in FORMATS if stem.endswith(f".{f}")), stem) + f".{fmt}.safetensors"
    out = source.with_name(name) if out is None else Path(out) / name if Path(out).is_dir() else Path(out)
    if out.exists() or os.path.abspath(out) == os.path.abspath(source):
        raise ExportError(f"{out}: already exists (an export never overwrites a file): delete it, or write "
                          "elsewhere with --out FILE (out= in Python)")
    state, rank, alpha, metadata = read_lora(source)
    try:
        return save_lora(out, state, fmt=fmt, rank=rank, alpha=alpha,
                         metadata={**metadata, "flux2_lora.exported_from": source.name})
    except OSError as exc:  # a file in the way of its folder, no permission, a full disk: say which path and flag
        blocker = next((p for p in out.parents if os.path.exists(p)), None)
        why = f"{blocker} is a file, not a folder" if blocker and not blocker.is_dir() else exc.strerror or exc
        raise ExportError(f"{out}: cannot be written ({why}): write elsewhere with --out FILE "
                          "(out= in Python)") from None
