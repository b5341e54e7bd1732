"""data.validation_split / train.validate_every: images held out of training, scored at fixed noise and noise
levels; the held-out loss is logged, plotted, reported live and kept in each checkpoint (where it picks the best).
Tiny FLUX.2 [klein], the trainer's own loop."""

from __future__ import annotations

import json

import pytest

from flux2_lora_core.data import BatchStream
from flux2_lora_core.errors import ConfigError
from flux2_lora_core.training import Callbacks, trainer
from flux2_lora_core.training.validation import held_out

from .test_trainer import Recorder, make_config


@pytest.fixture(scope="module")
def workspace(training_files):
    return training_files("klein", 4)


def test_held_out_images_are_fixed_by_the_seed_and_never_trained_on(workspace, tmp_path):
    s = trainer.setup(make_config(workspace, tmp_path, "data.validation_split=0.5", "sample.steps=0"), Callbacks())
    try:
        held = held_out(s.cache, 0.5, 42)
        assert len(held) == 2 and held == held_out(s.cache, 0.5, 42) and s.validator.indices == held
        assert held_out(s.cache, 0.01, 42) != [] and held_out(s.cache, 0.0, 42) == []
        stream = s.streams[64]
        drawn = {i for _ in range(20) for i in stream.next()}
        assert drawn == set(range(len(s.cache))) - set(held)                       # every other image, no held one
        first = s.validator.loss(s)
        assert first == s.validator.loss(s)                                       # fixed noise: the same score
        assert BatchStream(s.cache, 64, 1, 42).groups != stream.groups            # without exclude: all images
    finally:
        trainer.cleanup(s, release_model=True)
    with pytest.raises(ConfigError, match="none would be left to train on"):
        held_out(s.cache, 0.9, 42)


def test_a_run_logs_plots_reports_and_checkpoints_its_validation_loss(workspace, tmp_path, monkeypatch):
    from flux2_lora_core.training import metrics

    figures, new_figure = [], metrics.new_figure
    monkeypatch.setattr(metrics, "new_figure", lambda *a: figures.append(new_figure(*a)) or figures[-1])
    reports = Recorder()
    result = trainer.train(make_config(workspace, tmp_path, "data.validation_split=0.25", "train.validate_every=3",
                                       "train.steps=5", "sample.steps=0", "checkpoint.every=2", "train.log_every=5"),
                           reports)
    measured = {r.step: r.validation_loss for r in reports.reports if r.validation_loss is not None}
    # every 3 steps, at each checkpoint (every 2: a checkpoint keeps its own step's loss) and at the end
    assert sorted(measured) == [2, 3, 4, 5] and all(v > 0 for v in measured.values())
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"]: r["validation_loss"] for r in rows if "validation_loss" in r} == pytest.approx(measured, rel=1e-5)
    state = json.loads((result.run_dir / "checkpoints" / "step_000004" / "state.json").read_text())
    assert state["validation_loss"] == measured[4]
    assert (result.run_dir / "training_curves.png").stat().st_size > 0
    (figure,) = figures                                                   # the curves' loss panel: a red line
    (line,) = [ln for ax in figure.axes for ln in ax.get_lines() if ln.get_label() == "validation (held out)"]
    assert list(line.get_xdata()) == sorted(measured)
    assert list(line.get_ydata()) == pytest.approx([measured[k] for k in sorted(measured)], rel=1e-5)


def test_a_validation_folder_is_cached_on_its_own_and_scored_whole(workspace, tmp_path):
    from flux2_lora_core.data.demo_data import write_demo_dataset

    held = tmp_path / "held"
    write_demo_dataset(held, count=2, size=256)
    s = trainer.setup(make_config(workspace, tmp_path, f"data.validation_path={held}", "sample.steps=0"), Callbacks())
    try:
        assert len(s.validator.cache) == 2 and s.validator.indices == [0, 1]
        assert s.validator.cache.root != s.cache.root
        drawn = {i for _ in range(20) for i in s.streams[64].next()}
        assert drawn == set(range(len(s.cache)))                          # every training image is trained on
        assert s.validator.loss(s) > 0
    finally:
        trainer.cleanup(s, release_model=True)
    with pytest.raises(ConfigError) as error:
        trainer.setup(make_config(workspace, tmp_path, f"data.validation_path={held}", "data.validation_split=0.2"),
                      Callbacks())
    assert error.value.problems[0][0] == "data.validation_split"
