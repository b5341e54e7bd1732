"""buckets.py: bucket shapes, which bucket an image goes to, and the resize + centre-crop geometry."""

from __future__ import annotations

import math
import random

import pytest

from flux2_lora_core.data.buckets import Fit, assign_bucket, fit_to_bucket, make_buckets
from flux2_lora_core.errors import ConfigError


@pytest.mark.parametrize("resolution, step", [(1024, 16), (512, 16), (768, 64), (1536, 32)])
def test_buckets_have_the_right_area_sides_and_shapes(resolution, step):
    buckets = make_buckets(resolution, step=step)
    assert buckets == sorted(set(buckets)) and (resolution, resolution) in buckets
    for w, h in buckets:
        assert w % step == 0 and h % step == 0
        assert resolution * resolution - resolution * step < w * h <= resolution * resolution
        assert max(w, h) / min(w, h) <= 4.0
        assert (h, w) in buckets
    shorts = [min(b) for b in buckets if b[0] <= b[1]]
    assert len(shorts) == len(set(shorts))  # one bucket per short side: no near-duplicates


def test_bucket_list_for_1024_is_fixed():
    buckets = make_buckets(1024)
    assert len(buckets) == 65
    assert buckets[:3] == [(512, 2048), (528, 1984), (544, 1920)]
    assert (1024, 1024) in buckets and (832, 1248) in buckets and (1248, 832) in buckets


def test_side_and_aspect_limits():
    buckets = make_buckets(1024, min_side=768, max_side=1280, max_aspect=2.0)
    assert min(min(b) for b in buckets) >= 768 and max(max(b) for b in buckets) <= 1280
    assert all(max(b) / min(b) <= 2.0 for b in buckets)
    assert make_buckets(1024, max_aspect=1.0) == [(1024, 1024)]


@pytest.mark.parametrize("kwargs", [{"resolution": 1000}, {"resolution": 0}, {"resolution": 1024, "step": 0},
                                    {"resolution": 1024, "max_aspect": 0.5}, {"resolution": 1024, "min_side": 1100},
                                    {"resolution": 1024, "max_side": 900}])
def test_bad_arguments_raise_config_error(kwargs):
    with pytest.raises(ConfigError):
        make_buckets(**kwargs)


def test_assign_picks_the_closest_aspect_ratio_in_log_space():
    buckets = make_buckets(1024)
    assert assign_bucket(100, 100, buckets) == (1024, 1024)
    assert assign_bucket(1920, 1080, buckets) == (1360, 768)
    assert assign_bucket(1080, 1920, buckets) == (768, 1360)
    assert assign_bucket(100, 10_000, buckets) == (512, 2048)  # beyond the widest: the widest
    rng = random.Random(0)
    for _ in range(500):
        w, h = rng.randint(64, 4000), rng.randint(64, 4000)
        best = min(abs(math.log(b[0] / b[1]) - math.log(w / h)) for b in buckets)
        got = assign_bucket(w, h, buckets)
        assert abs(abs(math.log(got[0] / got[1]) - math.log(w / h)) - best) < 1e-12


def test_ties_are_broken_the_same_way_whatever_the_bucket_order():
    buckets = [(1024, 512), (512, 1024), (768, 768), (512, 512)]
    # (768, 768) and (512, 512) tie on shape: the larger area wins; 2:1 vs 1:2 tie for a square-ish image never
    for order in (buckets, buckets[::-1], sorted(buckets)):
        assert assign_bucket(600, 600, order) == (768, 768)
    # a 2:1 image is exactly as far from 4:1 as from 1:1: larger area first, then the smaller width
    assert assign_bucket(800, 400, [(1600, 400), (1024, 1024)]) == (1024, 1024)
    assert assign_bucket(800, 400, [(2048, 512), (1024, 1024)]) == (1024, 1024)
    assert assign_bucket(800, 400, [(1024, 1024), (2048, 512)]) == (1024, 1024)


def test_fit_scales_to_cover_then_crops_the_centre():
    assert fit_to_bucket(1920, 1080, (1360, 768)) == Fit((1365, 768), (2, 0, 1362, 768))
    assert fit_to_bucket(512, 512, (1024, 1024)) == Fit((1024, 1024), (0, 0, 1024, 1024))  # upscale, no crop
    assert fit_to_bucket(1000, 3000, (512, 2048)) == Fit((683, 2048), (85, 0, 597, 2048))
    rng = random.Random(1)
    buckets = make_buckets(1024)
    for _ in range(500):
        w, h = rng.randint(16, 5000), rng.randint(16, 5000)
        bucket = assign_bucket(w, h, buckets)
        fit = fit_to_bucket(w, h, bucket)
        (sw, sh), (left, top, right, bottom) = fit.scaled, fit.box
        assert (right - left, bottom - top) == bucket
        assert sw >= bucket[0] and sh >= bucket[1] and (sw == bucket[0] or sh == bucket[1])  # smallest cover
        assert 0 <= left <= sw - bucket[0] - left <= left + 1 and 0 <= top <= sh - bucket[1] - top <= top + 1
        assert abs(sw / sh - w / h) <= max(1 / sh, 1 / sw) * (w / h + 1)  # the aspect ratio is kept


def test_bucket_batches_never_mix_buckets_and_keep_every_repeat():
    from collections import Counter

    from flux2_lora_core.data.buckets import bucket_batches

    groups = {(64, 64): [0, 1, 2, 3, 4], (48, 80): [5, 6], (80, 48): [7]}
    repeats = [1, 1, 1, 1, 3, 2, 1, 1]
    batches = bucket_batches(groups, repeats, 2, seed=7, epoch=0)
    where = {i: b for b, members in groups.items() for i in members}
    for batch in batches:
        assert 1 <= len(batch) <= 2 and len({where[i] for i in batch}) == 1, batch
    assert Counter(i for batch in batches for i in batch) == {i: r for i, r in enumerate(repeats)}
    assert batches == bucket_batches(groups, repeats, 2, seed=7, epoch=0)  # a resumed run replays it
    assert batches != bucket_batches(groups, repeats, 2, seed=7, epoch=1)
    with pytest.raises(ConfigError, match="train.batch_size"):
        bucket_batches(groups, repeats, 0, seed=0, epoch=0)
