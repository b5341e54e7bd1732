"""What importing costs: the engine package, the CLI's start, and the pack as ComfyUI loads it.

ComfyUI imports every custom-node pack at start, so the pack must cost it almost nothing; `flux2-lora --help`
and `validate` should start without torch. Each figure is measured in fresh interpreters, the checkouts given
alternating so machine noise hits them alike, and reported as a median with its ratio to the first checkout:

- engine: `python -X importtime -c "import flux2_lora_core"`, the package's cumulative time.
- cli: the same for `flux2_lora_core.cli` (what `flux2-lora --help` imports), and whether torch came with it.
- pack in ComfyUI (with --comfyui DIR and a --python that has ComfyUI's requirements): ComfyUI's own modules
  imported first (its `nodes`, which loads torch and transformers, as at a real start), then the pack loaded the
  way ComfyUI loads a custom node (spec from the folder's __init__.py, `comfy_entrypoint()`, `on_load()`,
  `get_node_list()`, each node's `GET_SCHEMA()`), timed with perf_counter; the third-party packages the pack
  brought in that ComfyUI had not are listed.

    python benchmarks/import_cost.py                              # this checkout
    git worktree add /tmp/before <commit>
    python benchmarks/import_cost.py . /tmp/before --comfyui ../shared/comfyui --python /path/to/comfy-venv/python
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "tests" / "integration" / "comfyui_launcher.py"

# Runs in a fresh interpreter: ComfyUI first, then the pack as ComfyUI's load_custom_node does it.
PACK_IN_COMFYUI = r"""
import asyncio, importlib.util, json, sys, time
tree, comfyui, launcher = sys.argv[1:4]
spec = importlib.util.spec_from_file_location("comfyui_launcher", launcher)
shims = importlib.util.module_from_spec(spec); spec.loader.exec_module(shims)
shims.shim_torchvision(); shims.shim_torchaudio()
sys.path.insert(0, comfyui); sys.argv = [sys.argv[0], "--cpu"]
import comfy.options; comfy.options.enable_args_parsing()
import nodes, folder_paths, comfy_api.latest, comfy.model_management, comfy.utils  # what ComfyUI has loaded
before = {m.split(".")[0] for m in sys.modules}
start = time.perf_counter()
spec = importlib.util.spec_from_file_location("flux2_pack", tree + "/__init__.py", submodule_search_locations=[tree])
pack = importlib.util.module_from_spec(spec); sys.modules[spec.name] = pack; spec.loader.exec_module(pack)
async def load():  # what ComfyUI's load_custom_node does with a V3 pack
    extension = await pack.comfy_entrypoint()
    await extension.on_load()
    node_list = await extension.get_node_list()
    for node in node_list:
        node.GET_SCHEMA()
    return node_list
node_list = asyncio.run(load())
seconds = time.perf_counter() - start
new = sorted({m.split(".")[0] for m in sys.modules} - before - {"flux2_pack"})
print(json.dumps({"seconds": seconds, "nodes": len(node_list), "new_packages": new}))
"""


def importtime(python: str, tree: Path, module: str) -> tuple[float, bool]:
    """(seconds, torch imported) for `import module` from `tree`, by -X importtime's cumulative column."""
    code = f"import {module}, sys; print('TORCH', 'torch' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(tree)}
    result = subprocess.run([python, "-X", "importtime", "-c", code], capture_output=True, text=True, env=env,
                            cwd="/", check=True)
    for line in result.stderr.splitlines():  # "import time: self [us] | cumulative | imported package"
        parts = [p.strip() for p in line.removeprefix("import time:").split("|")]
        if len(parts) == 3 and parts[2] == module:
            return int(parts[1]) / 1e6, "TORCH True" in result.stdout
    raise RuntimeError(f"no importtime line for {module} from {tree}:\n{result.stderr[-2000:]}")


def pack_in_comfyui(python: str, tree: Path, comfyui: Path) -> dict:
    result = subprocess.run([python, "-c", PACK_IN_COMFYUI, str(tree), str(comfyui), str(LAUNCHER)],
                            capture_output=True, text=True, cwd="/", timeout=600)
    if result.returncode:
        raise RuntimeError(f"loading the pack from {tree} in ComfyUI failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def report(name: str, trees: list[Path], samples: dict[Path, list[float]], unit: float = 1e3) -> None:
    base = statistics.median(samples[trees[0]])
    for tree in trees:
        median = statistics.median(samples[tree])
        print(f"  {name:<18} {str(tree):<40} median {median * unit:8.1f} ms  "
              f"(min {min(samples[tree]) * unit:.1f}, max {max(samples[tree]) * unit:.1f}, n={len(samples[tree])})"
              f"  x{median / base:.2f} of the first")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="*", type=Path, default=[ROOT], help="checkouts to compare (default: this one)")
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--python", default=sys.executable, help="interpreter for the ComfyUI measurement")
    parser.add_argument("--comfyui", type=Path, help="a ComfyUI checkout: also time the pack as ComfyUI loads it")
    args = parser.parse_args()
    trees = [t.resolve() for t in args.trees]
    engine, cli, pack = ({t: [] for t in trees} for _ in range(3))
    torch_in_cli, extra = {}, {}
    for _ in range(args.repeat):
        for tree in trees:
            engine[tree].append(importtime(sys.executable, tree, "flux2_lora_core")[0])
            seconds, torch_in_cli[tree] = importtime(sys.executable, tree, "flux2_lora_core.cli")
            cli[tree].append(seconds)
            if args.comfyui:
                result = pack_in_comfyui(args.python, tree, args.comfyui.resolve())
                pack[tree].append(result["seconds"])
                extra[tree] = result
    print(f"{args.repeat} fresh interpreters per figure and checkout, alternating; {sys.executable}")
    report("engine import", trees, engine)
    report("cli import", trees, cli)
    for tree in trees:
        print(f"  cli imports torch: {torch_in_cli[tree]}  ({tree})")
    if args.comfyui:
        report("pack in ComfyUI", trees, pack)
        for tree in trees:
            print(f"  pack: {extra[tree]['nodes']} nodes; packages it added to ComfyUI's: "
                  f"{', '.join(extra[tree]['new_packages']) or 'none'}  ({tree})")


if __name__ == "__main__":
    main()
