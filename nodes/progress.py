"""ComfyUI's side of a run's progress, for Cache Latents and Train.

Imported by those nodes when they run, not when ComfyUI loads the pack. ComfyProgress implements every method of
the engine's `Callbacks` protocol (on_phase, on_progress, on_step, on_sample, should_stop) rather than subclassing
it, so this module imports nothing of the engine.
"""

from __future__ import annotations

import logging
import math
import os
import time

import folder_paths
from comfy import model_management
from comfy.utils import ProgressBar

from .events import NodeEvents, stoppable, view_reference

log = logging.getLogger(__name__)


def _number(value):
    """JSON has no NaN or infinity: such a value is sent as null (the browser shows '-')."""
    return value if value is None or math.isfinite(value) else None


class ComfyProgress:
    """The trainer's callbacks as ComfyUI's progress bar, sample previews, Cancel button and the pack's live events.

    Before the first step Cancel simply aborts (the bar's hook raises; the cache keeps what it encoded).
    Once training runs, Cancel becomes a stop request: the step finishes and a checkpoint is written.
    "Stop and save" (POST /flux2_lora/stop) asks the same, but the node then returns the LoRA so far; asked before
    the first step, it waits for that step, so there is always a LoRA to return.
    Used as a context manager around the node's work: the final state is sent however the work ends.
    """

    def __init__(self, kind: str = "train"):
        self.bar, self.phases, self.cancelled, self.stepped = None, {}, False, False
        self.events, self.started = NodeEvents(kind), time.monotonic()
        self.state = {"phase": None, "detail": None, "done": 0, "total": 0}
        self.losses, self.samples = [], {}          # (step, loss) not yet sent; prompt index -> /view reference
        self.validation = []                        # (step, held-out loss) not yet sent
        self._stop = None

    def __enter__(self):
        if self.events.kind == "train":
            self._stoppable = stoppable(self.events.prompt_id, self.events.node_id)
            self._stop = self._stoppable.__enter__()
        return self

    def __exit__(self, kind, exc, tb):
        if self._stop is not None:
            self._stoppable.__exit__(kind, exc, tb)
        if exc is not None and self.state["phase"] not in ("done", "stopped", "cancelled"):
            cancelled = isinstance(exc, model_management.InterruptProcessingException)
            self.finish("cancelled" if cancelled else "failed", "cancelled" if cancelled else type(exc).__name__)
        return False

    # ------------------------------------------------------------------ what the browser sees
    def _send(self, force=False, **changes):
        self.state.update(changes)
        state = {**self.state, "elapsed": time.monotonic() - self.started, "losses": self.losses,
                 "validation": self.validation, "samples": [self.samples[i] for i in sorted(self.samples)]}
        if self.events.send(state, force=force or self.events.sent == 0):
            self.losses, self.validation = [], []

    def on_phase(self, phase):
        self._send(force=True, phase=phase, detail=None, done=0, total=0)

    def on_progress(self, phase, done, total):
        self.phases.setdefault(phase, ProgressBar(total)).update_absolute(done, total)
        changed = self.state["phase"] != "caching" or self.state["detail"] != phase
        self._send(force=changed or done >= total, phase="caching", detail=phase, done=done, total=total)

    def on_step(self, report):
        self.bar, self.stepped = self.bar or ProgressBar(report.total), True
        self._update(report.step, report.total)
        self.losses += [[step, _number(loss)] for step, loss in report.logged]
        if report.validation_loss is not None:
            self.validation.append([report.step, _number(report.validation_loss)])
        rate = report.steps_per_second
        self._send(force=self.state["phase"] != "training" or report.step >= report.total, phase="training",
                   detail=None, done=report.step, total=report.total, step=report.step, steps=report.total,
                   loss=_number(report.loss), smoothed_loss=_number(report.smoothed_loss), lr=report.lr,
                   seconds_per_step=1 / rate if rate > 0 else None, eta_seconds=_number(report.eta_seconds),
                   peak_memory_mb=report.peak_memory_mb, validation_loss=_number(report.validation_loss)
                   if report.validation_loss is not None else self.state.get("validation_loss"))

    def on_sample(self, step, paths):
        from PIL import Image

        if self.bar is not None:
            self._update(step, None, preview=("JPEG", Image.open(paths[0]).convert("RGB"), 512))
        self.samples.update({i: {**view_reference(p), "prompt": i, "step": step} for i, p in enumerate(paths)})
        self._send(force=True, done=len(paths), total=len(paths))

    def finish(self, phase: str, summary: str, **fields) -> str:
        """The final state ("done", "stopped", "cancelled", "failed") with the summary that stays on the node."""
        self._send(force=True, phase=phase, detail=None, summary=summary, **fields)
        return summary

    def _update(self, *args, **kwargs):
        try:
            self.bar.update_absolute(*args, **kwargs)
        except model_management.InterruptProcessingException:  # the hook saw Cancel first: stop gracefully
            self.cancelled = True

    def should_stop(self):
        asked = self._stop is not None and self.stepped and self._stop()
        return asked or self.cancelled or model_management.processing_interrupted()

    @property
    def interrupted(self) -> bool:
        """Whether ComfyUI's Cancel (not "Stop and save") ended the run."""
        return self.cancelled or model_management.processing_interrupted()

    # ------------------------------------------------------------------ the node's summary
    def finish_training(self, result) -> str:
        """Sends Train's final state and returns its summary; after Cancel, says so (event and log) and raises
        InterruptProcessingException so that ComfyUI ends the prompt as interrupted, the checkpoint written."""
        run, lora = result.run_dir.name, result.lora_path.name if result.lora_path else None
        final = result.losses[-1] if result.losses else None
        if result.lora_path is None:
            head = "stopped before the first step; nothing saved"
        elif result.stopped_early:
            head = f"stopped at step {result.steps}; checkpoint saved; resume: {run}"
        else:
            head = f"{result.steps} steps"
        from ..flux2_lora_core.training import cluster_command

        where = os.path.relpath(result.run_dir, folder_paths.get_output_directory())
        summary = "\n".join([head, f"LoRA: {lora or '-'}", f"run folder: output/{where}",
                             f"on a cluster (same files): {cluster_command(f'output/{where}/config.yaml')}",
                             f"final loss: {final:.4g}" if final is not None else "final loss: -",
                             f"time: {time.monotonic() - self.started:.0f} s", *filter(None, [result.skipped])])
        phase = ("cancelled" if self.interrupted else "stopped") if result.stopped_early else "done"
        self.finish(phase, summary, run=run, lora=lora, step=result.steps, final_loss=_number(final))
        if phase == "cancelled":
            log.warning("Train cancelled: %s", head)
            raise model_management.InterruptProcessingException()   # after the checkpoint: resume continues it
        return summary
