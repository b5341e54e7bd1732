"""train.compile (regional torch.compile of the transformer blocks) on the tiny model: compiled once per bucket
shape, never again on later steps of the same bucket. A recompile costs seconds to minutes on a real model, so
one that a step triggers every time (a Python value the graph guards on changing per step) would erase the gain."""

from __future__ import annotations

import math

from flux2_lora_core.config import load_config
from flux2_lora_core.training import Callbacks, trainer


def run_settings(root, steps: int) -> list[str]:
    """A short run on one bucket: one shape for every step."""
    return [f"model.path={root / 'model'}", f"data.path={root / 'data'}", "data.resolution=64", "data.buckets=false",
            f"cache.dir={root / 'cache'}", "lora.rank=4", f"train.steps={steps}", "sample.steps=0",
            "train.timestep_sampling=uniform", "train.log_every=1"]


class GraphCount(Callbacks):
    """Dynamo's compiled-graph count after each step."""

    def __init__(self):
        self.graphs: list[int] = []

    def on_step(self, report):
        from torch._dynamo.utils import counters

        self.graphs.append(counters["stats"]["unique_graphs"])


def test_compiled_blocks_compile_once_and_train_like_eager(training_files, tmp_path):
    import torch._dynamo
    from torch._dynamo.utils import counters

    settings = run_settings(training_files("klein", 4), steps=5)
    torch._dynamo.reset()
    counters.clear()
    seen = GraphCount()
    compiled = trainer.train(load_config(None, [*settings, "train.compile=true", f"output.dir={tmp_path / 'c'}"]), seen)
    assert seen.graphs[0] > 0 and seen.graphs == [seen.graphs[0]] * 5, seen.graphs   # none after the first step
    assert sum(counters["recompiles"].values()) == 0                                  # and no guard ever failed
    eager = trainer.train(load_config(None, [*settings, f"output.dir={tmp_path / 'e'}"]), Callbacks())
    assert all(math.isclose(a, b, rel_tol=1e-4) for a, b in zip(compiled.losses, eager.losses)), \
        (compiled.losses, eager.losses)
    torch._dynamo.reset()


def test_a_given_transformer_trains_eager_then_compiled_and_comes_back_uncompiled(training_files, tmp_path):
    """The path a ComfyUI server takes when it trains twice on the model it keeps loaded, the second time with
    train.compile: eager steps, the adapter unloaded, then added again and the blocks compiled. (On an H200 this
    path crashed with an illegal memory access, 2026-11-29; the CPU cannot show that, but it shows the engine's
    side: both runs train alike and the model goes back with no compiled block to call over the removed LoRA.)"""
    import torch._dynamo

    from flux2_lora_core.models.tiny_models import build_tiny_pipeline

    settings = run_settings(training_files("klein", 4), steps=2)
    given = build_tiny_pipeline("klein", seed=0).transformer
    blocks = [*given.transformer_blocks, *given.single_transformer_blocks]
    torch._dynamo.reset()
    eager = trainer.train(load_config(None, [*settings, f"output.dir={tmp_path / 'e'}"]), transformer=given)
    compiled = trainer.train(load_config(None, [*settings, "train.compile=true", f"output.dir={tmp_path / 'c'}"]),
                             transformer=given)
    assert all(math.isclose(a, b, rel_tol=1e-4) for a, b in zip(compiled.losses, eager.losses)), \
        (compiled.losses, eager.losses)
    assert all(block._compiled_call_impl is None for block in blocks)
    assert not getattr(given, "peft_config", None)
    torch._dynamo.reset()
