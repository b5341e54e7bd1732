"""The pack's own socket types, the rule that they arrive through links, and the checks made when a prompt is queued.

ComfyUI type-checks a link but not a literal: over the API a string or a dict can be sent where a FLUX2_* socket
is expected, and it would reach `execute`. Two checks keep that out:
- `refuse_at_queue` is the nodes' `validate_inputs`. It asks ComfyUI for `input_types`, the types of the linked
  inputs (a literal has none), so a literal is refused when the prompt is queued (HTTP 400), before anything runs.
  Asking for `input_types` turns ComfyUI's own type check of those links off, so it is redone here. It also runs
  the nodes' path checks (folders.py) on literal paths, so a path leading out is refused before anything runs too.
- `check_values`, first in `execute`, checks what arrived, for a value routed through an any-type ("*") node; the
  path checks run again in `execute` for a path that came through a link.
"""

from __future__ import annotations

from comfy_api.latest import io

from ..flux2_lora_core.errors import ConfigError, Flux2LoraError, PathNotAllowedError
from .lora_settings import KEYS as LORA_WIDGET_KEYS

Dataset = io.Custom("FLUX2_DATASET")
Model = io.Custom("FLUX2_MODEL")
Cache = io.Custom("FLUX2_CACHE")
LoraConfig = io.Custom("FLUX2_LORA_CONFIG")
Run = io.Custom("FLUX2_RUN")
MADE_BY = {"FLUX2_DATASET": "Load Dataset", "FLUX2_MODEL": "Load Training Model", "FLUX2_CACHE": "Cache Latents",
           "FLUX2_LORA_CONFIG": "Configure LoRA", "FLUX2_RUN": "Train"}
SOCKET_OF = {"dataset": "FLUX2_DATASET", "model": "FLUX2_MODEL", "cache": "FLUX2_CACHE",
             "lora_config": "FLUX2_LORA_CONFIG", "run": "FLUX2_RUN"}  # input name -> socket type, the same everywhere
# What Configure LoRA's dict may set: the sections of its widgets' keys, and of data.* only its own (held-out images).
LORA_SECTIONS = frozenset(key.split(".")[0] for key in LORA_WIDGET_KEYS.values())
LORA_DATA_KEYS = frozenset(key[len("data."):] for key in LORA_WIDGET_KEYS.values() if key.startswith("data."))


def refuse_at_queue(node: type[io.ComfyNode], input_types: dict | None = None, sockets: dict | None = None,
                    paths=()) -> bool | str:
    """validate_inputs: each of `sockets` ({name: value as validation sees it}) linked, every link of the right type,
    and no literal of `paths` ((check, value) pairs; a linked value is None) leading out of the allowed folders.
    Other problems of a path (a missing folder, an empty name) are left to `execute`, which reports them in full."""
    problems = []
    if sockets:
        from comfy_execution.validation import validate_node_input

        expected = {i.id: i.get_io_type() for i in node.define_schema().inputs}
        problems += [_not_linked(name, "nothing" if value is None else f"a literal {type(value).__name__}")
                     for name, value in sockets.items() if name not in input_types]
        problems += [f"input `{name}` takes {expected[name]}, not the {received} it is linked to"
                     for name, received in input_types.items()
                     if name in expected and not validate_node_input(received, expected[name])]
    for check, value in paths:
        try:
            if isinstance(value, str) and value.strip():
                check(value)
        except PathNotAllowedError as exc:
            problems.append(str(exc))
        except (Flux2LoraError, OSError):
            pass
    return "; ".join(problems) or True


def check_values(**values) -> None:
    """First thing in execute: each socket input (by its name) holds what its node makes."""
    for name, value in values.items():
        if not _accepts(SOCKET_OF[name], value):
            raise ConfigError(_not_linked(name, f"a {type(value).__name__}"))


def _not_linked(name: str, got: str) -> str:
    return f"input `{name}` must be linked from a {MADE_BY[SOCKET_OF[name]]} node; got {got}"


def _accepts(socket: str, value) -> bool:
    if socket == "FLUX2_DATASET":
        from ..flux2_lora_core.data import Dataset as DatasetValue

        return isinstance(value, DatasetValue)
    from ..flux2_lora_core.config import Config, ModelConfig

    if socket in ("FLUX2_MODEL", "FLUX2_CACHE"):
        return isinstance(value, ModelConfig if socket == "FLUX2_MODEL" else Config)
    if not isinstance(value, dict):
        return False
    if socket == "FLUX2_LORA_CONFIG":
        return (set(value) <= LORA_SECTIONS and all(isinstance(v, dict) for v in value.values())
                and set(value.get("data", {})) <= LORA_DATA_KEYS)
    return set(value) == {"run", "lora"} and all(isinstance(v, str) for v in value.values())  # FLUX2_RUN
