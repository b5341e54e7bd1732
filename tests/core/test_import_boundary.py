"""The architecture's one hard boundary: the engine never imports ComfyUI, and the pack imports lightly.

ComfyUI users install the pack by cloning it into custom_nodes/, so the engine must also work when
it is found relatively, and importing the pack must never cost a torch import before ComfyUI asks.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]
COMFY_MODULES = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "comfy_config", "folder_paths", "server",
                 "execution", "nodes"}


def imported_top_level_names(path: Path) -> set[tuple[str, int]]:
    """Absolute imports only: a relative `from .nodes import x` is the pack's own module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {(alias.name.split(".")[0], node.lineno) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add((node.module.split(".")[0], node.lineno))
    return found


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT.parent, capture_output=True, text=True, timeout=300)


def test_engine_sources_never_import_comfyui():
    offenders = [f"{path.relative_to(ROOT)}:{line} imports {name}"
                 for path in sorted((ROOT / "flux2_lora_core").rglob("*.py"))
                 for name, line in imported_top_level_names(path) if name in COMFY_MODULES]
    assert not offenders, "\n".join(offenders)


def test_importing_every_engine_module_loads_no_comfyui_module():
    code = f"""
import importlib, pkgutil, sys
sys.path.insert(0, {str(ROOT)!r})
import flux2_lora_core
for info in pkgutil.walk_packages(flux2_lora_core.__path__, "flux2_lora_core."):
    if info.name != "flux2_lora_core.__main__":
        importlib.import_module(info.name)
bad = sorted(m for m in sys.modules if m.split(".")[0] in {sorted(COMFY_MODULES)!r})
print("LOADED", bad)
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert "LOADED []" in result.stdout, result.stdout


def test_engine_package_import_is_light():
    result = run_python(f"import sys; sys.path.insert(0, {str(ROOT)!r}); import flux2_lora_core, flux2_lora_core.errors; "
                        "print('HEAVY', sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout


def test_pack_root_imports_outside_comfyui_without_heavy_modules():
    # ComfyUI loads the pack from its folder under whatever name the user cloned it as.
    code = f"""
import importlib.util, inspect, sys
spec = importlib.util.spec_from_file_location("some_clone_name", {str(ROOT / "__init__.py")!r},
                                              submodule_search_locations=[{str(ROOT)!r}])
pack = importlib.util.module_from_spec(spec); sys.modules[spec.name] = pack; spec.loader.exec_module(pack)
assert inspect.iscoroutinefunction(pack.comfy_entrypoint)
assert not hasattr(pack, "NODE_CLASS_MAPPINGS")
print("WEB", pack.WEB_DIRECTORY)
print("HEAVY", sorted(m for m in ("torch", "comfy_api", "folder_paths") if m in sys.modules))
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout
    web = result.stdout.split("WEB ")[1].split()[0]
    assert (ROOT / web).is_dir()


def test_nodes_reach_the_engine_relatively():
    # A clone in custom_nodes/ gets requirements.txt installed, not this package: an absolute
    # `import flux2_lora_core` in a node would fail there.
    offenders = [f"{path.relative_to(ROOT)}:{line}" for path in sorted((ROOT / "nodes").rglob("*.py"))
                 for name, line in imported_top_level_names(path) if name == "flux2_lora_core"]
    assert not offenders, offenders


def test_only_the_engine_is_installed():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    assert packages == ["flux2_lora_core", "flux2_lora_core.*"], packages
    assert pyproject["project"]["scripts"]["flux2-lora"] == "flux2_lora_core.cli:main"
    assert not any(d.startswith("torch") and any(op in d for op in ("==", "<")) for d in pyproject["project"]["dependencies"])


def test_requirements_txt_matches_pyproject_without_torch():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    runtime = {d for d in pyproject["project"]["dependencies"] if not d.startswith("torch")}
    lines = {l.strip() for l in (ROOT / "requirements.txt").read_text().splitlines() if l.strip() and not l.startswith("#")}
    assert lines == runtime
