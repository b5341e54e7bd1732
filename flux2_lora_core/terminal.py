"""The command line's terminal side: progress bars for the engine's callbacks, Ctrl+C handling, and the
summary a training command ends with.

Kept out of the engine (which reports through callbacks) and out of cli.py (which parses and dispatches).
"""

from __future__ import annotations

import os
import signal
import sys
import time

EXIT_OK = 0


class ProgressBars:
    """The engine's progress(phase, done, total) callbacks as terminal bars with items/s and ETA.

    While entered, log records go through `tqdm.write`: a warning (say, what an interrupted cache kept) gets a line
    of its own above the bars instead of being glued to the end of one."""

    def __init__(self):
        self.bars, self._logging = {}, None

    def __call__(self, phase: str, done: int, total: int) -> None:
        from tqdm import tqdm

        bar = self.bars.get(phase)
        if bar is None:
            bar = self.bars[phase] = tqdm(total=total, desc=phase, unit="item", mininterval=0.5, file=sys.stderr)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    def __enter__(self):
        from tqdm.contrib.logging import logging_redirect_tqdm

        self._logging = logging_redirect_tqdm()
        self._logging.__enter__()
        return self

    def __exit__(self, *exc):
        for bar in self.bars.values():
            bar.close()
        if self._logging is not None:
            self._logging, redirect = None, self._logging
            redirect.__exit__(None, None, None)


class Interrupted(KeyboardInterrupt):
    """The KeyboardInterrupt a SIGINT or SIGTERM raises, remembering which, so that the exit status says it.

    A KeyboardInterrupt, so that everything already written to keep work across an interruption (the latent
    cache's manifests, the trainer's cleanup) runs for SIGTERM exactly as for Ctrl+C."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def interrupted_exit(exc: KeyboardInterrupt) -> int:
    """Say on stderr, in one line, what stopped the command, and return the exit status: 128 + the signal's
    number (130 for Ctrl+C / SIGINT, 143 for SIGTERM), as a shell reports a process a signal ended."""
    signum = getattr(exc, "signum", signal.SIGINT)  # a bare KeyboardInterrupt is Ctrl+C seen by Python's handler
    print(f"interrupted by {signal.Signals(signum).name}", file=sys.stderr)
    return 128 + signum


class StopOnSignal:
    """The first SIGINT/SIGTERM asks the trainer to stop after the current step and write a checkpoint (audit
    4.4); a second one aborts at once. `code` is the exit status to end with: 128 + the signal's number.

    Outside training (before the first step, caching, any other command) a signal aborts at once by raising
    `Interrupted`: the latent cache keeps what it encoded (latent_cache.py) and `interrupted_exit` gives the status."""

    # torchrun hands a signal it gets to every worker as SIGINT and then SIGTERM at once, and a terminal's Ctrl+C
    # reaches the workers directly as well: under torchrun, signals this close after the first are that request.
    REPEAT_SECONDS = 3.0

    def __init__(self):
        self.signal = None
        self.training = False   # set by the first step: before it there is nothing to save, so stop at once
        self.first_at = 0.0

    def _handle(self, signum, frame):
        repeated = time.monotonic() - self.first_at < self.REPEAT_SECONDS
        if self.signal is not None and repeated and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            return
        if self.signal is not None or not self.training:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise Interrupted(signum)
        self.signal, self.first_at = signum, time.monotonic()
        print(f"\n{signal.Signals(signum).name}: finishing this step and writing a checkpoint "
              "(press Ctrl+C again to abort now)", file=sys.stderr)

    def __enter__(self):
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    @property
    def code(self) -> int:
        return EXIT_OK if self.signal is None else 128 + self.signal


class TrainingBar:
    """Trainer callbacks as a terminal progress bar: step, loss, lr, it/s and ETA (audit 5.1)."""

    def __init__(self, desc: str = "train", stop: StopOnSignal | None = None):
        from tqdm import tqdm

        self.tqdm, self.desc, self.bar, self.stop = tqdm, desc, None, stop
        self.setup = ProgressBars().__enter__()  # left in `close`

    def on_progress(self, phase, done, total):
        self.setup(phase, done, total)

    def on_phase(self, phase):
        if phase == "training" and self.stop is not None:   # from here a signal stops at the end of a step
            self.stop.training = True                        # (the setup bars and the step bar say what runs)

    def on_step(self, report):
        if self.stop is not None:
            self.stop.training = True
        if self.bar is None:
            self.bar = self.tqdm(total=report.total, desc=self.desc, unit="step", file=sys.stderr, mininterval=0.5)
        self.bar.update(report.step - self.bar.n)
        if report.loss is not None:
            self.bar.set_postfix(loss=f"{report.loss:.4f}", lr=f"{report.lr:.2e}", refresh=False)

    def on_sample(self, step, paths):
        if self.bar is not None:
            self.bar.write(f"samples at step {step}: {paths[0].parent}")

    def should_stop(self):
        return self.stop is not None and self.stop.signal is not None

    def close(self):
        self.setup.__exit__()
        if self.bar is not None:
            self.bar.close()


def command_name() -> str:
    """`flux2-lora` as this shell can run it again, for the commands we print: the bare name only where PATH finds
    this very program; else its full path (a venv not activated, as after scripts/demo.sh), else `python -m`."""
    import os
    import shlex
    import shutil

    me = os.path.abspath(sys.argv[0])
    if os.path.basename(me) != "flux2-lora":    # started as `python -m flux2_lora_core`
        return f"{shlex.quote(sys.executable)} -m flux2_lora_core"
    found = shutil.which("flux2-lora")
    return "flux2-lora" if found and os.path.exists(me) and os.path.samefile(found, me) else shlex.quote(me)


def report_training(result) -> None:
    """What a training command prints at the end: where everything is, and how to resume a stopped run."""
    import shlex

    print(f"trained {result.steps} steps{' (stopped early)' if result.stopped_early else ''}; run folder "
          f"{result.run_dir}")
    if result.lora_path is None:
        return
    if result.stopped_early:
        print(f"  resume:  {command_name()} resume {shlex.quote(str(result.run_dir))}")
    print(f"  LoRA:    {result.lora_path}")
    print(f"  config:  {result.run_dir / 'config.yaml'} (runs it again; on a cluster too: see its header)")
    print(f"  curves:  {result.curves}")
    if result.samples:   # on resume, the whole run's (resume.earlier_samples)
        count = len(result.samples)
        print(f"  samples: {result.samples[0].parent} ({count} image{'s' if count != 1 else ''})")
