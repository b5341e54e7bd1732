"""Start a ComfyUI checkout's main.py for the integration tests, after two test-only shims.

Usage: python comfyui_launcher.py COMFYUI_DIR [main.py arguments...]

Why the shims: ComfyUI imports torchvision and torchaudio unconditionally, but the only wheels
PyPI has for them on Linux are CUDA builds whose compiled extensions link against libc10_cuda.so.
Next to a CPU-only torch (what CI and this suite use) those extensions cannot load, and then:

- torchvision fails at import time, because its Python side registers fake kernels for the
  `torchvision::nms` / `torchvision::qnms` operators, which only its compiled library defines;
- torchaudio fails at import time, because `torchaudio._extension` treats a library it cannot
  load as a broken install and raises.

So, only when the compiled library really cannot be loaded, the launcher defines the two
torchvision operator schemas itself (no kernels: calling nms would fail, which no test does) and
replaces `torchaudio._extension` with a module that reports "extension not available" (the state
torchaudio itself supports for builds without it). With a matched torch/torchvision/torchaudio
install (what users have) neither shim is applied and the launcher is just `python main.py`.
Checking the libraries imports torch before main.py does, so ComfyUI logs "Torch already imported";
with --cpu that is harmless (the variables main.py sets first only concern CUDA/ROCm devices).

This is a test-environment measure only: nothing in the pack depends on it. scripts/comfyui_env.sh also
installs this file into the test environment with a .pth line that calls `install_import_hook()`, so that
every Python process there (pytest, and the CLI subprocesses the tests start, which reach torchvision
through transformers) gets the shims the moment it first imports torchvision or torchaudio, and no sooner.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types

VERBOSE = False  # the launcher says what it shimmed in the server's log; the import hook stays silent


def _say(text: str) -> None:
    if VERBOSE:
        print(f"[comfyui_launcher] {text}", file=sys.stderr)


def _library_loads(pattern: str) -> bool:
    """Whether the compiled library at the (glob) path loads next to this torch build."""
    import glob

    import torch

    paths = glob.glob(pattern)
    if not paths:
        return False
    try:
        torch.ops.load_library(paths[0])
    except OSError:
        return False
    return True


def shim_torchvision() -> None:
    """Define the two operator schemas torchvision's Python side expects from its C library."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or _library_loads(os.path.join(os.path.dirname(spec.origin), "_C*.so")):
        return
    import torch

    if getattr(shim_torchvision, "library", None) is not None or _has_op(torch, "torchvision", "nms"):
        return  # applied already (by the import hook, or by another copy of this module)
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    shim_torchvision.library = lib  # a Library deregisters its ops when garbage-collected
    _say("torchvision's C library cannot load next to this torch: defined the torchvision::nms/qnms schemas")


def shim_torchaudio() -> None:
    """Replace torchaudio._extension with the 'compiled extension not available' state."""
    if "torchaudio._extension" in sys.modules:
        return  # imported (or stubbed) already
    spec = importlib.util.find_spec("torchaudio")
    if spec is None or _library_loads(os.path.join(os.path.dirname(spec.origin), "lib", "_torchaudio*.so")):
        return

    def fail_if_no_align(func):
        def unavailable(*args, **kwargs):
            raise RuntimeError("torchaudio's compiled extension is not available in this test environment")
        return unavailable

    stub = types.ModuleType("torchaudio._extension")
    stub._IS_TORCHAUDIO_EXT_AVAILABLE = False
    stub._IS_ALIGN_AVAILABLE = False
    stub.fail_if_no_align = fail_if_no_align
    stub._load_lib = lambda name: False
    stub._check_cuda_version = lambda: None
    sys.modules["torchaudio._extension"] = stub
    _say("torchaudio's C library cannot load next to this torch: stubbed torchaudio._extension")


def _has_op(torch, namespace: str, name: str) -> bool:
    try:
        getattr(getattr(torch.ops, namespace), name)
    except (AttributeError, RuntimeError):
        return False
    return True


class _ShimOnImport:
    """A meta-path finder that applies a shim just before its package's first import, then steps aside."""

    shims = {"torchvision": shim_torchvision, "torchaudio": shim_torchaudio}

    def __init__(self):
        self.pending = dict(self.shims)

    def find_spec(self, name, path=None, target=None):
        shim = self.pending.pop(name, None)  # popped first: the shim's own find_spec calls come back here
        if shim is not None:
            shim()
        return None  # the regular finders import the package


def install_import_hook() -> None:
    if not any(isinstance(finder, _ShimOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _ShimOnImport())


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit(__doc__)
    comfyui_dir = os.path.abspath(argv[1])
    main_py = os.path.join(comfyui_dir, "main.py")
    global VERBOSE
    VERBOSE = True
    shim_torchvision()
    shim_torchaudio()
    # Behave like `python main.py ...` run from the checkout: its folder first on sys.path (and
    # this tests folder off it), argv[0] the script.
    sys.path[0] = comfyui_dir
    sys.argv = [main_py, *argv[2:]]
    import runpy

    runpy.run_path(main_py, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv)
