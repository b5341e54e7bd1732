"""Data-parallel training under torchrun (distributed.py): real processes on the gloo backend, on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from flux2_lora_core.training.distributed import Ranks

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}   # two ranks on two cores


def run(args: list[str], ranks: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"] if ranks > 1 else []
    done = subprocess.run([sys.executable, *launcher, "-m", "flux2_lora_core", *args], capture_output=True,
                          text=True, timeout=timeout, env=ENV)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    return done


@pytest.mark.parametrize("world", [2, 3, 4])
def test_each_rank_gets_a_contiguous_even_share_of_a_global_batch(world):
    for count in range(0, 9):
        shares = [Ranks(rank, world).share(count) for rank in range(world)]
        sizes = [s.stop - s.start for s in shares]
        assert [i for s in shares for i in range(count)[s]] == list(range(count)) and max(sizes) - min(sizes) <= 1


def test_two_ranks_train_the_same_lora_as_one_with_the_same_global_batch(training_files, tmp_path):
    """Two gloo ranks, one sample each, against one process with both: the same global batches, draws and updates.
    Buckets are on, so a bucket's short last batch leaves a rank with no sample some steps (its gradient is zero
    and its share of the loss is 0). Then the 2-rank run's checkpoint resumes in one process."""
    root = training_files("klein", 4)
    common = [f"model.path={root / 'model'}", f"data.path={root / 'data'}", "data.resolution=64",
              f"cache.dir={root / 'cache'}", "lora.rank=4", "train.steps=4", "train.lr=1e-3", "train.log_every=1",
              "sample.steps=0", "checkpoint.every=2", "train.timestep_sampling=uniform"]
    run(["train", *common, f"output.dir={tmp_path / 'two'}", "train.batch_size=1"], ranks=2)
    run(["train", *common, f"output.dir={tmp_path / 'one'}", "train.batch_size=2"])
    two, one = (load_file(tmp_path / name / "flux2_lora" / "lora" / "flux2_lora.safetensors") for name in ("two", "one"))
    assert two.keys() == one.keys()
    assert max(float((two[k] - one[k]).abs().max()) for k in two) <= 1e-5
    assert max(float(v.abs().max()) for v in two.values()) > 1e-4                        # it learned something
    rows = [json.loads(line) for line in (tmp_path / "two" / "flux2_lora" / "metrics.jsonl").read_text().splitlines()]
    others = [json.loads(line) for line in (tmp_path / "one" / "flux2_lora" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]                                   # written once, by rank 0
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in others], rel=1e-5)
    run(["resume", str(tmp_path / "two" / "flux2_lora"), "--steps", "2"])                 # 2 ranks -> 1 process
    rows = (tmp_path / "two" / "flux2_lora" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in rows] == [1, 2, 3, 4, 5, 6]


def test_ranks_that_disagree_are_refused_by_name(tmp_path):
    script = tmp_path / "disagree.py"
    script.write_text("from flux2_lora_core.errors import ConfigError\n"
                      "from flux2_lora_core.training import distributed\n"
                      "ranks = distributed.start('cpu')\n"
                      "try:\n"
                      "    distributed.agree(ranks, {'cache': 'same', 'model.path': f'weights-{ranks.rank}'})\n"
                      "except ConfigError as exc:\n"
                      "    print(f'rank {ranks.rank}: {exc}')\n"
                      "distributed.leave()\n")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(script)], capture_output=True, text=True, timeout=300, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):   # every rank refuses, naming the key and both values
        assert f"rank {rank}: " in done.stdout and "model.path: rank 1 has 'weights-1' but rank 0 has 'weights-0'" \
            in done.stdout, done.stdout
    assert "cache: rank" not in done.stdout                                            # only what differs


