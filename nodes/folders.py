"""Where the nodes may read and write: a ComfyUI server is often shared (`--listen`) and any client can queue any
literal input, so every path a node receives is checked here before anything is opened, listed or written.

- Read: dataset folders under ComfyUI's input directory; model files and folders named in its model folders (as
  its own loaders take them, links included); an absolute path only when its real path lies in an allowed root.
- Write: only under the output directory (runs and the latent cache), the temp directory and models/loras.
- Allowed roots, for servers whose owner keeps datasets or models elsewhere: FLUX2_LORA_ALLOWED_ROOTS (absolute
  folders separated by os.pathsep) and the file <user dir>/__flux2_lora/allowed_roots.txt (one absolute folder a
  line; `#` starts a comment line), both read at each use, so a change needs no restart. ComfyUI never serves a
  `__` user folder over HTTP: a client cannot edit that file.
A `..` part is refused outright: `a/link/..` means one folder to the text and another to the file system.
"""

from __future__ import annotations

import logging
import os

import folder_paths

from ..flux2_lora_core.errors import ConfigError, DatasetError, PathNotAllowedError

ALLOWED_ROOTS_ENV = "FLUX2_LORA_ALLOWED_ROOTS"
SETTINGS_USER = "flux2_lora"  # ComfyUI's system user folder user/__flux2_lora
ALLOWED_ROOTS_FILE = "allowed_roots.txt"
RUNS_FOLDER = "flux2_lora"  # under ComfyUI's output directory
HOW_TO_ALLOW = (f"the server's owner can allow a folder in {ALLOWED_ROOTS_ENV} or in "
                f"user/__{SETTINGS_USER}/{ALLOWED_ROOTS_FILE}")
NAME_CHARACTERS = set('/\\:*?"<>|')
# Load Training Model's inputs -> the ComfyUI model folders their names are looked up in ("" is models/ itself)
MODEL_FOLDERS = {"path": ("diffusion_models", "diffusers"), "vae": ("vae",), "text_encoder": ("text_encoders",),
                 "tokenizer": ("text_encoders", "")}

# Load Training Model's pickers: vae/text_encoder may come from the diffusers folder `path` names
FROM_DIFFUSERS = "(from the diffusers folder)"
NEW_LORA = "(none: a new LoRA)"   # Configure LoRA's init_from when it continues no LoRA
# The names ComfyUI's own FLUX.2 templates download, by family: picked by default when present
STANDARD_FILES = {"klein": {"path": "flux-2-klein-base-4b.safetensors", "vae": "flux2-vae.safetensors",
                            "text_encoder": ("qwen_3_4b.safetensors",)},
                  "dev": {"path": "flux2_dev_fp8mixed.safetensors", "vae": "flux2-vae.safetensors",
                          "text_encoder": ("mistral_3_small_flux2_fp8.safetensors",
                                           "mistral_3_small_flux2_bf16.safetensors")}}

log = logging.getLogger(__name__)


