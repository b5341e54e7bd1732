"""How a caller follows a run: the trainer reports through `Callbacks` and asks it whether to stop.

The CLI maps it to a progress bar and Ctrl+C, the ComfyUI node to its progress bar and Cancel button. Kept apart
from the trainer (and free of torch) so that subclassing it imports nothing of the training machinery.
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
