"""What a caller following a run learns through Callbacks: the phases in order, and every step's loss exactly once
(what the ComfyUI node's live chart is drawn from) with the smoothed loss and peak memory beside it."""

from __future__ import annotations

import json
import math

import pytest

from flux2_lora_core.config import load_config
from flux2_lora_core.training import PHASES, Callbacks, trainer


@pytest.fixture(scope="module")
def workspace(training_files):
    return training_files("klein", 4)


class Recorder(Callbacks):
    def __init__(self, stop_after=None):
        self.events, self.reports, self.stop_after = [], [], stop_after

    def on_phase(self, phase):
        self.events.append(phase)

    def on_step(self, report):
        self.reports.append(report)
        self.events.append("step")

    def should_stop(self):
        return self.stop_after is not None and len(self.reports) >= self.stop_after


def config(root, tmp_path, *overrides):
    return load_config(None, [f"model.path={root / 'model'}", f"data.path={root / 'data'}", "data.resolution=64",
                              f"cache.dir={root / 'cache'}", f"output.dir={tmp_path / 'out'}", "lora.rank=4",
                              "train.steps=5", "train.lr=1e-3", "train.log_every=2", "sample.steps=1",
                              "sample.resolution=64", "sample.guidance=1.0", "checkpoint.every=0", *overrides])


def test_phases_come_in_order_and_every_loss_is_reported_once(workspace, tmp_path):
    recorder = Recorder()
    result = trainer.train(config(workspace, tmp_path, "sample.every=2"), recorder)

    phases = [e for e in recorder.events if e != "step"]
    assert phases == ["caching", "loading", "training", "sampling", "sampling", "saving", "sampling"]
    assert set(phases) == set(PHASES)
    steps = [i for i, e in enumerate(recorder.events) if e == "step"]
    assert recorder.events.index("training") < steps[0] and steps[-1] < recorder.events.index("saving")

    logged = [pair for r in recorder.reports for pair in r.logged]
    metrics = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [s for s, _ in logged] == [m["step"] for m in metrics] == [1, 2, 3, 4, 5]   # read at 2, 4 and the last
    # metrics.jsonl keeps 6 significant digits
    assert [loss for _, loss in logged] == pytest.approx([m["loss"] for m in metrics], rel=1e-5)
    assert [len(r.logged) for r in recorder.reports] == [0, 2, 0, 2, 1]
    assert all(r.loss == r.logged[-1][1] for r in recorder.reports if r.logged)
    assert recorder.reports[0].smoothed_loss is None                     # nothing read from the device yet
    last = recorder.reports[-1]
    assert last.smoothed_loss == pytest.approx(sum(loss for _, loss in logged) / 5)
    assert all(r.peak_memory_mb is None or (math.isfinite(r.peak_memory_mb) and r.peak_memory_mb > 0)
               for r in recorder.reports)


def test_a_stop_request_ends_the_run_without_a_saving_phase_before_the_checkpoint_is_written(workspace, tmp_path):
    recorder = Recorder(stop_after=2)
    result = trainer.train(config(workspace, tmp_path), recorder)

    assert result.stopped_early and result.steps == 2 and result.lora_path.exists()
    assert [e for e in recorder.events if e != "step"] == ["caching", "loading", "training", "saving"]
    assert [s for r in recorder.reports for s, _ in r.logged] == [1, 2]   # the stopped run's losses are all read
