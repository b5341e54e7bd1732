"""A tiny generated dataset for the one-command demo: one recognisable concept, nothing downloaded.

Every image shows the concept, a bold orange ring with a dark rim, at a different place and size on
a varied gradient background with a few muted shapes; square, landscape and portrait images exercise
the aspect buckets. Captions start with the trigger phrase and describe what varies. The same seed
gives the same bytes (Pillow's PNG writer stores no timestamps).

`edit=True` writes an edit dataset instead: beside each `demo_NN.png` its reference `demo_NN_ref.png`, the very
same picture without the ring, and a caption that asks for the ring ("add a zxq ring ..."): an edit LoRA that
learns to add the concept to a given picture.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

from PIL import Image, ImageDraw

from ..errors import ConfigError, DatasetError
from .validation import MIN_SIDE, SMALL_SIDE

TRIGGER = "zxq ring"  # what the demo's sample prompts use to call up the concept
SHAPES = ((1, 1), (3, 2), (2, 3))  # width:height of the images, in turn: square, landscape, portrait
BACKGROUNDS = (  # name, top colour, bottom colour
    ("pale blue", (170, 205, 235), (110, 150, 200)), ("teal", (60, 140, 140), (20, 80, 90)),
    ("sandy", (235, 215, 170), (200, 170, 120)), ("grey", (190, 190, 195), (120, 120, 130)),
    ("dark green", (50, 95, 60), (20, 50, 30)), ("lilac", (205, 185, 225), (150, 120, 180)),
)
RING, RIM = (255, 128, 0), (90, 40, 0)


def write_demo_dataset(folder, *, count: int = 8, size: int = 512, seed: int = 0, edit: bool = False) -> Path:
    """Write `count` PNG images with .txt captions into `folder` (created if missing) and return it.

    `size` is the short side in pixels; landscape and portrait images are 3:2. The validator calls a
    short side under 256 px unusable and one under 512 px small, so 512 gives a dataset with no warnings.
    Raises DatasetError when `folder` exists and is not an empty folder: nothing is ever overwritten.
    """
    problems = []
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        problems.append(("count", f"{count!r} must be a whole number of at least 1"))
    if isinstance(size, bool) or not isinstance(size, int) or size < MIN_SIDE:
        problems.append(("size", f"{size!r} must be a whole number of at least {MIN_SIDE} (the validator's "
                                 f"smallest usable short side; {SMALL_SIDE} avoids its small-image warning)"))
    if problems:
        raise ConfigError(problems)
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise DatasetError(f"{folder}: exists and is not a folder; choose a new folder for the demo dataset")
    if folder.is_dir() and any(folder.iterdir()):
        raise DatasetError(f"{folder}: is not empty; the demo dataset is only written into a new or empty "
                           "folder (nothing is overwritten), so choose another folder")
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(count):
        wide, high = SHAPES[i % len(SHAPES)]
        width, height = size * wide // min(wide, high), size * high // min(wide, high)
        image, before, caption, instruction = _draw(rng, width, height)
        if edit:
            _write_png(before, folder / f"demo_{i:02d}_ref.png")
            caption = instruction
        _write_png(image, folder / f"demo_{i:02d}.png")
        with open(folder / f"demo_{i:02d}.txt", "x", encoding="utf-8", newline="\n") as f:
            f.write(caption + "\n")
    return folder


def _write_png(image: Image.Image, path: Path) -> None:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    with open(path, "xb") as f:  # "x": fail rather than overwrite, even in a race
        f.write(buf.getvalue())


def _draw(rng: random.Random, width: int, height: int) -> tuple[Image.Image, Image.Image, str, str]:
    """One image of the ring, the same image before the ring was drawn, its caption, and the edit instruction
    that turns the second into the first."""
    name, top, bottom = rng.choice(BACKGROUNDS)
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    for y in range(height):  # vertical gradient
        t = y / max(1, height - 1)
        draw.line([(0, y), (width, y)], fill=tuple(round(a + (b - a) * t) for a, b in zip(top, bottom)))
    short = min(width, height)
    for _ in range(rng.randint(2, 4)):  # muted distractors: squares and bars, never rings
        x, y, s = rng.randrange(width), rng.randrange(height), rng.randint(short // 10, short // 4)
        shade = tuple(round(c * rng.uniform(0.75, 0.95)) for c in bottom)
        draw.rectangle([x, y, x + s, y + s // rng.choice((1, 3))], fill=shade)
    scale = rng.choice(("small", "medium", "large"))
    radius = round(short * {"small": 0.16, "medium": 0.25, "large": 0.36}[scale] * rng.uniform(0.9, 1.1))
    cx = rng.randint(radius + 2, width - radius - 2)
    cy = rng.randint(radius + 2, height - radius - 2)
    before = image.copy()
    box = [cx - radius, cy - radius, cx + radius, cy + radius]
    thickness = max(3, radius * 2 // 5)
    draw.ellipse(box, outline=RIM, width=thickness)  # dark rim, then the orange band inside it
    inset = max(1, thickness // 6)
    draw.ellipse([box[0] + inset, box[1] + inset, box[2] - inset, box[3] - inset], outline=RING,
                 width=thickness - 2 * inset)
    where = (("top" if cy < height / 3 else "bottom" if cy > 2 * height / 3 else "middle") + " "
             + ("left" if cx < width / 3 else "right" if cx > 2 * width / 3 else "centre")).replace("middle centre",
                                                                                                   "centre")
    shape = "square" if width == height else "wide" if width > height else "tall"
    caption = f"{TRIGGER}, a {scale} bold orange ring in the {where} of a {shape} picture, on a {name} background"
    return image, before, caption, f"add a {scale} {TRIGGER} in the {where} of the picture"
