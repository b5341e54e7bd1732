"""The wheel users install holds every shipped config and none of the ComfyUI-only folders."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_ships_every_config_and_no_nodes_folder(tmp_path):
    # A non-editable install reads configs from the wheel: a missing one means "cannot detect the variant"
    # only for users who pip-install, never in an editable checkout.
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(tmp_path / "dist"), str(ROOT)], capture_output=True, text=True,
                            cwd=tmp_path, timeout=300)
    if result.returncode and "No module named pip" in result.stderr:
        pytest.skip("pip is not available in this interpreter")
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.relative_to(ROOT).as_posix() for p in (ROOT / "flux2_lora_core" / "configs").rglob("*.json")}
    assert shipped and shipped <= names, sorted(shipped - names)
    assert not any(name.startswith(("nodes/", "web/", "tests/")) for name in names)
    assert "flux2_lora_core/cli.py" in names
