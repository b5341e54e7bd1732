"""How a stage's package names what the rest of the program uses, without importing any of it up front.

ComfyUI imports every node pack when it starts, and `flux2-lora validate` should answer before torch could load,
so `import flux2_lora_core.models` must not load torch, transformers and every loader just to reach one name.
Each subpackage's __init__ lists its public names by the module that defines them; a name's module is imported
the first time the name is used (PEP 562 module __getattr__), and from then on it is an ordinary attribute.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping, Sequence


def lazy_exports(package: str, modules: Mapping[str, Sequence[str]]) -> tuple[Callable, Callable, list[str]]:
    """(__getattr__, __dir__, __all__) for `package`, whose `modules` map each submodule to the names it exports."""
    where = {name: module for module, names in modules.items() for name in names}

    def __getattr__(name: str):
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{where[name]}"), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *where})

    return __getattr__, __dir__, sorted(where)