def test_two_ranks_fill_the_cache_together_as_one_process_would(training_files, tmp_path):
    """`torchrun ... cache`: each rank encodes a share of the images and captions into shards of its own, and rank
    0 lists them all in the one manifest it writes. The result reads as one process's cache does, tensor for
    tensor, and training reuses it whole."""
    from flux2_lora_core.cache.index import open_latent_cache

    root = training_files("klein", 4)
    common = [f"model.path={root / 'model'}", f"data.path={root / 'data'}", "data.resolution=64,96",
              "data.flip=true"]
    printed = run(["cache", *common, f"cache.dir={tmp_path / 'two'}"], ranks=2).stdout
    run(["cache", *common, f"cache.dir={tmp_path / 'one'}"])
    two, one = (open_latent_cache(next((tmp_path / name).iterdir())) for name in ("two", "one"))
    assert "cached 4 images" in printed and printed.count("cached") == 1                      # rank 0 reports
    assert "latents: 16 encoded, 0 reused" in printed                                          # all ranks' work
    for cache in (two, one):
        assert len(list(cache._latents.folder.glob("*.safetensors"))) == len(cache._latents.shards)  # no leftovers
    assert len(two._latents.shards) >= 2 and len(two._texts.shards) >= 2   # both ranks wrote shards
    assert len(one._latents.shards) == 1
    assert two._latents.entries.keys() == one._latents.entries.keys() and len(two._latents.entries) == 16
    assert two._texts.entries.keys() == one._texts.entries.keys()
    for key in one._latents.entries:
        assert torch.allclose(two._latents.get(key), one._latents.get(key), atol=1e-6), key
    for key in one._texts.entries:
        assert torch.allclose(two._texts.get(key), one._texts.get(key), atol=1e-6), key
    assert two.fingerprint == one.fingerprint
    again = run(["cache", *common, f"cache.dir={tmp_path / 'two'}"], ranks=2).stdout
    assert "latents: 0 encoded, 16 reused" in again and "captions: 0 encoded" in again, again


def test_a_base_sharded_over_two_ranks_trains_the_same_lora_and_resumes_on_any_count(training_files, tmp_path):
    """train.fsdp: FSDP2 fully_shard over the blocks, on 2 gloo ranks. The same LoRA as one process on the same
    global batch (accumulated over 2 micro-batches, so gradients reduce-scatter once per step; buckets on, so a
    rank sometimes has no sample and runs a stand-in weighed 0). Its checkpoints hold full tensors: the 2-rank
    run resumes in 1 process, and a 1-process run resumes sharded over 2 ranks, each to the straight run's LoRA.
    Samples are drawn by both ranks together and saved once."""
    root = training_files("klein", 4)
    common = [f"model.path={root / 'model'}", f"data.path={root / 'data'}", "data.resolution=64",
              f"cache.dir={root / 'cache'}", "lora.rank=4", "train.steps=4", "train.lr=1e-3", "train.log_every=1",
              "sample.steps=0", "checkpoint.every=2", "train.timestep_sampling=uniform",
              "train.gradient_accumulation=2"]
    run(["train", *common, f"output.dir={tmp_path / 'one'}", "train.batch_size=2"])
    run(["train", *common, f"output.dir={tmp_path / 'two'}", "train.batch_size=1", "train.fsdp=true",
         "sample.steps=2"], ranks=2)

    def lora(name):
        return load_file(tmp_path / name / "flux2_lora" / "lora" / "flux2_lora.safetensors")

    def assert_same(a, b):
        assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5

    one, two = lora("one"), lora("two")
    assert_same(two, one)
    assert max(float(v.abs().max()) for v in two.values()) > 1e-4
    assert len(list((tmp_path / "two" / "flux2_lora" / "samples").glob("*.png"))) == 2     # saved by rank 0 only
    # 2 sharded ranks -> 1 process, from step 2; and 1 process -> 2 sharded ranks, from step 2: the same global
    # batch (train.batch_size x ranks) continues exactly.
    checkpoints = {name: tmp_path / name / "flux2_lora" / "checkpoints" / "step_000002" for name in ("one", "two")}
    for name, ranks, extra in (("two", 1, ["train.batch_size=2"]),
                               ("one", 2, ["train.batch_size=1", "train.fsdp=true"])):
        resumed = tmp_path / f"from-{name}"
        run(["resume", str(checkpoints[name]), "--output", str(resumed), *extra], ranks=ranks)
        assert_same(load_file(next(resumed.rglob("lora/flux2_lora.safetensors"))), one)


@pytest.mark.parametrize("setting", ["model.blocks_to_swap=2", "model.quantization=nf4"])
def test_sharding_refuses_by_name_what_it_cannot_be_combined_with(setting):
    from flux2_lora_core.config import load_config
    from flux2_lora_core.errors import ConfigError
    from flux2_lora_core.training.sharding import check_sharding

    with pytest.raises(ConfigError) as error:
        check_sharding(load_config(None, ["train.fsdp=true", setting]))
    assert error.value.problems[0][0] == "train.fsdp" and setting.split("=")[0] in error.value.problems[0][1]
