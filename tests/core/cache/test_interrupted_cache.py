"""An interrupted cache build keeps its work: Ctrl+C, SIGTERM, SIGKILL and ComfyUI's Cancel, on the tiny models.

The CLI tests send real signals to real `flux2-lora cache` / `flux2-lora train` processes once their progress bar
shows latents encoded (never after a fixed sleep), then check the exit status, the one-line message, that the
next build encodes only the rest, and that the result equals a cache built without interruption.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from flux2_lora_core.cache import CacheSettings, build_latent_cache, cache_for_config, open_latent_cache
from flux2_lora_core.cache.frozen_encoders import LoadedEncoders
from flux2_lora_core.cache.store import MANIFEST, ShardStore
from flux2_lora_core.config import load_config
from flux2_lora_core.data.dataset import load_dataset
from flux2_lora_core.models.tiny_models import build_tiny_pipeline

ROOT = Path(__file__).resolve().parents[3]
IMAGES = 12     # at 256 px one tiny-VAE encode takes ~0.1-2 s here: the signal lands mid-build with room to spare
RES = 256


# ------------------------------------------------------------------------------------------ helpers
def latent_manifest(cache_dir: Path) -> dict:
    (path,) = cache_dir.glob(f"*/latents-*/{MANIFEST}")
    return json.loads(path.read_text(encoding="utf-8"))


def assert_same_cache(cache, reference) -> None:
    """The same entry keys and equal tensors: an interrupted-then-finished cache is the uninterrupted one."""
    assert [i.path for i in cache.items] == [i.path for i in reference.items]
    assert cache._latents.entries.keys() == reference._latents.entries.keys()
    assert cache._texts.entries.keys() == reference._texts.entries.keys()
    for i in range(len(cache)):  # one image per VAE call in both builds: the very same computation
        assert torch.equal(cache.latent(i, RES), reference.latent(i, RES)), cache.items[i].path
        assert torch.equal(cache.text(i), reference.text(i))
    assert torch.equal(cache.text(None), reference.text(None))


class Stderr:
    """A process's stderr read as it arrives (tqdm writes `\\r`, not lines), so a test can wait for progress."""

    def __init__(self, process: subprocess.Popen):
        self.text, self._process = "", process
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        for chunk in iter(lambda: os.read(self._process.stderr.fileno(), 4096), b""):
            self.text += chunk.decode("utf-8", "replace")

    def wait_for_latents(self, at_least: int, timeout: float = 300) -> int:
        """Block until the progress bar shows `at_least` latents encoded; the count it shows."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = [int(n) for n in re.findall(r"latents:[^\r\n]*?\| *(\d+)/\d+", self.text)]
            if done and max(done) >= at_least:
                return max(done)
            assert self._process.poll() is None, f"exited {self._process.returncode} first:\n{self.text}"
            time.sleep(0.05)
        raise AssertionError(f"no progress past {at_least} latents in {timeout} s:\n{self.text}")

    def finish(self, timeout: float = 300) -> str:
        self._process.wait(timeout=timeout)
        self._thread.join(timeout=30)
        return self.text


def start(args, *, python=("-m", "flux2_lora_core")) -> tuple[subprocess.Popen, Stderr]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, *python, *map(str, args)], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    return process, Stderr(process)


def cache_settings(files: Path, cache_dir: Path) -> list[str]:
    return [f"model.path={files / 'model'}", f"data.path={files / 'data'}", f"data.resolution={RES}",
            f"cache.dir={cache_dir}", "cache.batch_size=1"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from flux2_lora_core.data.demo_data import write_demo_dataset
    from flux2_lora_core.models.tiny_models import write_tiny_model

    root = tmp_path_factory.mktemp("interrupted-cache")
    write_tiny_model(root / "model", variant="klein")
    write_demo_dataset(root / "data", count=IMAGES, size=RES)
    return root


@pytest.fixture(scope="module")
def reference(files, tmp_path_factory):
    """The cache built in one go, by the same code the CLI runs."""
    config = load_config(None, cache_settings(files, tmp_path_factory.mktemp("reference")))
    cache, _ = cache_for_config(config)
    return cache


def finish_with_cache(files, cache_dir, kept: int) -> None:
    """`flux2-lora cache` after the interruption: the kept latents are reused, only the rest is encoded."""
    again = subprocess.run([sys.executable, "-m", "flux2_lora_core", "cache", *cache_settings(files, cache_dir)],
                           env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert f"latents: {IMAGES - kept} encoded, {kept} reused;" in again.stdout, again.stdout


# ------------------------------------------------------------------------------------------ real signals
@pytest.mark.parametrize("command", ["cache", "train"])
@pytest.mark.parametrize("sent, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_caching_keeps_every_encoded_latent(files, reference, tmp_path, command, sent, code):
    extra = [f"output.dir={tmp_path / 'runs'}", "train.steps=2", "sample.steps=0"] if command == "train" else []
    process, stderr = start([command, *cache_settings(files, tmp_path / "cache"), *extra])
    shown = stderr.wait_for_latents(2)
    process.send_signal(sent)
    err = stderr.finish()
    assert process.returncode == code, err
    assert "Traceback" not in err
    assert err.rstrip().splitlines()[-1] == f"interrupted by {sent.name}", err
    kept = len(latent_manifest(tmp_path / "cache")["entries"])
    assert shown <= kept < IMAGES, err          # everything the bar counted, and not the whole dataset
    assert f"kept the {kept} latents and 0 captions encoded before the stop" in err
    finish_with_cache(files, tmp_path / "cache", kept)
    assert_same_cache(open_latent_cache(next((tmp_path / "cache").iterdir())), reference)


KILLED = ("import sys, flux2_lora_core.cache.store as store; store.FLUSH_SECONDS = 0; "  # a shard after every image
          "from flux2_lora_core.cli import main; sys.exit(main(sys.argv[1:]))")


def test_sigkill_leaves_a_loadable_store_and_loses_at_most_the_unwritten_shard(files, reference, tmp_path):
    process, stderr = start(["cache", *cache_settings(files, tmp_path / "cache")], python=("-c", KILLED))
    shown = stderr.wait_for_latents(3)
    process.kill()
    stderr.finish()
    assert process.returncode == -signal.SIGKILL
    manifest = latent_manifest(tmp_path / "cache")
    (folder,) = (tmp_path / "cache").glob("*/latents-*")
    store = ShardStore(folder, manifest["identity"]).load(verify="full")
    assert not store.damaged and store.entries.keys() == manifest["entries"].keys()
    assert shown <= len(store.entries) < IMAGES  # each image's shard was listed before the bar counted it
    finish_with_cache(files, tmp_path / "cache", len(store.entries))
    assert_same_cache(open_latent_cache(next((tmp_path / "cache").iterdir())), reference)


# ------------------------------------------------------------------------------------------ in process
class InterruptProcessingException(BaseException):
    """What ComfyUI's progress-bar hook raises on Cancel (comfy.model_management, a BaseException)."""


