"""The generated demo dataset: deterministic, valid for the project's validator, never overwriting."""

from __future__ import annotations

import pytest
from PIL import Image

from flux2_lora_core.data.demo_data import TRIGGER, write_demo_dataset
from flux2_lora_core.data.validation import validate_dataset
from flux2_lora_core.errors import ConfigError, DatasetError


def contents(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    a = contents(write_demo_dataset(tmp_path / "a", seed=3))
    b = contents(write_demo_dataset(tmp_path / "b", seed=3))
    c = contents(write_demo_dataset(tmp_path / "c", seed=4))
    assert a == b and len(a) == 16
    assert a["demo_00.png"] != c["demo_00.png"]


def test_images_captions_and_aspects(tmp_path):
    folder = write_demo_dataset(tmp_path / "demo", count=6, size=256)
    sizes = set()
    for png in sorted(folder.glob("*.png")):
        with Image.open(png) as im:
            assert im.format == "PNG" and im.mode == "RGB"
            sizes.add(im.size)
            assert im.getpixel((0, 0)) != (255, 128, 0)
        caption = png.with_suffix(".txt").read_text(encoding="utf-8")
        assert caption.startswith(TRIGGER + ", ") and caption.endswith("\n")
    assert sizes == {(256, 256), (384, 256), (256, 384)}
    assert len({p.read_text() for p in folder.glob("*.txt")}) > 1  # descriptions vary


def test_validates_as_usable_without_warnings(tmp_path):
    report = validate_dataset(write_demo_dataset(tmp_path / "demo"), resolution=64)
    assert report.usable and not report.problems, report.format_text()
    assert report.stats["images"]["valid_pairs"] == 8
    assert len(report.stats["buckets"]["counts"]) == 3


def test_refuses_a_non_empty_folder_and_bad_arguments(tmp_path):
    folder = tmp_path / "taken"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    with pytest.raises(DatasetError, match="not empty"):
        write_demo_dataset(folder)
    assert [p.name for p in folder.iterdir()] == ["keep.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(DatasetError, match="not a folder"):
        write_demo_dataset(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    assert len(list(write_demo_dataset(tmp_path / "empty", count=1).iterdir())) == 2
    with pytest.raises(ConfigError) as info:
        write_demo_dataset(tmp_path / "new", count=0, size=96)
    assert {key for key, _ in info.value.problems} == {"count", "size"}
    assert not (tmp_path / "new").exists()
