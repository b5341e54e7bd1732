"""How a caller follows a run: the trainer reports through `Callbacks` and asks it whether to stop.

The CLI maps it to a progress bar and Ctrl+C, the ComfyUI node to its progress bar, its own live events and its
Cancel and "Stop and save" buttons. Kept apart from the trainer (and free of torch) so that subclassing it imports
nothing of the training machinery. Every method is optional, and the trainer calls one added later (on_phase) only
when the object has it, so duck-typed callbacks written before it keep working.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class StepReport:
    step: int                   # optimizer steps done
    total: int
    loss: float | None          # latest logged loss (losses are read from the device on logging steps)
    lr: float
    steps_per_second: float
    eta_seconds: float
    smoothed_loss: float | None = None   # mean of the recent logged losses (what the loss curve's trend shows)
    peak_memory_mb: float | None = None  # the device's peak allocation, or the process's peak RSS on the CPU
    # (step, loss) of every step whose loss was read at this one (one device sync per logging interval): a live
    # chart gets each step's loss exactly once, however often it redraws.
    logged: tuple[tuple[int, float], ...] = ()
    validation_loss: float | None = None   # measured at this step on the held-out images (validation.py), else None


# The stages of a run, in the order `on_phase` announces them ("sampling" may also come between training steps).
PHASES = ("caching", "loading", "training", "sampling", "saving")


class Callbacks:
    """Override what you need; every method is optional. Called on the training thread."""

    def on_step(self, report: StepReport) -> None:
        pass

    def should_stop(self) -> bool:
        return False

    def on_sample(self, step: int, paths: list[Path]) -> None:
        pass

    def on_progress(self, phase: str, done: int, total: int) -> None:
        """Setup work (latent caching) as it completes."""

    def on_phase(self, phase: str) -> None:
        """The run entered one of PHASES. A caller that shows more than a step bar (the ComfyUI node's live panel)
        learns here why no step arrives for a while: a model loading, samples being drawn, the LoRA being saved."""
