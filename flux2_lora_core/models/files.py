"""Model files as found on disk: safetensors headers, what a file holds, and its tensors.

Users point the trainer at whatever they keep in ComfyUI's models/ folders, so the first question
about a file is what it is. Everything here answers from the safetensors header alone (names,
shapes, dtypes: a few kilobytes even for a 64 GB file), which lets a wrong file fail in
milliseconds with a message that says what it looks like, instead of after minutes of loading.
Nothing is ever unpickled: .ckpt/.pt/.bin files can run code when loaded, so they are refused.
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ModelError

_MAX_HEADER = 100 << 20  # real headers are well under 10 MB; a larger length means "not safetensors"
# Containers a component can come wrapped in (whole checkpoints, ComfyUI's model-merging saves).
TRANSFORMER_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
VAE_PREFIXES = ("first_stage_model.", "vae.")


@dataclass(frozen=True)
class TensorFile:
    """A validated safetensors file: its tensors' shapes and dtypes, and the header metadata."""

    path: Path
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]  # safetensors names: "BF16", "F8_E4M3", "U8", ...
    metadata: dict[str, str]
    offsets: dict[str, tuple[int, int]] = field(default_factory=dict)  # absolute (start, end) byte positions
    # GGUF block-quantized weights (gguf.py): (rows, bytes per row) of the raw blocks, read as uint8.
    raw_shapes: dict[str, tuple[int, int]] = field(default_factory=dict)

    def select(self, prefixes: tuple[str, ...]) -> tuple[str, dict[str, tuple[int, ...]]]:
        """(prefix, shapes without it) for the first prefix that any key carries, else ("", all shapes)."""
        for prefix in prefixes:
            if any(key.startswith(prefix) for key in self.shapes):
                return prefix, {k[len(prefix):]: s for k, s in self.shapes.items() if k.startswith(prefix)}
        return "", dict(self.shapes)


def _sniff(head: bytes) -> str:
    """What a non-safetensors file probably is, from its first bytes."""
    if head.startswith(b"PK\x03\x04"):
        return "a PyTorch zip checkpoint (.pt/.pth/.ckpt, pickled)"
    if head[:1] == b"\x80":
        return "a pickle file (.pt/.bin/.ckpt)"
    if head.startswith(b"GGUF"):
        return "a GGUF file"
    return "not a safetensors file"


