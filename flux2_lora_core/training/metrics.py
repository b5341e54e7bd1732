"""Training metrics: bounded memory for the live view, `metrics.jsonl` on disk for everything else.

The run folder's `metrics.jsonl` (DESIGN.md, "Contracts") holds one JSON object per logged step:
`{"step": 10, "loss": 0.41, "lr": 0.0001, "step_time": 0.52, "grad_norm": 1.3, "memory_mb": 812.0}`.
Non-finite values are written as `null` so that every line stays valid JSON for any reader.
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections import deque
from itertools import islice
from pathlib import Path

from ..disk import write_atomically
from ..errors import ConfigError, Flux2LoraError

log = logging.getLogger(__name__)

SIGNIFICANT_DIGITS = 6  # floats are written with this many significant digits: lr 1e-4 and loss 0.4 alike
PANELS = (("loss", "loss"), ("lr", "learning rate"), ("grad_norm", "gradient norm"), ("memory_mb", "memory (MB)"))


def _clean(key: str, value):
    """A JSON-safe value: floats rounded, NaN/inf -> None, numpy/torch scalars -> float."""
    if value is None or isinstance(value, (bool, str, int)):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"metric {key!r} must be a number, string or None, not {type(value).__name__}") from None
    return float(f"{number:.{SIGNIFICANT_DIGITS}g}") if math.isfinite(number) else None


class MetricsLog:
    """Training metrics in bounded memory (audit 2.1: deques, never an unbounded list) + metrics.jsonl on disk.

    `path`: the metrics.jsonl to append to (line-buffered, flushed per record); None keeps memory only.
    `window`: how many recent losses `smoothed_loss` averages. `history`: values kept per key in memory.
    `truncate_after`: on resume, drop the records of steps after this one (written after the checkpoint
    being resumed from) so that they are not in the file twice.
    """

    def __init__(self, path: Path | None, window: int = 100, history: int = 10_000, *,
                 truncate_after: int | None = None):
        problems = [(key, f"{v!r} must be a whole number of at least 1") for key, v in
                    (("window", window), ("history", history))
                    if isinstance(v, bool) or not isinstance(v, int) or v < 1]
        if problems:
            raise ConfigError(problems)
        self.path = None if path is None else Path(path)
        self.window, self.history = window, history
        self._values: dict[str, deque] = {}
        self._file = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists():
                self._repair(truncate_after)
            self._file = open(self.path, "a", encoding="utf-8", buffering=1)

    def _repair(self, truncate_after: int | None) -> None:
        """Drop a truncated last line (a killed run) and, on resume, the steps after `truncate_after`."""
        data = self.path.read_bytes()
        if truncate_after is None and (not data or data.endswith(b"\n")):
            return
        keep = read_metrics(self.path)
        if truncate_after is not None:
            keep = [r for r in keep if r["step"] <= truncate_after]
        write_atomically(self.path, "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in keep).encode())

    def record(self, step: int, **values) -> dict:
        """Log one step: loss, lr, step_time, and grad_norm / memory_mb / anything else when known."""
        row = {"step": int(step)}
        row.update((key, _clean(key, value)) for key, value in values.items())
        for key, value in values.items():  # numbers only, NaN kept: recent() shows what happened
            if value is not None and not isinstance(value, (bool, str)):
                self._values.setdefault(key, deque(maxlen=self.history)).append(float(value))
        if self._file is not None:
            self._file.write(json.dumps(row, allow_nan=False, separators=(",", ":")) + "\n")
            self._file.flush()
        return row

    def restore_history(self, history: dict[str, list]) -> None:
        """Put back the in-memory values a checkpoint saved, so smoothing continues as if never stopped."""
        for key, values in history.items():
            self._values[key] = deque((float("nan") if v is None else float(v) for v in values), maxlen=self.history)

    def smoothed_loss(self) -> float | None:
        """Plain mean of the last `window` finite losses (non-finite ones are skipped); None before any."""
        finite = [v for v in islice(reversed(self._values.get("loss", ())), self.window) if math.isfinite(v)]
        return sum(finite) / len(finite) if finite else None

    def recent(self, key: str, n: int | None = None) -> list[float]:
        """The last `n` (default: all kept) values recorded for `key`, oldest first; [] for an unknown key."""
        values = self._values.get(key, ())
        if n is None:
            return list(values)
        return list(islice(reversed(values), max(0, n)))[::-1]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def step_profiler(steps: int, device, run_dir: Path):
    """torch.profiler over `steps` training steps (after 2 warm-up steps), written to run_dir/profile_trace.json;
    None when train.profile_steps is 0. The trainer calls .step() after each optimizer step."""
    if not steps:
        return None
    from torch.profiler import ProfilerActivity, profile, schedule

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    trace = Path(run_dir) / "profile_trace.json"
    return profile(activities=activities, record_shapes=True, profile_memory=True,
                   schedule=schedule(wait=0, warmup=2, active=steps, repeat=1),
                   on_trace_ready=lambda p: (p.export_chrome_trace(str(trace)),
                                             log.info("profiler trace of %d steps: %s (open in "
                                                      "https://ui.perfetto.dev)", steps, trace)))


def iter_metrics(path):
    """Yield the records of a metrics.jsonl one at a time; see `read_metrics`."""
    path = Path(path)
    try:
        f = open(path, encoding="utf-8", errors="strict")
    except OSError as exc:
        raise Flux2LoraError(f"{path}: cannot read the metrics file ({exc.strerror or exc}); "
                             "check the run folder") from None
    with f:
        pending = None  # (line number, text, error) of a bad line: fatal unless it is the last one
        try:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                if pending is not None:
                    raise Flux2LoraError(f"{path}:{pending[0]}: not a metrics record ({pending[2]}): "
                                         f"{pending[1][:80]!r}; fix or delete that line")
                try:
                    row = json.loads(line)
                    if not isinstance(row, dict) or isinstance(row.get("step"), bool) or not isinstance(
                            row.get("step"), int):
                        raise ValueError('expected a JSON object with a whole-number "step"')
                except ValueError as exc:
                    pending = (number, line.strip(), exc)
                    continue
                yield row
        except UnicodeDecodeError as exc:
            raise Flux2LoraError(f"{path}: not UTF-8 text ({exc.reason}); is it a metrics.jsonl?") from None
    if pending is not None:
        log.warning("%s:%d: skipped a truncated last line (the run was probably killed while writing it)",
                    path, pending[0])


def read_metrics(path) -> list[dict]:
    """Every record of a metrics.jsonl. A truncated last line (a killed run) is skipped with a warning;
    a bad line anywhere else raises Flux2LoraError naming the file and the line number."""
    return list(iter_metrics(path))


def centred_mean(values: list[float], half: int) -> list[float]:
    """Mean over values[i - half : i + half + 1] (cut at the ends): smooth, without a trailing mean's lag."""
    prefix = [0.0]
    for v in values:
        prefix.append(prefix[-1] + v)
    n = len(values)
    return [(prefix[min(n, i + half + 1)] - prefix[max(0, i - half)]) / (min(n, i + half + 1) - max(0, i - half))
            for i in range(n)]


