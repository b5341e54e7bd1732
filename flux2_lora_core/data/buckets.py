"""Aspect-ratio buckets: training sizes of about resolution**2 pixels, and how an image fits one.

FLUX.2 needs sides that are multiples of 16 (8x VAE downsampling, then 2x2 patches), and every
sample in a batch must share one size, so images are grouped into buckets of equal area and
different shapes instead of all being cropped square.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from ..errors import ConfigError


def make_buckets(resolution: int, *, step: int = 16, min_side: int | None = None, max_side: int | None = None,
                 max_aspect: float = 4.0) -> list[tuple[int, int]]:
    """(width, height) pairs, sides multiples of `step`, area at most resolution**2 and as close to it
    as the step allows, long/short side at most `max_aspect`; sorted by width. Always holds the square.

    For each short side the long side is the largest multiple of `step` keeping the area within budget
    (kohya's rule: memory use never exceeds the square bucket's), so no two buckets share a short side.
    """
    problems = []
    if step < 1:
        problems.append(("step", f"{step!r} must be at least 1"))
    elif resolution < step or resolution % step:
        problems.append(("resolution", f"{resolution!r} must be a positive multiple of {step}"))
    if max_aspect < 1:
        problems.append(("max_aspect", f"{max_aspect!r} must be at least 1"))
    if problems:
        raise ConfigError(problems)
    lo = step if min_side is None else max(step, min_side)
    hi = max_side if max_side is not None else math.ceil(resolution * math.sqrt(max_aspect))
    if lo > resolution or hi < resolution:
        raise ConfigError([("min_side" if lo > resolution else "max_side",
                            f"sides {lo}..{hi} exclude the square {resolution}x{resolution} bucket")])
    area = resolution * resolution
    buckets = set()
    for short in range(-(-lo // step) * step, resolution + 1, step):
        long = min(area // short // step, hi // step) * step  # the widest shape for this short side
        if long >= short and long / short <= max_aspect + 1e-9:
            buckets |= {(short, long), (long, short)}
    return sorted(buckets)


def assign_bucket(width: int, height: int, buckets) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to width/height in log space (so 2:1 and 1:2 are as
    far from 1:1). Ties go to the larger area, then the smaller width: the same answer every run."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size {width}x{height} must be positive")
    target = math.log(width / height)
    return min(buckets, key=lambda b: (round(abs(math.log(b[0] / b[1]) - target), 12), -b[0] * b[1], b[0]))


@dataclass(frozen=True)
class Fit:
    """Resize to `scaled` (width, height), then crop `box` (left, top, right, bottom) to the bucket."""

    scaled: tuple[int, int]
    box: tuple[int, int, int, int]


def fit_to_bucket(width: int, height: int, bucket: tuple[int, int]) -> Fit:
    """Scale so the image covers the bucket (never leaves a border), then centre-crop the excess:
    the smallest crop that gives the bucket's exact size."""
    bw, bh = bucket
    scale = max(bw / width, bh / height)
    sw, sh = max(bw, round(width * scale)), max(bh, round(height * scale))
    left, top = (sw - bw) // 2, (sh - bh) // 2
    return Fit((sw, sh), (left, top, left + bw, top + bh))


def bucket_batches(groups: dict, repeats, batch_size: int, *, seed: int, epoch: int) -> list[list[int]]:
    """One epoch of batches, each from a single bucket: every index appears `repeats[index]` times.

    The transformer reads one set of position ids per batch, so a batch can never mix sizes. Within a
    bucket the samples are shuffled, then cut into batches (the last one may be smaller: no image is
    dropped); the batches of all buckets are then shuffled together. The result is a pure function of
    (groups, repeats, batch_size, seed, epoch), so a resumed run replays the same order.
    """
    if batch_size < 1:
        raise ConfigError([("train.batch_size", f"{batch_size!r} must be at least 1")])
    rng = random.Random(f"{seed}:{epoch}")
    batches = []
    for bucket in sorted(groups):
        samples = [index for index in groups[bucket] for _ in range(repeats[index])]
        rng.shuffle(samples)
        batches += [samples[i:i + batch_size] for i in range(0, len(samples), batch_size)]
    rng.shuffle(batches)
    return batches


class BatchStream:
    """Batches of one resolution's buckets, epoch after epoch; (epoch, position) is the whole state."""

    def __init__(self, cache, resolution: int, batch_size: int, seed: int, exclude=()):
        """`exclude`: cache indices never drawn (the images held out for validation)."""
        left_out = set(exclude)
        self.groups = {bucket: kept for bucket, members in cache.bucket_members(resolution).items()
                       if (kept := [i for i in members if i not in left_out])}
        self.repeats = [item.repeats for item in cache.items]
        self.batch_size, self.seed = batch_size, seed
        self.epoch, self.position = 0, 0
        self._batches = self._epoch_batches()

    def _epoch_batches(self) -> list[list[int]]:
        return bucket_batches(self.groups, self.repeats, self.batch_size, seed=self.seed, epoch=self.epoch)

    def seek(self, epoch: int, position: int) -> None:
        """Continue from a saved place: the epoch's order is recomputed, never stored."""
        self.epoch, self.position = epoch, position
        self._batches = self._epoch_batches()

    def next(self) -> list[int]:
        if self.position >= len(self._batches):
            self.epoch, self.position = self.epoch + 1, 0
            self._batches = self._epoch_batches()
        self.position += 1
        return self._batches[self.position - 1]


def resolution_at(step: int, resolutions: tuple[int, ...], total: int) -> int:
    """A schedule [512, 1024] trains equal consecutive shares of the steps at each resolution."""
    return resolutions[min(step * len(resolutions) // total, len(resolutions) - 1)]