def allowed_roots() -> tuple[str, ...]:
    """Real paths of the folders the server's owner allowed beyond ComfyUI's own (see the module doc)."""
    entries = [(ALLOWED_ROOTS_ENV, e) for e in os.environ.get(ALLOWED_ROOTS_ENV, "").split(os.pathsep)]
    path = os.path.join(folder_paths.get_system_user_directory(SETTINGS_USER), ALLOWED_ROOTS_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            entries += [(path, line) for line in f.read().splitlines() if not line.lstrip().startswith("#")]
    except FileNotFoundError:
        pass
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("%s cannot be read (%s): no folder of it is allowed", path, exc)
    roots = []
    for source, entry in entries:
        entry = os.path.expanduser(entry.strip())
        if entry and not os.path.isabs(entry):
            log.warning("%s: %r is not an absolute folder and was ignored", source, entry)
        elif entry:
            roots.append(os.path.realpath(entry))
    return tuple(roots)


def read_roots() -> tuple[str, ...]:
    """Where dataset files may be read from: the input directory and the allowed roots (real paths)."""
    return (os.path.realpath(folder_paths.get_input_directory()), *allowed_roots())


def dataset_folder(text: str, key: str = "folder") -> str:
    """Load Dataset's folder: a name in ComfyUI's input directory, or an absolute path in an allowed root."""
    name = _clean(text, key)
    if not name:
        raise DatasetError(f"`{key}` is empty: give the dataset folder's name in ComfyUI's input directory")
    path = name if os.path.isabs(name) else os.path.join(folder_paths.get_input_directory(), name)
    if not _inside(os.path.realpath(path), read_roots()):
        link = "" if os.path.isabs(name) else " (it links out of it)"
        raise PathNotAllowedError(f"`{key}`: {text!r} is outside ComfyUI's input directory{link} and the folders the "
                                  f"server's owner allowed: put the dataset in the input directory; {HOW_TO_ALLOW}")
    if not os.path.exists(path):
        where = "" if os.path.isabs(name) else " in ComfyUI's input directory"
        raise DatasetError(f"dataset folder {text!r} not found{where} (looked for {path}): create it and put the "
                           f"training images there, or set `{key}` to an existing folder")
    return path


def model_path(key: str, text: str) -> str:
    """Load Training Model's `key`: a file or folder named in its MODEL_FOLDERS, or an absolute path inside those
    folders or an allowed root. Empty stays empty (the engine's default)."""
    name = _clean(text, key)
    if not name:
        return ""
    kinds = MODEL_FOLDERS[key]
    folders = [os.path.abspath(f) for kind in kinds
               for f in (folder_paths.get_folder_paths(kind) if kind else [folder_paths.models_dir])]
    where = " or ".join(f"models/{kind}".rstrip("/") for kind in kinds)
    if os.path.isabs(name):
        if _inside(os.path.normpath(name), folders) or _inside(os.path.realpath(name), allowed_roots()):
            return name
        raise PathNotAllowedError(f"`{key}`: {text!r} is outside ComfyUI's {where} folders and the folders the "
                                  f"server's owner allowed: give a name in {where}; {HOW_TO_ALLOW}")
    found = next((os.path.join(f, name) for f in folders if os.path.exists(os.path.join(f, name))), None)
    if found is None:
        raise ConfigError([(key, f"{name!r} is not in ComfyUI's {where} folders: put it there (or give an absolute "
                                 "path in a folder the server's owner allowed)")])
    return found


def diffusers_folders() -> list[str]:
    """Folders under models/diffusers holding a model_index.json (as ComfyUI's DiffusersLoader finds them),
    relative to that folder."""
    found = []
    for root in folder_paths.get_folder_paths("diffusers"):
        for here, folders, files in os.walk(root, followlinks=True):
            if "model_index.json" in files:
                found.append(os.path.relpath(here, root))
                folders.clear()   # a pipeline's own sub-folders are its parts, not more models
    return sorted(found)


def gguf_files() -> list[str]:
    """GGUF transformers in the diffusion_models folders (ComfyUI lists only its own extensions there; ComfyUI-GGUF
    adds .gguf under its own loader), relative to their folder."""
    found = []
    for root in folder_paths.get_folder_paths("diffusion_models"):
        for here, _, files in os.walk(root, followlinks=True):
            found += [os.path.relpath(os.path.join(here, f), root) for f in files if f.lower().endswith(".gguf")]
    return sorted(set(found))


def model_choices() -> dict[str, tuple[list[str], str | None]]:
    """Load Training Model's combos, {input: (options, default)}, read afresh each time ComfyUI asks (a file copied
    in shows up on the next refresh, as in its own loaders). The default is the standard FLUX.2 file when present
    ([klein] first, the text encoder of the transformer's family), else None: the combo's first option. An empty
    models folder is an empty list, as ComfyUI's loaders show it."""
    options = {"path": folder_paths.get_filename_list("diffusion_models") + gguf_files() + diffusers_folders(),
               "vae": [FROM_DIFFUSERS, *folder_paths.get_filename_list("vae")],
               "text_encoder": [FROM_DIFFUSERS, *folder_paths.get_filename_list("text_encoders")]}
    present = [f for f in STANDARD_FILES.values() if f["path"] in options["path"]] or list(STANDARD_FILES.values())
    encoders = [e for family in present for e in family["text_encoder"]] + [
        e for family in STANDARD_FILES.values() for e in family["text_encoder"]]
    defaults = {"path": present[0]["path"], "vae": present[0]["vae"],
                "text_encoder": next((e for e in encoders if e in options["text_encoder"]), None)}
    return {key: (values, defaults[key] if defaults[key] in values else None) for key, values in options.items()}


def runs_folder(*parts: str) -> str:
    return os.path.join(folder_paths.get_output_directory(), RUNS_FOLDER, *parts)


def cache_folder(text: str, key: str = "cache_dir") -> str:
    """Cache Latents' folder: empty is output/flux2_lora/cache, a name or relative path goes under it; an absolute
    path only inside ComfyUI's output or temp directory."""
    name = _clean(text, key)
    path = name if os.path.isabs(name) else runs_folder("cache", name) if name else runs_folder("cache")
    writable = (os.path.realpath(folder_paths.get_output_directory()),
                os.path.realpath(folder_paths.get_temp_directory()))
    if not _inside(os.path.realpath(path), writable):  # realpath follows links as far as the path exists
        raise PathNotAllowedError(f"`{key}`: {text!r} is outside ComfyUI's output and temp directories: give a name "
                                  f"(the cache then lives in output/{RUNS_FOLDER}/cache/<name>) or leave it empty")
    return path


def run_to_resume(text: str, key: str = "resume") -> str:
    """A run (or one of its checkpoints) inside output/flux2_lora, by name: resuming writes into it."""
    runs = os.path.realpath(runs_folder())
    path = os.path.realpath(os.path.join(runs, _clean(text, key)))
    if path == runs or not _inside(path, (runs,)):
        raise PathNotAllowedError(f"`{key}`: {text!r} is not a run inside output/{RUNS_FOLDER}: give a run name "
                                  "such as 'flux2_lora'")
    return path


def lora_choices() -> list[str]:
    """Configure LoRA's init_from picker: the LoRAs in models/loras, as ComfyUI's LoraLoader lists them."""
    return [NEW_LORA, *folder_paths.get_filename_list("loras")]


def lora_to_continue(text: str, key: str = "init_from") -> str:
    """Configure LoRA's init_from: the full path of a LoRA named in models/loras; "" for a new LoRA."""
    name = _clean(text, key)
    if not name or name == NEW_LORA:
        return ""
    path = None if os.path.isabs(name) else folder_paths.get_full_path("loras", name)
    folders = [os.path.abspath(f) for f in folder_paths.get_folder_paths("loras")]
    if path is None or not _inside(os.path.normpath(os.path.abspath(path)), folders):
        raise ConfigError([(key, f"{text!r} is not a LoRA in ComfyUI's models/loras folders: pick one there (copy "
                                 "the file in first)")])
    return path


def run_name(text: str) -> str:
    """Train's `name`: its run folder in output/flux2_lora (and the LoRA file's name)."""
    return file_name(text, "name", where=f"output/{RUNS_FOLDER}")


def lora_file_name(text: str) -> str:
    """Save LoRA's `filename`: <name>.safetensors in models/loras."""
    return file_name(text.strip().removesuffix(".safetensors"), "filename", where="models/loras")


def file_name(text: str, key: str, *, where: str) -> str:
    """One plain name (no folders) for a file or folder the node creates in `where`."""
    name = text.strip()
    if not name or name.startswith(".") or NAME_CHARACTERS & set(name) or any(ord(c) < 32 for c in name):
        raise PathNotAllowedError(f"`{key}`: {text!r} is not a plain name: it names a file in {where}, so it must "
                                  "not be empty, start with '.' or hold any of / \\ : * ? \" < > |")
    return name


def inside_output(path: str, key: str) -> str:
    """A file the engine made under ComfyUI's output directory (a run's LoRA), or an error naming the input."""
    if not _inside(os.path.realpath(path), (os.path.realpath(folder_paths.get_output_directory()),)):
        raise PathNotAllowedError(f"`{key}`: the file it names is outside ComfyUI's output directory: link `{key}` "
                                  "from a Train node")
    return path


def _clean(text: str, key: str) -> str:
    """The path as typed, without the quotes "Copy as path" adds; `~` expanded; a `..` part refused."""
    name = os.path.expanduser(str(text).strip().strip("\"'"))
    if ".." in name.replace("\\", "/").split("/"):
        raise PathNotAllowedError(f"`{key}`: {text!r} has a '..' part: name a folder inside the allowed folders "
                                  "without going up")
    return name


def _inside(path: str, roots) -> bool:
    return any(path == root or path.startswith(root.rstrip(os.sep) + os.sep) for root in roots)
