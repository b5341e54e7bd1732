"""The pure parts of a learning-rate range test (Leslie Smith 2015; fastai's lr_find; audit 5.2).

Train for `steps` steps while the learning rate grows exponentially from `min_lr` to `max_lr`, feed
each step's loss to `RangeTest.record`, stop when it returns False (the loss has diverged), then read
`suggestion()`. The trainer owns the model; this module only does the arithmetic and the plot.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..disk import write_atomically
from ..errors import ConfigError
from .metrics import centred_mean, new_figure, save_figure

MIN_POINTS = 8  # fewer recorded steps than this give no suggestion


def lr_schedule(min_lr: float, max_lr: float, steps: int) -> list[float]:
    """`steps` learning rates growing exponentially (evenly in log space) from min_lr to max_lr inclusive."""
    problems = []
    if not (isinstance(min_lr, (int, float)) and 0 < min_lr < math.inf):
        problems.append(("min_lr", f"{min_lr!r} must be a positive number"))
    elif not (isinstance(max_lr, (int, float)) and min_lr < max_lr < math.inf):
        problems.append(("max_lr", f"{max_lr!r} must be a number larger than min_lr={min_lr!r}"))
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        problems.append(("steps", f"{steps!r} must be a whole number of at least 2"))
    if problems:
        raise ConfigError(problems)
    ratio = math.log(max_lr / min_lr)
    return [min_lr * math.exp(ratio * i / (steps - 1)) for i in range(steps)]


class RangeTest:
    """Feed losses step by step; `lrs`, `losses` and `smoothed` hold the recorded steps, aligned.

    `smoothed` is the bias-corrected exponential moving average (weight `smoothing` on the past) used
    for the stop rule: `record` returns False once it exceeds `diverge_factor` x its best value, or
    when a loss is not finite (that loss is not recorded).
    """

    def __init__(self, min_lr: float, max_lr: float, steps: int, *, smoothing: float = 0.98,
                 diverge_factor: float = 4.0):
        problems = []
        if not (isinstance(smoothing, (int, float)) and 0 <= smoothing < 1):
            problems.append(("smoothing", f"{smoothing!r} must be a number in [0, 1)"))
        if not (isinstance(diverge_factor, (int, float)) and diverge_factor > 1):
            problems.append(("diverge_factor", f"{diverge_factor!r} must be a number larger than 1"))
        if problems:
            raise ConfigError(problems)
        self.schedule = lr_schedule(min_lr, max_lr, steps)  # every step's lr, recorded or not
        self.smoothing, self.diverge_factor = float(smoothing), float(diverge_factor)
        self.lrs: list[float] = []
        self.losses: list[float] = []
        self.smoothed: list[float] = []
        self.stopped: str | None = None  # why record() returned False, for the report
        self._avg = 0.0
        self._best = math.inf

    def lr(self, step: int) -> float:
        """The learning rate to train step `step` (0-based) at."""
        return self.schedule[step]

    def record(self, step: int, loss: float) -> bool:
        """Record step `step`'s loss (steps in order from 0); False means stop: diverged or schedule done."""
        if step != len(self.losses):
            raise ValueError(f"step {step} recorded out of order: expected step {len(self.losses)}")
        loss = float(loss)
        if not math.isfinite(loss):
            self.stopped = f"loss was {loss} at step {step} (lr {self.lr(step):.3g})"
            return False
        self._avg = self.smoothing * self._avg + (1 - self.smoothing) * loss
        smooth = self._avg / (1 - self.smoothing ** (step + 1))
        self.lrs.append(self.lr(step))
        self.losses.append(loss)
        self.smoothed.append(smooth)
        self._best = min(self._best, smooth)
        if self._best > 0 and smooth > self.diverge_factor * self._best:
            self.stopped = (f"smoothed loss {smooth:.4g} exceeded {self.diverge_factor:g} x its best "
                            f"{self._best:.4g} at step {step} (lr {self.lr(step):.3g})")
            return False
        if step == len(self.schedule) - 1:
            self.stopped = "schedule finished"
            return False
        return True

    def centred(self) -> list[float]:
        """The losses under a centred moving mean over ~10% of the points: smooth, but without the EMA's lag."""
        return centred_mean(self.losses, max(1, len(self.losses) // 20))

    def suggestion(self) -> float | None:
        """The lr where the loss falls fastest against log(lr) (fastai's "steep"), or None.

        Computed on `centred()` rather than `smoothed`: an EMA with smoothing 0.98 lags ~50 steps, which
        on a 100-step test shifts the steepest point by decades. Only the stretch before the smoothed
        minimum is searched (past it the loss is rising, so the steepest fall is always below the
        divergence), skipping the first and last half-window whose means are lopsided. No extra
        "minimum / 10" cap: the steepest point already sits well below the minimum on a sound curve.
        None with fewer than MIN_POINTS steps to search or when the loss never falls.
        """
        curve = self.centred()
        if len(curve) < MIN_POINTS:
            return None
        half = max(1, len(curve) // 20)
        end = min(range(len(curve)), key=curve.__getitem__)  # the smoothed minimum
        end = min(end, len(curve) - 1 - half)
        if end - half < MIN_POINTS // 2:
            return None
        logs = [math.log(lr) for lr in self.lrs]
        slopes = {i: (curve[i + 1] - curve[i - 1]) / (logs[i + 1] - logs[i - 1]) for i in range(half, end)}
        best = min(slopes, key=slopes.__getitem__)
        return self.lrs[best] if slopes[best] < 0 else None


def plot_range_test(test: RangeTest, out_png) -> Path:
    """Loss against lr (log x): per step (faint), smoothed, and a marker at the suggestion. Atomic PNG."""
    fig = new_figure(8, 5)
    ax = fig.subplots()
    ax.set_title("learning-rate range test")
    if test.losses:
        curve = test.centred()
        ax.plot(test.lrs, test.losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="loss per step")
        ax.plot(test.lrs, curve, color="tab:blue", linewidth=1.8, label="smoothed")
        lr = test.suggestion()
        if lr is not None:
            y = curve[test.lrs.index(lr)]
            ax.plot([lr], [y], "o", color="tab:red", markersize=9, label=f"suggested lr {lr:.2e}")
            ax.annotate(f"{lr:.2e}", (lr, y), textcoords="offset points", xytext=(8, 8), color="tab:red")
        ax.set_xscale("log")
        low = min(curve)  # the y range shows the fall in detail; the divergence runs off the top
        high = max(curve[: curve.index(low) + 1])
        span = (high - low) or abs(high) * 0.1 or 1.0
        ax.set_ylim(min(low, min(test.losses)) - 0.1 * span, min(max(test.losses) + 0.05 * span, high + 0.8 * span))
        ax.legend(loc="upper left")
    else:
        ax.text(0.5, 0.5, "no steps recorded", transform=ax.transAxes, ha="center", va="center", color="0.5")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3, which="both")
    return save_figure(fig, out_png)


def run_range_test(config, *, min_lr: float = 1e-7, max_lr: float = 1e-2, steps: int = 100, callbacks=None,
                   encoders=None, transformer=None) -> tuple[RangeTest, Path]:
    """Train `steps` steps of `config` at exponentially growing learning rates; returns the test and its plot.

    The run folder (output.name + "-find-lr") keeps run.json, metrics.jsonl, lr_range_test.png and
    lr_range_test.json; no LoRA is saved, since its weights were trained at every rate at once.
    """
    import json
    import time

    from .callbacks import Callbacks, StepReport
    from .trainer import cleanup, micro_step, optimizer_step, setup

    callbacks = callbacks or Callbacks()
    test = RangeTest(min_lr, max_lr, steps)
    # One resolution (the last of a schedule): a change of resolution midway would jump the loss level.
    config = config.replace({"train.steps": steps, "train.lr_scheduler": "constant", "train.warmup_steps": 0,
                             "sample.every": 0, "sample.at_start": False, "data.resolution": [config.data.resolution[-1]],
                             "output.name": f"{config.output.name}-find-lr"})
    s = setup(config, callbacks, encoders, transformer)
    accumulation = config.train.gradient_accumulation
    try:
        for step in range(steps):
            if callbacks.should_stop():
                break
            for group in s.optimizer.param_groups:
                group["lr"] = test.lr(step)
            resolution, tick = config.data.resolution[0], time.perf_counter()
            loss = sum(float(micro_step(s, s.streams[resolution].next(), resolution, 1 / accumulation))
                       for _ in range(accumulation)) / accumulation
            optimizer_step(s, want_norm=False)
            s.step += 1
            s.metrics.record(s.step, loss=loss, lr=test.lr(step), step_time=time.perf_counter() - tick)
            going = test.record(step, loss)
            callbacks.on_step(StepReport(s.step, steps, loss, test.lr(step), 0.0, 0.0))
            if not going:
                break
        plot = plot_range_test(test, s.run_dir / "lr_range_test.png")
        result = {"suggestion": test.suggestion(), "stopped": test.stopped, "lrs": test.lrs, "losses": test.losses}
        write_atomically(s.run_dir / "lr_range_test.json", json.dumps(result, indent=1).encode())
    finally:
        cleanup(s, release_model=transformer is None)
    return test, plot