def plot_training_curves(metrics_path, out_png, *, title: str = "") -> Path:
    """A 2x2 PNG of loss (raw + smoothed), learning rate, gradient norm and memory against the step.

    Uses a private Figure on the Agg canvas, never pyplot, so it is safe in ComfyUI's worker threads
    and does not touch matplotlib's global backend. The PNG is written atomically.
    """
    columns: dict[str, tuple[list[int], list[float]]] = {key: ([], []) for key, _ in PANELS}
    columns["validation_loss"] = ([], [])   # drawn on the loss panel
    bad_loss = 0
    for row in iter_metrics(metrics_path):
        for key in columns:
            v = row.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                columns[key][0].append(row["step"])
                columns[key][1].append(float(v))
            elif key == "loss" and "loss" in row:
                bad_loss += 1
    fig = new_figure(11, 7.5)
    for ax, (key, label) in zip(fig.subplots(2, 2).flat, PANELS):
        steps, values = columns[key]
        ax.set_title(label + (f" ({bad_loss} non-finite steps not shown)" if key == "loss" and bad_loss else ""))
        if not steps:
            ax.text(0.5, 0.5, "not recorded", transform=ax.transAxes, ha="center", va="center", color="0.5")
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        if key == "loss":
            ax.plot(steps, values, color="tab:blue", alpha=0.3, linewidth=0.8, label="per step")
            ax.plot(steps, centred_mean(values, max(1, min(50, len(values) // 40))), color="tab:blue", linewidth=1.8,
                    label="smoothed")
            held_steps, held = columns["validation_loss"]
            if held_steps:
                ax.plot(held_steps, held, color="tab:red", linewidth=1.5, marker="o", markersize=3,
                        label="validation (held out)")
                values = values + held   # the log-scale test below sees both
            ax.legend(loc="upper right")
        else:
            ax.plot(steps, values, color={"lr": "tab:green", "grad_norm": "tab:orange"}.get(key, "tab:purple"),
                    linewidth=1.2, marker="." if len(steps) < 50 else None)
        if key in ("loss", "grad_norm") and min(values) > 0 and max(values) > 10 * min(values):
            ax.set_yscale("log")
        elif key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title)
    return save_figure(fig, out_png)


def new_figure(width: float, height: float):
    """A private Figure on the Agg canvas, never pyplot: pyplot's global state is unsafe in ComfyUI's threads."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, out_png) -> Path:
    """Written atomically: a run killed mid-write never leaves a truncated PNG."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(out, buf.getvalue())
    return out
