"""ComfyUI's side of a run's progress, for Cache Latents and Train.

Imported by those nodes when they run, not when ComfyUI loads the pack: subclassing the engine's
Callbacks needs the engine, and ComfyUI's start should not pay for it.
"""

from __future__ import annotations

from comfy import model_management
from comfy.utils import ProgressBar

from ..flux2_lora_core.training import Callbacks


class ComfyProgress(Callbacks):
    """The trainer's callbacks as ComfyUI's progress bar, sample previews and Cancel button.

    Before the first step Cancel simply aborts (the bar's hook raises; the cache keeps what it encoded).
    Once training runs, Cancel becomes a stop request: the step finishes and a checkpoint is written.
    """

    def __init__(self):
        self.bar, self.phases, self.cancelled = None, {}, False

    def on_progress(self, phase, done, total):
        self.phases.setdefault(phase, ProgressBar(total)).update_absolute(done, total)

    def _update(self, *args, **kwargs):
        try:
            self.bar.update_absolute(*args, **kwargs)
        except model_management.InterruptProcessingException:  # the hook saw Cancel first: stop gracefully
            self.cancelled = True

    def on_step(self, report):
        self.bar = self.bar or ProgressBar(report.total)
        self._update(report.step, report.total)

    def on_sample(self, step, paths):
        from PIL import Image

        if self.bar is not None:
            self._update(step, None, preview=("JPEG", Image.open(paths[0]).convert("RGB"), 512))

    def should_stop(self):
        return self.cancelled or model_management.processing_interrupted()
