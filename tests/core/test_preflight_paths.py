"""Every path of a training config is checked before anything loads, and the error names its key.

Before, an output.dir under a file surfaced as a bare `[Errno 20] Not a directory` after the encoders had run and
the transformer had loaded. Each case here is one a user meets (root included: tests may run as root, for whom
permission bits stop nothing, so the unwritable cases are a file in the way and a kernel folder). The proof that
nothing loaded: no loading line on stderr, the cache folder never created, and, in-process, no phase entered.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flux2_lora_core.config import load_config
from flux2_lora_core.errors import ConfigError
from flux2_lora_core.resume import resume
from flux2_lora_core.training import Callbacks, train

ROOT = Path(__file__).resolve().parents[2]
LOADING = ("loading the", "loaded ", "LoRA rank", "latents", "captions:")   # what caching and loading log


@pytest.fixture(scope="module")
def workspace(training_files):
    return training_files("klein", 4)


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("a regular file where a folder is expected")
    return path


def settings(root: Path, tmp_path: Path, *overrides) -> list[str]:
    return [f"model.path={root / 'model'}", f"data.path={root / 'data'}", "data.resolution=64",
            f"cache.dir={tmp_path / 'cache'}", f"output.dir={tmp_path / 'runs'}", "lora.rank=2", "train.steps=2",
            "sample.steps=0", *overrides]


def train_cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "flux2_lora_core", "train", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def broken_model(workspace: Path, tmp_path: Path) -> Path:
    """A diffusers folder whose transformer/ lost its weights (an interrupted download)."""
    model = shutil.copytree(workspace / "model", tmp_path / "broken-model")
    for weights in (model / "transformer").glob("*.safetensors"):
        weights.unlink()
    return model


CASES = {   # id: (override, the key the error must name, words the message must hold)
    "output.dir is a file": ("output.dir={file}", "output.dir", "is a file, not a folder"),
    "output.dir under a file": ("output.dir={file}/runs", "output.dir", "is a file, not a folder"),
    "output.dir in a kernel folder": ("output.dir=/proc/flux2-lora-runs", "output.dir", "is not writable"),
    "cache.dir is a file": ("cache.dir={file}", "cache.dir", "is a file, not a folder"),
    "cache.dir under a file": ("cache.dir={file}/cache", "cache.dir", "cannot be created"),
    "dataset missing": ("data.path={tmp}/no-such-dataset", "data.path", "does not exist"),
    "vae file missing": ("model.vae={tmp}/flux2-vae.safetensors", "model.vae", "does not exist"),
    "transformer weights missing": ("model.path={broken}", "model.path", "no .safetensors weights"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_path_fails_before_anything_loads_naming_its_key(workspace, tmp_path, a_file, case):
    override, key, words = CASES[case]
    if "/proc/" in override and not os.path.isdir("/proc"):
        pytest.skip("no /proc on this system")
    broken = broken_model(workspace, tmp_path) if "{broken}" in override else ""
    override = override.format(file=a_file, tmp=tmp_path, broken=broken)
    done = train_cli(*settings(workspace, tmp_path, override), cwd=tmp_path)
    assert done.returncode == 1, done.stderr                        # the exit code of every config error
    assert "Traceback" not in done.stderr and "Errno" not in done.stderr
    assert done.stderr.startswith(f"error: {key}: ") and words in done.stderr, done.stderr
    assert not [line for line in LOADING if line in done.stderr], done.stderr
    assert not (tmp_path / "cache").exists() and not (tmp_path / "runs").exists()   # caching never started


def test_every_bad_path_is_reported_at_once(workspace, tmp_path, a_file):
    done = train_cli(*settings(workspace, tmp_path, f"output.dir={a_file}/runs", f"cache.dir={a_file}",
                               f"data.path={tmp_path / 'nothing'}", f"model.vae={tmp_path / 'vae.safetensors'}"),
                     cwd=tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    reported = [line.split(":")[0].strip() for line in done.stderr.splitlines()[1:]]
    assert sorted(reported) == ["cache.dir", "data.path", "model.vae", "output.dir"], done.stderr


def test_the_cache_command_checks_its_folder_before_an_encoder_loads(workspace, tmp_path, a_file):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "flux2_lora_core", "cache", f"model.path={workspace / 'model'}",
                           f"data.path={workspace / 'data'}", "data.resolution=64", f"cache.dir={a_file}/cache"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr and "Errno" not in done.stderr
    assert done.stderr.startswith("error: cache.dir: ") and "cannot be created" in done.stderr, done.stderr
    assert not [line for line in LOADING if line in done.stderr], done.stderr


class Phases(Callbacks):
    """What the trainer reports it is doing: the ComfyUI Train node's live panel hears the same."""

    def __init__(self):
        self.phases = []

    def on_phase(self, phase):
        self.phases.append(phase)


def test_the_engine_checks_before_caching_for_every_caller(workspace, tmp_path, a_file):
    """train(config) is what the Train node calls: the same check runs there, before the caching phase."""
    phases = Phases()
    config = load_config(None, settings(workspace, tmp_path, f"output.dir={a_file}/runs"))
    with pytest.raises(ConfigError) as error:
        train(config, phases)
    assert [key for key, _ in error.value.problems] == ["output.dir"] and phases.phases == []


def test_resume_checks_the_folder_it_writes_before_loading(workspace, tmp_path, a_file):
    run = train(load_config(None, settings(workspace, tmp_path, "train.steps=1"))).run_dir
    phases = Phases()
    with pytest.raises(ConfigError) as error:        # --output under a file: before the new run folder is made
        resume(run, steps=1, output=a_file / "more", callbacks=phases)
    assert [key for key, _ in error.value.problems] == ["output.dir"] and phases.phases == []
    with pytest.raises(ConfigError) as error:        # a graph's (or an override's) cache.dir is checked as well
        resume(run, steps=1, updates={"cache.dir": str(a_file)}, callbacks=phases)
    assert [key for key, _ in error.value.problems] == ["cache.dir"] and phases.phases == []
    moved = run.rename(tmp_path / "moved")           # a run moved away; where it was is now a file
    shutil.rmtree(tmp_path / "runs")
    (tmp_path / "runs").write_text("")
    assert resume(moved, steps=1).steps == 2         # in place: the run's own folder, whatever output.dir says