class CancelAfter:
    """A progress callback that cancels, as ComfyUI's does, once `phase` reached `done` items."""

    def __init__(self, phase: str, done: int, exc=InterruptProcessingException):
        self.phase, self.done, self.exc = phase, done, exc

    def __call__(self, phase, done, total):
        if phase == self.phase and done >= self.done:
            raise self.exc()


@pytest.fixture(scope="module")
def encoders():
    return LoadedEncoders.from_pipeline(build_tiny_pipeline("klein"), "klein")


@pytest.fixture
def small_dataset(tmp_path):
    from flux2_lora_core.data.demo_data import write_demo_dataset

    return load_dataset(write_demo_dataset(tmp_path / "data", count=5, size=256))


def build(dataset, encoders, cache_dir, progress=None, resolutions=(64,)):
    return build_latent_cache(dataset, encoders, CacheSettings(resolutions=resolutions), cache_dir=cache_dir,
                              batch_size=1, progress=progress)


@pytest.mark.parametrize("phase, done, exc", [("latents", 2, InterruptProcessingException),
                                              ("latents", 4, KeyboardInterrupt),
                                              ("captions", 3, InterruptProcessingException)])
def test_a_cancel_from_the_progress_callback_keeps_what_was_encoded(encoders, small_dataset, tmp_path, phase,
                                                                     done, exc):
    reference = build(small_dataset, encoders, tmp_path / "reference")
    with pytest.raises(exc):
        build(small_dataset, encoders, tmp_path / "cache", progress=CancelAfter(phase, done, exc))
    again = build(small_dataset, encoders, tmp_path / "cache").summary
    if phase == "latents":
        assert (again.images_encoded, again.images_reused, again.captions_reused) == (5 - done, done, 0)
    else:  # every latent, and the captions before the cancel (the empty one among them)
        assert (again.images_encoded, again.images_reused) == (0, 5)
        assert (again.captions_encoded, again.captions_reused) == (6 - done, done)
    cache = build(small_dataset, encoders, tmp_path / "cache")
    for i in range(len(cache)):
        assert torch.equal(cache.latent(i, 64), reference.latent(i, 64))
        assert torch.equal(cache.text(i), reference.text(i))


def test_an_interrupted_build_deletes_nothing_and_the_last_cache_stays_readable(encoders, small_dataset, tmp_path):
    first = build(small_dataset, encoders, tmp_path / "cache")
    before = set(first._latents.entries)
    with pytest.raises(KeyboardInterrupt):  # a second resolution, stopped after two images
        build(small_dataset, encoders, tmp_path / "cache", progress=CancelAfter("latents", 2, KeyboardInterrupt),
              resolutions=(64, 128))
    reopened = open_latent_cache(first.root, verify="full")  # the index of the last complete build still reads
    assert before < set(reopened._latents.entries) and len(reopened._latents.entries) == len(before) + 2
    for i in range(len(first)):
        assert torch.equal(reopened.latent(i, 64), first.latent(i, 64))
