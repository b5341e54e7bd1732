"""The learning-rate range test on synthetic loss curves whose steepest point is known."""

from __future__ import annotations

import math
import random

import pytest
from PIL import Image

from flux2_lora_core.errors import ConfigError
from flux2_lora_core.training.lr_finder import RangeTest, lr_schedule, plot_range_test

STEEP = 1e-4  # where the synthetic loss falls fastest against log10(lr)


def synthetic_loss(lr: float, rng: random.Random, noise: float = 0.03) -> float:
    """1.0 -> 0.2 along a tanh centred on STEEP, then blowing up past 1e-2, plus Gaussian noise."""
    x = math.log10(lr)
    return 0.6 - 0.4 * math.tanh((x - math.log10(STEEP)) / 0.7) + 2 * math.exp(3 * (x + 2)) + rng.gauss(0, noise)


def run(test: RangeTest, seed: int = 0, noise: float = 0.03) -> int:
    rng = random.Random(seed)
    for step in range(len(test.schedule)):
        if not test.record(step, synthetic_loss(test.lr(step), rng, noise)):
            return step
    return len(test.schedule)


def test_schedule_is_exponential_between_the_bounds():
    lrs = lr_schedule(1e-7, 1e-1, 7)
    assert lrs[0] == pytest.approx(1e-7) and lrs[-1] == pytest.approx(1e-1)
    assert [b / a for a, b in zip(lrs, lrs[1:])] == pytest.approx([10.0] * 6)
    with pytest.raises(ConfigError) as info:
        lr_schedule(0, 1e-3, 1)
    assert {key for key, _ in info.value.problems} == {"min_lr", "steps"}
    with pytest.raises(ConfigError, match="max_lr"):
        lr_schedule(1e-3, 1e-4, 10)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_suggestion_is_near_the_steepest_point_and_the_test_stops_on_divergence(seed):
    test = RangeTest(1e-7, 1.0, 100)
    stopped_at = run(test, seed=seed, noise=0.05)
    assert stopped_at < 99 and "exceeded" in test.stopped  # diverged before the schedule ended
    assert len(test.lrs) == len(test.losses) == len(test.smoothed) == stopped_at + 1
    lr = test.suggestion()
    assert lr is not None and STEEP / 3 <= lr <= STEEP * 3, lr


def test_non_finite_loss_stops_and_short_runs_give_no_suggestion():
    test = RangeTest(1e-6, 1e-2, 50)
    assert test.record(0, 1.0) and test.record(1, 0.9)
    assert not test.record(2, float("nan")) and "nan" in test.stopped
    assert len(test.losses) == 2 and test.suggestion() is None
    flat = RangeTest(1e-6, 1e-2, 40)
    for step in range(40):
        flat.record(step, 1.0 + 0.001 * step)  # the loss only rises: nothing to suggest
    assert flat.suggestion() is None and flat.stopped == "schedule finished"
    with pytest.raises(ValueError, match="out of order"):
        flat.record(3, 1.0)
    with pytest.raises(ConfigError, match="smoothing"):
        RangeTest(1e-6, 1e-2, 40, smoothing=1.0)


def test_smoothed_is_the_bias_corrected_ema():
    test = RangeTest(1e-6, 1e-2, 10, smoothing=0.9)
    for step, loss in enumerate([1.0, 2.0, 3.0]):
        test.record(step, loss)
    assert test.smoothed[0] == pytest.approx(1.0)  # bias correction: the first value is the first loss
    assert test.smoothed[2] == pytest.approx((0.81 * 1 + 0.9 * 2 + 3) / (0.81 + 0.9 + 1))


def test_plot_range_test(tmp_path):
    test = RangeTest(1e-7, 1.0, 100)
    run(test)
    out = plot_range_test(test, tmp_path / "lr_find.png")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (800, 500)
    empty = plot_range_test(RangeTest(1e-6, 1e-2, 10), tmp_path / "empty.png")
    assert empty.stat().st_size > 1000
