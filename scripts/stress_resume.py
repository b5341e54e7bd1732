"""Kill training with SIGKILL at random moments, resume each time, and count what survived.

A `flux2-lora train` subprocess on a tiny model writes a checkpoint every step. Each trial kills it
(SIGKILL: no handler runs) either after a random delay or the moment a checkpoint write is seen in
progress (a temporary folder in checkpoints/), then checks that every checkpoint that was complete
before the kill is still intact, and resumes with `flux2-lora resume RUN_DIR`, which the next trial
kills again. At the end the last resume runs to completion and its LoRA is compared with an
uninterrupted run of the same config: kills must not change the result.

    python scripts/stress_resume.py --trials 50          # ~5 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flux2_lora_core.checkpoints import (checkpoint_step, find_checkpoints, newest_intact,  # noqa: E402
                                         verify_checkpoint)


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "flux2_lora_core", *map(str, args)]


def settings(root: Path, out: Path, steps: int) -> list[str]:
    return [f"model.path={root / 'model'}", f"data.path={root / 'data'}", "data.resolution=64", "data.flip=true",
            f"cache.dir={root / 'cache'}", f"output.dir={out}", "output.name=run", "lora.rank=8", "lora.dropout=0.1",
            "train.caption_dropout=0.2", f"train.steps={steps}", "train.lr=1e-3", "train.log_every=1",
            "checkpoint.every=1", "checkpoint.keep=2", "sample.steps=1", "sample.resolution=64", "sample.guidance=1.0"]


def intact(run: Path) -> set[str]:
    good = set()
    for folder in find_checkpoints(run) if (run / "checkpoints").exists() else []:
        try:
            verify_checkpoint(folder)
            good.add(folder.name)
        except Exception:  # noqa: BLE001 - any failure means not intact
            pass
    return good


def wait_and_kill(process, run: Path, rng: random.Random, during_save: bool, timeout: float = 60) -> str:
    """SIGKILL after a random delay, or as soon as a checkpoint write is in progress; returns what happened."""
    deadline = time.monotonic() + timeout
    delay = time.monotonic() + rng.uniform(3.0, 8.0)
    checkpoints = run / "checkpoints"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return "finished"
        if during_save:
            if checkpoints.exists() and any(p.name.startswith(".") for p in checkpoints.iterdir()):
                process.send_signal(signal.SIGKILL)
                process.wait()
                return "killed during a save"
        elif time.monotonic() >= delay:
            process.send_signal(signal.SIGKILL)
            process.wait()
            return "killed"
        time.sleep(0.001 if during_save else 0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return "killed (timeout)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--steps", type=int, default=100000, help="train.steps of the run (kept out of reach)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    rng = random.Random(args.seed)

    from flux2_lora_core.data import write_demo_dataset
    from flux2_lora_core.models import write_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_tiny_model(root / "model", variant="klein")
        write_demo_dataset(root / "data", count=4, size=256)
        run = root / "out" / "run"
        resumes_ok, lost, outcomes = 0, [], {}
        process = subprocess.Popen(cli("train", *settings(root, root / "out", args.steps)), env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # Killing before the first checkpoint exists tests nothing: there is nothing to resume yet.
        while not ((run / "checkpoints").exists() and find_checkpoints(run)):
            if process.poll() is not None:
                raise SystemExit(f"training failed to start:\n{process.stderr.read().decode(errors='replace')}")
            time.sleep(0.05)
        for trial in range(1, args.trials + 1):
            during_save = trial % 2 == 0
            what = wait_and_kill(process, run, rng, during_save)
            outcomes[what] = outcomes.get(what, 0) + 1
            before = intact(run)
            try:
                chosen, skipped = newest_intact(run)
            except Exception as exc:  # noqa: BLE001
                print(f"trial {trial}: {what}; NO intact checkpoint: {exc}")
                lost.append((trial, "all"))
                break
            step_before = checkpoint_step(chosen)
            process = subprocess.Popen(cli("resume", run), env=env, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.PIPE)
            # The resume worked when it writes a checkpoint past the one it started from.
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and process.poll() is None:
                newer = [p for p in find_checkpoints(run) if checkpoint_step(p) > step_before]
                if newer:
                    resumes_ok += 1
                    break
                time.sleep(0.02)
            else:
                err = process.stderr.read().decode(errors="replace")[-2000:] if process.poll() is not None else ""
                print(f"trial {trial}: resume from {chosen.name} did not get further\n{err}")
            gone = sorted(before - intact(run) - {p.name for p in skipped})
            # Retention (checkpoint.keep=2) removes old ones on purpose; a loss is the newest intact one vanishing.
            if chosen.name in gone:
                lost.append((trial, chosen.name))
            print(f"trial {trial:3d}: {what:22s} newest intact {chosen.name} (skipped {len(skipped)}); resumed")
        process.send_signal(signal.SIGKILL)
        process.wait()
        print(f"\n{args.trials} trials ({', '.join(f'{v} {k}' for k, v in outcomes.items())}); "
              f"{resumes_ok} resumes got past their checkpoint; checkpoints lost: {len(lost)} {lost or ''}")

        # The result must not depend on the kills: finish the killed run and an uninterrupted one to the same step.
        final = checkpoint_step(newest_intact(run)[0]) + 3
        subprocess.run(cli("resume", run, f"train.steps={final}"), env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.run(cli("train", *settings(root, root / "straight", final)), env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        from safetensors.torch import load_file

        a = load_file(run / "lora" / "run.safetensors")
        b = load_file(root / "straight" / "run" / "lora" / "run.safetensors")
        same = a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
        print(f"final LoRA after {final} steps with {args.trials} kills == uninterrupted run: {same}")
        return 0 if not lost and resumes_ok == args.trials and same else 1


if __name__ == "__main__":
    sys.exit(main())
