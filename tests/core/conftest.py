"""Fixtures that write real image files with Pillow into tmp_path, including hostile ones.

Helpers are fixtures returning functions (tests cannot import a conftest under --import-mode=importlib).
"""

from __future__ import annotations

import hashlib
import os
import struct
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # the engine is importable from a plain checkout, installed or not
    sys.path.insert(0, str(ROOT))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A PNG whose header claims width x height RGB pixels; only a few hundred bytes on disk."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b""))


@pytest.fixture
def make_image():
    """make_image(path, size=(64, 64), color="red", mode="RGB", **save_kwargs) -> Path.

    Noise is added (seeded) so that different calls give different bytes unless `noise=False`.
    """
    def make(path, size=(64, 64), color="red", mode="RGB", noise=True, **save_kwargs) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        im = Image.new(mode, size, color)
        if noise and mode == "RGB":  # a few pixels from the path's hash: distinct files, distinct bytes
            digest = hashlib.sha256(str(path).encode("utf-8", "surrogateescape")).digest()
            for i in range(min(8, size[0])):
                im.putpixel((i, 0), tuple(digest[3 * i: 3 * i + 3]))
        fmt = save_kwargs.pop("format", None)
        im.save(path, format=fmt, **save_kwargs)
        return path

    return make


@pytest.fixture
def write_text():
    def write(path, text, encoding="utf-8") -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text if isinstance(text, bytes) else text.encode(encoding))
        return path

    return write


@pytest.fixture
def truncated_copy():
    """truncated_copy(src, dst, keep=0.5): dst holds the first `keep` fraction of src's bytes."""
    def cut(src, dst, keep=0.5) -> Path:
        data = Path(src).read_bytes()
        Path(dst).write_bytes(data[: int(len(data) * keep)])
        return Path(dst)

    return cut


@pytest.fixture
def bomb_bytes():
    return bomb_png


@pytest.fixture
def hostile_dataset(tmp_path, make_image, write_text, truncated_copy):
    """A folder holding one of every problem validate_dataset must report, and two good pairs.

    Returns (root, expected) where expected maps relative path -> problem code.
    """
    root = tmp_path / "hostile"
    make_image(root / "good1.jpg", (640, 640), "red", quality=90)
    write_text(root / "good1.txt", "a red square")
    make_image(root / "good2.png", (700, 600), "green")
    write_text(root / "good2.txt", "a green square")
    (root / "empty.png").write_bytes(b"")
    write_text(root / "text.png", "this is not an image\n")
    write_text(root / "page.jpg", "<!DOCTYPE html><html><body>404 Not Found</body></html>")
    big = make_image(tmp_path / "src" / "big.jpg", (800, 800), "blue", quality=95)
    truncated_copy(big, root / "cut.jpg")
    bigpng = make_image(tmp_path / "src" / "big.png", (300, 300), "blue")
    Image.effect_noise((300, 300), 64).convert("RGB").save(bigpng)  # noise: the cut lands inside IDAT
    truncated_copy(bigpng, root / "cut.png")
    (root / "folder.jpg").mkdir()
    os.mkfifo(root / "pipe.png")
    os.symlink("loop.png", root / "loop.png")
    (root / "bomb.png").write_bytes(bomb_png())
    make_image(root / "tiny.png", (100, 80), "white")
    make_image(root / "small.png", (400, 300), "white")
    make_image(root / "nocap.jpg", (600, 600), "yellow")
    make_image(root / "badcap.png", (600, 600), "purple")
    write_text(root / "badcap.txt", b"caf\xe9 au lait")
    make_image(root / "blank.png", (600, 600), "orange")
    write_text(root / "blank.txt", "   \n  ")
    make_image(root / "long.png", (600, 600), "pink")
    write_text(root / "long.txt", "word " * 2_000_000)  # 10 MB: must be read only in part
    write_text(root / "orphan.txt", "an orphan caption")
    dup = make_image(root / "dup_a.png", (600, 600), "cyan", noise=False)
    (root / "dup_b.png").write_bytes(dup.read_bytes())
    frames = [Image.new("RGB", (600, 600), c) for c in ("red", "blue")]
    frames[0].save(root / "anim.webp", save_all=True, append_images=frames[1:])
    make_image(root / "clip.gif", (600, 600), "red")
    expected = {
        "empty.png": "empty_file", "text.png": "not_an_image", "page.jpg": "not_an_image",
        "cut.jpg": "truncated_image", "cut.png": "truncated_image", "pipe.png": "not_an_image",
        "loop.png": "unreadable_image", "bomb.png": "decompression_bomb", "tiny.png": "too_small",
        "small.png": "small_image", "nocap.jpg": "missing_caption", "badcap.txt": "caption_not_utf8",
        "blank.txt": "empty_caption", "long.txt": "caption_too_long", "orphan.txt": "orphan_caption",
        "dup_a.png": "duplicate_image", "anim.webp": "animated_image", "clip.gif": "missing_caption",
    }
    return root, expected


@pytest.fixture(scope="session")
def training_files(tmp_path_factory):
    """training_files(variant="klein", images=4) -> a folder holding model/ (a tiny FLUX.2 diffusers folder) and
    data/ (a generated, captioned dataset), written once per session and shared by the training tests."""
    made = {}

    def make(variant: str = "klein", images: int = 4) -> Path:
        from flux2_lora_core.data.demo_data import write_demo_dataset
        from flux2_lora_core.models.tiny_models import write_tiny_model

        if (variant, images) not in made:
            root = tmp_path_factory.mktemp(f"training-{variant}-{images}")
            write_tiny_model(root / "model", variant=variant)
            write_demo_dataset(root / "data", count=images, size=256)
            made[variant, images] = root
        return made[variant, images]

    return make


@pytest.fixture(scope="session")
def stop_after():
    """Callbacks that ask the trainer to stop once step N is done: `train(config, stop_after(N))` (what Ctrl+C and
    ComfyUI's Stop and save ask for)."""
    from flux2_lora_core.training import Callbacks

    class StopAfter(Callbacks):
        def __init__(self, steps):
            self.steps, self.seen = steps, 0

        def on_step(self, report):
            self.seen = report.step

        def should_stop(self):
            return self.seen >= self.steps

    return StopAfter
