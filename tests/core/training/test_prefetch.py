"""Batch prefetching (prefetch.py) on the tiny FLUX.2 [klein] model and a real latent cache: the same run bit for
bit, batches ready before the step asks, errors raised on the training thread, and no thread left behind."""

from __future__ import annotations

import threading

import pytest
import torch
from safetensors.torch import load_file

from flux2_lora_core.config import load_config
from flux2_lora_core.resume import resume
from flux2_lora_core.training import Callbacks, prefetch, trainer


@pytest.fixture(autouse=True)
def prefetch_on_the_cpu(monkeypatch):
    """The thread reads ahead for accelerators only (prefetch.ON_CPU says why); these tests run it on the CPU."""
    monkeypatch.setattr(prefetch, "ON_CPU", True)


@pytest.fixture(scope="module")
def workspace(training_files):
    return training_files("klein", 4)


def make_config(root, out, *overrides, cache=None):
    # Every source of randomness the batch depends on: flips, caption dropout (often, so it happens), accumulation,
    # and a two-resolution schedule, so the read-ahead plan crosses from one resolution's stream to the other's.
    return load_config(None, [f"model.path={root / 'model'}", f"data.path={root / 'data'}", "data.resolution=[64,80]",
                              "data.flip=true", f"cache.dir={cache or root / 'cache-prefetch'}", f"output.dir={out}",
                              "lora.rank=4", "lora.dropout=0.1", "train.caption_dropout=0.5", "train.lr=1e-3",
                              "train.gradient_accumulation=2", "train.steps=6", "train.log_every=2",
                              "sample.steps=0", *overrides])


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "flux2-lora-prefetch"]


class Slow(Callbacks):
    """A step that takes a while (as a GPU step does), so the reads have somewhere to hide."""

    def on_step(self, report):
        threading.Event().wait(0.2)


def test_prefetching_trains_the_same_lora_bit_for_bit(workspace, tmp_path, stop_after):
    runs = {depth: trainer.train(make_config(workspace, tmp_path / str(depth), "train.batch_size=2",
                                             f"train.prefetch_batches={depth}")) for depth in (0, 1, 3)}
    # Half a run read synchronously, resumed with prefetching: the read-ahead starts at the checkpoint's place.
    half = trainer.train(make_config(workspace, tmp_path / "half", "train.batch_size=2", "train.prefetch_batches=0"),
                         stop_after(3))
    resumed = resume(half.run_dir, overrides=["train.prefetch_batches=2"])
    assert half.losses + resumed.losses == runs[0].losses
    runs["resumed"] = resumed
    weights = {depth: load_file(run.lora_path) for depth, run in runs.items()}
    for depth in (1, 3):
        assert runs[depth].losses == runs[0].losses
    for depth in (1, 3, "resumed"):
        assert weights[depth].keys() == weights[0].keys()
        assert all(torch.equal(weights[depth][k], weights[0][k]) for k in weights[0])
    assert prefetch_threads() == []


def test_the_plan_and_the_chosen_rows_match_what_the_step_reads_itself(workspace, tmp_path):
    """upcoming() draws nothing from the loop's streams; choose() gives the batch the synchronous path stacks."""
    s = trainer.setup(make_config(workspace, tmp_path, "train.batch_size=2"), Callbacks())
    try:
        plan = list(prefetch.upcoming(s.streams, 0, 6, (64, 80), 2))
        assert all((stream.epoch, stream.position) == (0, 0) for stream in s.streams.values())
        assert plan == [(r, s.streams[r].next()) for r, _ in plan]
        assert any(len(indices) == 2 for _, indices in plan)
        with prefetch.Prefetcher(s.cache, iter(plan), dtype=s.dtype, device=s.device, flip=True) as batches:
            for n, (resolution, indices) in enumerate(plan):
                flips = torch.tensor([(n + j) % 2 == 0 for j in range(len(indices))])
                dropped = torch.tensor([(n + j) % 3 == 0 for j in range(len(indices))])
                latents, texts, refs = batches.get(resolution, indices).choose(flips, dropped)
                assert refs is None                     # a text-to-image dataset: no reference latents
                expected = torch.stack([s.cache.latent(i, resolution, flipped=bool(f)) for i, f in zip(indices, flips)])
                assert torch.equal(latents, expected.to(s.dtype))
                expected = torch.stack([s.cache.text(None if d else i) for i, d in zip(indices, dropped)])
                assert torch.equal(texts, expected.to(s.dtype))
            with pytest.raises(RuntimeError, match="is not the one drawn"):
                batches.get(64, [0])                    # the plan is exhausted: a bug, said so, never a wrong batch
    finally:
        trainer.cleanup(s, release_model=True)
    assert prefetch_threads() == []


def test_each_batch_is_read_before_the_step_asks_for_it(workspace, tmp_path, monkeypatch):
    made = []

    def recording(s):
        made.append(prefetch.prefetcher_for(s))
        return made[-1]

    monkeypatch.setattr(trainer, "prefetcher_for", recording)
    result = trainer.train(make_config(workspace, tmp_path, "train.steps=5"), Slow())
    assert result.steps == 5 and len(made) == 1
    # 10 micro-batches; only the first can have found the queue empty (the thread had just started).
    assert made[0].waits <= 1
    assert prefetch_threads() == []


def test_the_queue_is_bounded(workspace, tmp_path):
    s = trainer.setup(make_config(workspace, tmp_path), Callbacks())
    reads = []
    latent = s.cache.latent
    s.cache.latent = lambda *args, **kwargs: reads.append(args) or latent(*args, **kwargs)
    try:
        plan = prefetch.upcoming(s.streams, 0, 6, (64, 80), 2)
        with prefetch.Prefetcher(s.cache, plan, dtype=s.dtype, device=s.device, flip=True, depth=2) as batches:
            for _ in range(100):
                if batches._queue.full():
                    break
                threading.Event().wait(0.05)
            threading.Event().wait(0.3)                 # time to read more, were it not bounded
            # depth batches queued plus at most one read and waiting for a slot; each: 1 image x 2 orientations
            assert 2 * 2 <= len(reads) <= 3 * 2
    finally:
        trainer.cleanup(s, release_model=True)
    assert prefetch_threads() == []


def test_a_read_error_is_raised_on_the_training_thread_with_its_message(workspace, tmp_path):
    """A latent shard deleted under a run: with and without prefetching, the same error at the same step."""
    cache = tmp_path / "cache"
    sessions = {depth: trainer.setup(make_config(workspace, tmp_path / str(depth), f"train.prefetch_batches={depth}",
                                                 cache=cache), Callbacks()) for depth in (0, 2)}
    shards = [p for p in cache.rglob("*.safetensors") if "latent" in str(p.relative_to(cache))]
    assert shards
    for shard in shards:
        shard.unlink()
    errors = {}
    try:
        for depth, s in sessions.items():
            with pytest.raises(Exception) as error:
                trainer.train_loop(s, Callbacks())
            errors[depth] = (type(error.value), str(error.value), s.step)
    finally:
        for s in sessions.values():
            trainer.cleanup(s, release_model=True)
    assert errors[2] == errors[0]
    assert prefetch_threads() == []


def test_a_stop_request_ends_the_thread(workspace, tmp_path, stop_after):
    result = trainer.train(make_config(workspace, tmp_path, "train.steps=50"), stop_after(2))
    assert result.stopped_early and result.steps == 2
    assert prefetch_threads() == []