def read_header(path: str | Path, *, key: str) -> TensorFile:
    """Validate `path` as a complete safetensors file and return its header; `key` is the setting that names it."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{key}: {str(path)!r} does not exist")
    if not path.is_file():
        raise ModelError(f"{key}: {str(path)!r} is not a file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        raw = f.read(length) if 2 <= length <= min(_MAX_HEADER, size - 8) else b""
    try:
        header = json.loads(raw) if raw else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        header = None
    if not isinstance(header, dict):
        if head.startswith(b"GGUF"):  # the transformer's GGUF files are read by gguf.py; no other part's are
            raise ModelError(f"{path}: a GGUF file; GGUF is read for the transformer (model.path) only: use the "
                             f".safetensors file for {key}")
        raise ModelError(f"{path}: {_sniff(head)}; only .safetensors files are loaded (pickled checkpoints can run "
                         f"code and are never opened). Use the model's .safetensors file for {key}.")
    metadata = header.pop("__metadata__", None) or {}
    try:
        shapes = {name: tuple(int(n) for n in t["shape"]) for name, t in header.items()}
        dtypes = {name: str(t["dtype"]) for name, t in header.items()}
        offsets = {name: (8 + length + int(t["data_offsets"][0]), 8 + length + int(t["data_offsets"][1]))
                   for name, t in header.items()}
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise ModelError(f"{path}: damaged safetensors header ({exc!r}); download or copy the file again") from None
    return check_size(TensorFile(path, shapes, dtypes, {str(k): str(v) for k, v in metadata.items()}, offsets), size)


def check_size(file: TensorFile, size: int) -> TensorFile:
    """`file`, unless its tensors reach past the `size` bytes the file has (a cut download)."""
    end = max((end for _, end in file.offsets.values()), default=0)
    if end > size:
        raise ModelError(f"{file.path}: truncated: its header describes {end:,} bytes but the file has {size:,}; the "
                         f"download or copy was cut short, fetch the file again")
    return file


def is_pipeline(folder: Path) -> bool:
    return (folder / "model_index.json").is_file()


def component_folder(path: Path, component: str, key: str) -> tuple[Path, dict]:
    """The component folder under `path` (a pipeline folder or the component itself) and its config."""
    folder = path / component if is_pipeline(path) else path
    if is_pipeline(path):
        cls = json.loads((path / "model_index.json").read_text(encoding="utf-8")).get("_class_name", "?")
        if not str(cls).startswith("Flux2"):
            raise ModelError(f"{path}: a {cls} folder, not a FLUX.2 pipeline; set {key} to a FLUX.2 model")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelError(f"{folder}: not a FLUX.2 {component} folder (no config.json); set {key} to a FLUX.2 "
                         f"diffusers folder or a .safetensors file")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        raise ModelError(f"{folder}: no .safetensors weights" + (f" (only pickled {', '.join(pickled)}, which are "
                         f"never loaded: convert them to safetensors)" if pickled else ""))
    for file in files:
        read_header(file, key=key)  # fails fast on truncated shards, before a loader half-reads them
    return folder, json.loads(config_file.read_text(encoding="utf-8"))


def load_tensors(file: TensorFile, prefix: str = "") -> dict:
    """The tensors under `prefix` (stripped), all at once, as views of safetensors' memory map of the file.

    The loaders stream single files instead (streaming.py); this is for small files and for comparing
    against the whole-file path."""
    from safetensors import safe_open

    with safe_open(str(file.path), framework="pt", device="cpu") as f:
        return {key[len(prefix):]: f.get_tensor(key) for key in f.keys() if key.startswith(prefix)}


# safetensors dtype names -> torch dtypes (the names the format defines that torch can hold).
_OWN_MAPPING = 1 << 20  # tensors from 1 MiB get their own anonymous mapping (few: one per weight matrix)
_DTYPES = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "I32": "int32",
           "U32": "uint32", "I64": "int64", "U64": "uint64", "F16": "float16", "BF16": "bfloat16", "F32": "float32",
           "F64": "float64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu"}


def read_tensor(handle, file: TensorFile, key: str):
    """One tensor of `file`, read from the open binary `handle` into fresh CPU memory (bit for bit).

    A plain read rather than safetensors' memory map of the whole file: pages of a mapped file count in
    the process's resident set until the mapping goes, so touching all of a 64 GB file costs as much RSS
    as reading it whole. Read this way, only the tensor's own copy stays (the page cache is the kernel's
    to drop), and it is freed as soon as the model holds its converted copy.
    """
    import torch

    name = "uint8" if key in file.raw_shapes else _DTYPES.get(file.dtypes[key])
    dtype = getattr(torch, name, None) if name else None
    if dtype is None:
        raise ModelError(f"{file.path}: {key!r} has dtype {file.dtypes[key]}, which this PyTorch cannot hold; "
                         f"use a file in bf16/fp16/fp32 or fp8 e4m3fn")
    start, end = file.offsets[key]
    size = end - start
    if size >= _OWN_MAPPING:  # an anonymous mapping of its own: freed, it goes back to the system at once,
        buffer = mmap.mmap(-1, size)  # where the heap keeps the holes a stream of read-then-cast buffers leaves
        raw = torch.frombuffer(buffer, dtype=torch.uint8, count=size)
    else:
        raw = torch.empty(size, dtype=torch.uint8)
    handle.seek(start)
    if size and handle.readinto(memoryview(raw.numpy())) != size:
        raise ModelError(f"{file.path}: {key!r} could not be read in full; the file is truncated, fetch it again")
    try:
        return raw.view(dtype).reshape(file.raw_shapes.get(key, file.shapes[key]))
    except RuntimeError:
        raise ModelError(f"{file.path}: {key!r} holds {end - start} bytes, which do not make a {file.dtypes[key]} "
                         f"tensor of shape {file.shapes[key]}; the file is damaged, fetch it again") from None


# ---------------------------------------------------------------------------------------------- what a file is
def count_blocks(shapes, prefix: str) -> int:
    """How many numbered blocks `prefix.N.` the keys hold (highest N + 1)."""
    found = {int(k[len(prefix):].split(".")[0]) for k in shapes
             if k.startswith(prefix) and k[len(prefix):].split(".")[0].isdigit()}
    return max(found) + 1 if found else 0


def identify(shapes: dict[str, tuple[int, ...]]) -> tuple[str, str]:
    """(kind, description) of a state dict from its key names and shapes.

    kind is one of "flux2_transformer", "flux2_transformer_diffusers", "flux2_vae", "qwen3", "mistral" for
    what FLUX.2 uses, else "other"; the description says in words what the tensors look like.
    """
    keys = set(shapes)

    def has(*names):
        return all(name in keys for name in names)

    if any(".lora_" in k or "lora_down" in k or k.startswith("lora_") for k in keys):
        return "other", "a LoRA (not a base model)"
    if has("double_stream_modulation_img.lin.weight", "img_in.weight"):
        return "flux2_transformer", "a FLUX.2 transformer (BFL/ComfyUI names)"
    if has("double_stream_modulation_img.linear.weight", "x_embedder.weight"):
        return "flux2_transformer_diffusers", "a FLUX.2 transformer (diffusers names)"
    if has("double_blocks.0.img_mod.lin.weight"):
        channels = shapes.get("img_in.weight", (0, 0))[1]
        return "other", f"a FLUX.1 transformer (per-block modulation, {channels} input channels; FLUX.2 has 128)"
    if has("transformer_blocks.0.norm1.linear.weight", "x_embedder.weight"):
        return "other", "a FLUX.1 transformer (diffusers names)"
    if any(k.startswith("joint_blocks.") for k in keys):
        return "other", "a Stable Diffusion 3 transformer"
    if has("input_blocks.0.0.weight"):
        return "other", "an SDXL UNet" if has("label_emb.0.0.weight") else "a Stable Diffusion 1.x/2.x UNet"
    if has("encoder.conv_in.weight", "decoder.conv_in.weight"):
        latent = shapes["decoder.conv_in.weight"][1]
        if has("bn.running_mean"):
            return "flux2_vae", f"a FLUX.2 VAE ({latent} latent channels)"
        family = {4: "SD 1.x/2.x/SDXL", 16: "FLUX.1/SD3"}.get(latent, "not FLUX.2")
        return "other", f"a VAE with {latent} latent channels ({family}; FLUX.2's has 32 and a latent BatchNorm)"
    if has("encoder.conv_in.weight") and any(k.startswith("encoder.down_blocks.") for k in keys):
        return "other", "a VAE in diffusers names (point at its folder, which holds its config.json)"
    if has("model.embed_tokens.weight") or any(k.startswith(("model.language_model.", "language_model.model."))
                                              for k in keys):
        hidden = next((s[1] for k, s in shapes.items() if k.endswith("embed_tokens.weight")), 0)
        if any(k.endswith("self_attn.q_norm.weight") for k in keys):
            return "qwen3", f"a Qwen3 text encoder (hidden size {hidden})"
        if any(k.endswith("self_attn.q_proj.bias") for k in keys):
            return "other", f"a Qwen2/Qwen2.5 text encoder (hidden size {hidden})"
        return "mistral", f"a Mistral/Llama-style text encoder (hidden size {hidden})"
    if any(k.startswith(("encoder.block.", "shared.")) for k in keys):
        return "other", "a T5 text encoder (FLUX.1/SD3)"
    if any(k.startswith(("text_model.", "transformer.text_model.")) for k in keys):
        return "other", "a CLIP text encoder"
    shown = ", ".join(repr(k) for k in sorted(keys)[:3])
    return "other", f"an unrecognised model (keys such as {shown})" if keys else "an empty file"
