"""The wheel users install holds every engine module and shipped config, and none of the ComfyUI-only folders."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_ships_every_module_and_config_and_no_nodes_folder(tmp_path):
    # A non-editable install reads configs from the wheel: a missing one means "cannot detect the variant"
    # only for users who pip-install, never in an editable checkout. The build runs on a copy: setuptools'
    # build/ folder in a checkout can hold modules from before a move, which must not hide a missing one.
    source = tmp_path / "source"
    shutil.copytree(ROOT / "flux2_lora_core", source / "flux2_lora_core", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True,
                            cwd=tmp_path, timeout=300)
    if result.returncode and "No module named pip" in result.stderr:
        pytest.skip("pip is not available in this interpreter")
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = {n for n in zipfile.ZipFile(wheel).namelist() if ".dist-info/" not in n}
    package = ROOT / "flux2_lora_core"
    expected = {p.relative_to(ROOT).as_posix() for p in package.rglob("*")
                if p.is_file() and p.suffix in (".py", ".json") and "__pycache__" not in p.parts}
    assert any(n.startswith("flux2_lora_core/models/configs/") for n in expected)
    assert names == expected, (sorted(expected - names), sorted(names - expected))
