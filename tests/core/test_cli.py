"""The `flux2-lora` contract, exercised as users and scripts run it: a real subprocess each time.

Exit codes: 0 ok, 1 the input is unusable (message, no traceback), 2 bad usage.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from flux2_lora_core import __version__

ROOT = Path(__file__).resolve().parents[2]


def flux2_lora(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "flux2_lora_core", *args], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def make_dataset(folder: Path, n: int = 3, size: int = 640) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (size, size - 64 * i), (40 * i, 90, 200)).save(folder / f"img_{i}.jpg", quality=90)
        (folder / f"img_{i}.txt").write_text(f"a photo of thing number {i}")
    return folder


def assert_no_traceback(result: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in result.stderr + result.stdout, result.stderr


def test_version():
    result = flux2_lora("--version")
    assert result.returncode == 0
    assert __version__ in result.stdout


@pytest.mark.skipif(shutil.which("flux2-lora", path=str(Path(sys.executable).parent)) is None,
                    reason="package not installed in this environment (scripts/test.sh installs it)")
def test_console_script_is_installed():
    script = shutil.which("flux2-lora", path=str(Path(sys.executable).parent))
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for command in ("validate", "tiny-model"):
        assert command in result.stdout


def test_validate_usable_dataset_exits_0_with_a_table(tmp_path):
    data = make_dataset(tmp_path / "data")
    result = flux2_lora("validate", str(data))
    assert result.returncode == 0, result.stdout + result.stderr
    first_line = result.stdout.splitlines()[0]
    assert str(data) in first_line and "NOT USABLE" not in first_line
    assert "3 found, 3 usable, 3 with a caption" in result.stdout
    assert "latent cache" in result.stdout


def test_validate_reports_an_edit_datasets_references_unless_told_not_to(tmp_path):
    from flux2_lora_core.data.demo_data import write_demo_dataset

    data = write_demo_dataset(tmp_path / "edit", count=2, size=256, edit=True)
    result = flux2_lora("validate", str(data))
    assert result.returncode == 0 and "2 of 2 images have reference images (2 files)" in result.stdout, result.stdout
    plain = flux2_lora("validate", str(data), "--no-references")
    assert plain.returncode == 0 and "have reference images" not in plain.stdout and "2 found, 2 usable" in plain.stdout
    assert "2 images are reference images by their names (demo_00_ref.png, ...)" in plain.stdout   # said, not lost


def test_validate_json_is_machine_readable(tmp_path):
    data = make_dataset(tmp_path / "data")
    result = flux2_lora("validate", str(data), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["usable"] is True
    assert {"usable", "root", "summary", "stats", "problems"} <= report.keys()


def test_validate_names_every_bad_file_skipping_them_or_exiting_1_when_strict(tmp_path):
    data = make_dataset(tmp_path / "data")
    (data / "broken.png").write_bytes(b"this is not a png")
    (data / "empty.jpg").write_bytes(b"")
    result = flux2_lora("validate", str(data), "--json")
    assert result.returncode == 0  # 3 good images: the 2 bad files are skipped, as cache and train skip them
    assert_no_traceback(result)
    report = json.loads(result.stdout)
    assert report["usable"] is True and report["summary"]["skipped_images"] == ["empty.jpg", "broken.png"]
    named = {p["path"] for p in report["problems"] if p["severity"] == "error"}
    assert {"broken.png", "empty.jpg"} <= named
    human = flux2_lora("validate", str(data), "--strict")
    assert human.returncode == 1
    assert_no_traceback(human)
    assert "broken.png" in human.stdout and "empty.jpg" in human.stdout and "NOT USABLE" in human.stdout


def test_validate_strict_turns_warnings_into_failure(tmp_path):
    data = make_dataset(tmp_path / "data")
    (data / "img_0.txt").unlink()  # a missing caption is a warning
    assert flux2_lora("validate", str(data)).returncode == 0
    strict = flux2_lora("validate", str(data), "--strict")
    assert strict.returncode == 1
    assert "img_0" in strict.stdout


def test_validate_min_images(tmp_path):
    data = make_dataset(tmp_path / "data", n=2)
    result = flux2_lora("validate", str(data), "--min-images", "5")
    assert result.returncode == 1
    assert "5" in result.stdout


def test_validate_missing_folder_exits_1_with_a_message(tmp_path):
    missing = tmp_path / "no_such_folder"
    result = flux2_lora("validate", str(missing))
    assert result.returncode == 1
    assert_no_traceback(result)
    assert str(missing) in result.stderr


@pytest.mark.parametrize("args", [
    [],
    ["validate"],
    ["validate", ".", "--min-images", "0"],
    ["validate", ".", "--resolution", "1000"],
    ["validate", ".", "--resolution", "big"],
    ["validate", ".", "--no-such-flag"],
    ["tiny-model", "x", "--variant", "schnell"],
    ["no-such-command"],
])
def test_bad_usage_exits_2(args):
    result = flux2_lora(*args)
    assert result.returncode == 2, (args, result.stdout, result.stderr)
    assert_no_traceback(result)
    assert "usage:" in result.stderr


def test_tiny_model_refuses_to_write_into_a_non_empty_folder(tmp_path):
    keep = tmp_path / "mine.txt"
    keep.write_text("user data")
    result = flux2_lora("tiny-model", str(tmp_path))
    assert result.returncode == 1
    assert_no_traceback(result)
    assert keep.read_text() == "user data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


@pytest.mark.parametrize("fmt,expected", [
    ("diffusers", ["model_index.json", "transformer", "vae", "text_encoder", "tokenizer", "scheduler"]),
    ("comfyui", ["diffusion_models", "vae", "text_encoders", "tokenizer"]),
])
def test_tiny_model_writes_a_model(tmp_path, fmt, expected):
    out = tmp_path / "tiny"
    result = flux2_lora("tiny-model", str(out), "--variant", "klein", "--format", fmt)
    assert result.returncode == 0, result.stderr
    assert str(out) in result.stdout
    assert set(expected) <= {p.name for p in out.iterdir()}


def test_cache_encodes_once_then_reuses_and_reports_bad_settings(tmp_path):
    assert flux2_lora("tiny-model", str(tmp_path / "tiny"), "--variant", "dev").returncode == 0
    data = make_dataset(tmp_path / "data", size=384)  # every short side >= 256 px: none is skipped as too small
    (tmp_path / "cache.yaml").write_text(f"model:\n  path: {tmp_path / 'tiny'}\ndata:\n  path: {data}\n"
                                         f"  resolution: 64\ncache:\n  dir: {tmp_path / 'cache'}\n")
    first = flux2_lora("cache", "--config", str(tmp_path / "cache.yaml"))
    assert first.returncode == 0, first.stderr
    assert "latents: 3 encoded, 0 reused; captions: 4 encoded" in first.stdout
    assert "item/s" in first.stderr  # the progress bar: rate and ETA
    second = flux2_lora("cache", "--config", str(tmp_path / "cache.yaml"), "data.flip=true")
    assert second.returncode == 0, second.stderr
    assert "latents: 3 encoded, 3 reused; captions: 0 encoded, 4 reused" in second.stdout  # only the mirrored
    bad = flux2_lora("cache", "--config", str(tmp_path / "cache.yaml"), "data.resolutoin=512", "cache.batch_size=0",
                     "model.dtype=fp12")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    for key in ("data.resolutoin", "did you mean `data.resolution`", "cache.batch_size", "model.dtype"):
        assert key in bad.stderr
    missing = flux2_lora("cache", f"data.path={data}", f"model.path={tmp_path / 'nowhere'}")
    assert missing.returncode == 1 and "model.path" in missing.stderr and "Traceback" not in missing.stderr


def test_overrides_may_follow_the_options():
    from flux2_lora_core.cli import parse_args

    args = parse_args(["resume", "runs/x", "train.seed=3", "--steps", "500", "train.lr=5e-5"])
    assert (args.path, args.steps, args.overrides) == ("runs/x", 500, ["train.seed=3", "train.lr=5e-5"])
    args = parse_args(["train", "--preset", "character", "model.path=m", "data.path=d"])
    assert args.overrides == ["model.path=m", "data.path=d"]


def test_unknown_options_still_stop_with_usage(capsys):
    from flux2_lora_core.cli import parse_args

    for argv in (["resume", "runs/x", "--steps", "5", "--bogus"], ["export", "lora.safetensors", "extra=1"]):
        with pytest.raises(SystemExit) as exc:
            parse_args(argv)
        assert exc.value.code == 2
        assert "unrecognized arguments" in capsys.readouterr().err
