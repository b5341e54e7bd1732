"""MetricsLog, read_metrics and the training-curves plot, on real files in tmp_path."""

from __future__ import annotations

import json
import math
import random

import pytest
from PIL import Image

from flux2_lora_core.errors import ConfigError, Flux2LoraError
from flux2_lora_core.training.metrics import MetricsLog, centred_mean, plot_training_curves, read_metrics


def write_run(path, steps=200, seed=0):
    rng = random.Random(seed)
    with MetricsLog(path) as log:
        for step in range(1, steps + 1):
            log.record(step, loss=2.0 * math.exp(-step / 40) + 0.05 + rng.uniform(0, 0.05),
                       lr=1e-4 * min(1.0, step / 20), step_time=0.5,
                       **({"grad_norm": 1.0 + rng.random()} if step % 10 == 0 else {}), memory_mb=800.0 + step)
    return path


def test_every_record_is_one_json_line_with_what_was_recorded(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    with MetricsLog(path) as log:
        row = log.record(1, loss=0.123456789, lr=1e-4, step_time=0.5)
        log.record(2, loss=0.1, lr=2e-4, step_time=0.25, grad_norm=3.0, memory_mb=1024.5, note="warmup")
        assert path.read_text().count("\n") == 2  # flushed per record, before close
    assert row == {"step": 1, "loss": 0.123457, "lr": 0.0001, "step_time": 0.5}
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == [row, {"step": 2, "loss": 0.1, "lr": 0.0002, "step_time": 0.25, "grad_norm": 3.0,
                           "memory_mb": 1024.5, "note": "warmup"}]
    assert read_metrics(path) == lines


def test_non_finite_values_are_written_as_null(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLog(path) as log:
        log.record(1, loss=float("nan"), lr=float("inf"), grad_norm=None)
        log.record(2, loss=0.5)
        assert math.isnan(log.recent("loss")[0])
        assert log.smoothed_loss() == 0.5  # the NaN is skipped
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text.splitlines()[0]) == {"step": 1, "loss": None, "lr": None, "grad_norm": None}


def test_memory_stays_bounded_and_smoothing_uses_the_window():
    log = MetricsLog(None, window=10, history=50)
    for step in range(5000):
        log.record(step, loss=float(step), lr=1e-4)
    assert len(log._values["loss"]) == 50 and len(log.recent("lr")) == 50
    assert log.recent("loss", 3) == [4997.0, 4998.0, 4999.0]
    assert log.smoothed_loss() == sum(range(4990, 5000)) / 10
    assert log.recent("grad_norm") == [] and MetricsLog(None).smoothed_loss() is None
    with pytest.raises(ConfigError, match="window"):
        MetricsLog(None, window=0)


def test_a_truncated_last_line_is_skipped_and_repaired_before_appending(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step":1,"loss":0.5}\n{"step":2,"loss":0.4}\n{"step":3,"lo')
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    with MetricsLog(path) as log:
        log.record(3, loss=0.3)
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]


def test_resume_drops_the_steps_after_the_checkpoint(tmp_path):
    path = write_run(tmp_path / "metrics.jsonl", steps=30)
    with MetricsLog(path, truncate_after=20) as log:
        log.record(21, loss=0.1)
    assert [r["step"] for r in read_metrics(path)] == list(range(1, 22))


def test_a_corrupt_middle_line_names_the_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step":1,"loss":0.5}\n\n{"step":2,"loss":0.4\n{"step":3,"loss":0.3}\n')
    with pytest.raises(Flux2LoraError, match=r"metrics\.jsonl:3: not a metrics record"):
        read_metrics(path)
    path.write_text('{"step":1}\n[1, 2]\n{"step":3}\n')
    with pytest.raises(Flux2LoraError, match=r":2: .*step"):
        read_metrics(path)
    with pytest.raises(Flux2LoraError, match="cannot read"):
        read_metrics(tmp_path / "missing.jsonl")


def test_training_curves_png(tmp_path):
    path = write_run(tmp_path / "metrics.jsonl")
    out = plot_training_curves(path, tmp_path / "plots" / "training_curves.png", title="demo run")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (1100, 750)
        im.verify()
    assert [p.name for p in out.parent.iterdir()] == ["training_curves.png"]  # no temporary file left


def test_training_curves_with_missing_columns(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLog(path) as log:
        log.record(1, loss=float("nan"), lr=1e-4)
        log.record(2, loss=0.5, lr=1e-4)
    out = plot_training_curves(path, tmp_path / "curves.png")
    with Image.open(out) as im:
        assert im.format == "PNG"
    (tmp_path / "empty.jsonl").write_text("")
    assert plot_training_curves(tmp_path / "empty.jsonl", tmp_path / "empty.png").stat().st_size > 1000


def test_centred_mean():
    assert centred_mean([1.0, 2.0, 6.0, 3.0], 1) == [1.5, 3.0, pytest.approx(11 / 3), 4.5]
    assert centred_mean([], 3) == []
