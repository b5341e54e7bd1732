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

This is a test-environment measure only: nothing in the pack depends on it.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import runpy
import sys
import types


def _library_loads(pattern: str) -> bool:
    """Whether the compiled library at the (glob) path loads next to this torch build."""
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

    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    shim_torchvision.library = lib  # a Library deregisters its ops when garbage-collected
    print("[comfyui_launcher] torchvision's C library cannot load next to this torch: "
          "defined the torchvision::nms/qnms schemas", file=sys.stderr)


def shim_torchaudio() -> None:
    """Replace torchaudio._extension with the 'compiled extension not available' state."""
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
    print("[comfyui_launcher] torchaudio's C library cannot load next to this torch: "
          "stubbed torchaudio._extension", file=sys.stderr)


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit(__doc__)
    comfyui_dir = os.path.abspath(argv[1])
    main_py = os.path.join(comfyui_dir, "main.py")
    shim_torchvision()
    shim_torchaudio()
    # Behave like `python main.py ...` run from the checkout: its folder first on sys.path (and
    # this tests folder off it), argv[0] the script.
    sys.path[0] = comfyui_dir
    sys.argv = [main_py, *argv[2:]]
    runpy.run_path(main_py, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv)
