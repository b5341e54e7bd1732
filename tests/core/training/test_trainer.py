"""The trainer on a tiny FLUX.2 [klein] model written to disk, a generated dataset and a real latent cache."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from flux2_lora_core.config import load_config
from flux2_lora_core.errors import ConfigError
from flux2_lora_core.models.tiny_models import build_tiny_pipeline
from flux2_lora_core.preflight import check_training_config
from flux2_lora_core.training import Callbacks, trainer
from flux2_lora_core.training.lora import resolve_targets


@pytest.fixture(scope="module")
def workspace(training_files):
    return training_files("klein", 4)


def make_config(root, tmp_path, *overrides):
    return load_config(None, [f"model.path={root / 'model'}", f"data.path={root / 'data'}", "data.resolution=64",
                              f"cache.dir={root / 'cache'}", f"output.dir={tmp_path / 'out'}", "lora.rank=4",
                              "train.steps=6", "train.lr=1e-3", "train.log_every=2", "sample.steps=2",
                              "sample.resolution=64", "sample.guidance=1.0", *overrides])


class Recorder(Callbacks):
    def __init__(self, stop_after=None):
        self.reports, self.samples, self.stop_after = [], [], stop_after

    def on_step(self, report):
        self.reports.append(report)

    def on_sample(self, step, paths):
        self.samples.append((step, paths))

    def should_stop(self):
        return self.stop_after is not None and len(self.reports) >= self.stop_after


def test_a_run_writes_every_output_and_reports_progress(workspace, tmp_path):
    recorder = Recorder()
    config = make_config(workspace, tmp_path, "sample.every=3", "sample.at_start=true", "data.trigger_word=zxq",
                         "checkpoint.every=1", "checkpoint.keep=2")
    result = trainer.train(config, recorder)

    run = result.run_dir
    assert run == tmp_path / "out" / "flux2_lora" and result.steps == 6 and not result.stopped_early
    record = json.loads((run / "run.json").read_text())
    assert record["config"]["lora"]["rank"] == 4 and record["dataset_fingerprint"] and record["versions"]["peft"]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert [m["loss"] for m in metrics] == pytest.approx(result.losses, rel=1e-5)
    assert all("grad_norm" in m for m in metrics if m["step"] % 2 == 0)      # computed on logging steps only
    assert not any("grad_norm" in m for m in metrics if m["step"] % 2)
    assert (run / "training_curves.png").stat().st_size > 1000
    from flux2_lora_core.checkpoints.checkpoint import find_checkpoints

    kept = [p.name for p in find_checkpoints(run)]     # the newest checkpoint.keep, and the best by smoothed loss
    assert kept[-2:] == ["step_000005", "step_000006"] and len(kept) <= 3
    assert (run / "checkpoints" / "step_000006" / "flux2_lora-step6.safetensors").exists()
    assert [step for step, _ in recorder.samples] == [0, 3, 6]                # at start, every 3, at the end
    assert len(list((run / "samples").glob("*.png"))) == 6                    # two prompts each time
    assert [r.step for r in recorder.reports] == [1, 2, 3, 4, 5, 6] and recorder.reports[-1].eta_seconds == 0

    lora = load_file(result.lora_path)
    assert any(k.startswith("diffusion_model.double_blocks.0.img_attn.qkv.") for k in lora)
    with safe_open(result.lora_path, "pt") as f:
        metadata = f.metadata()
    assert metadata["ss_network_dim"] == "4" and "zxq" in json.dumps(metadata)
    assert metadata.get("modelspec.architecture")

    again = trainer.train(config, Recorder())                                 # never writes over a run
    assert again.run_dir == tmp_path / "out" / "flux2_lora-2"
    assert again.losses == result.losses                                      # same seed, same run
    second = load_file(again.lora_path)
    assert all(torch.equal(lora[k], second[k]) for k in lora)


def test_sample_steps_zero_switches_every_sample_off(workspace, tmp_path):
    """On a slow machine one sample can outlast a short run: sample.steps=0 skips the start, every-N and final ones."""
    recorder = Recorder()
    result = trainer.train(make_config(workspace, tmp_path, "train.steps=2", "sample.steps=0", "sample.every=1",
                                       "sample.at_start=true"), recorder)
    assert result.steps == 2 and result.lora_path.exists() and not result.stopped_early
    assert recorder.samples == [] and result.samples == [] and not (result.run_dir / "samples").exists()


def test_fixed_noise_overfit_loss_falls(workspace, tmp_path):
    """The real step and optimizer on one batch with the same noise and timestep every step."""
    config = make_config(workspace, tmp_path, "train.steps=40", "train.lr=2e-3", "train.max_grad_norm=0",
                         "train.timestep_sampling=uniform")
    s = trainer.setup(config, Callbacks())
    try:
        batch = s.streams[64].next()
        losses = []
        for _ in range(40):
            s.generator.manual_seed(0)
            losses.append(float(trainer.micro_step(s, batch, 64, 1.0)))
            trainer.optimizer_step(s, want_norm=False)
    finally:
        trainer.cleanup(s, release_model=True)
    assert losses[-1] < 0.8 * losses[0], losses


def test_stop_request_ends_the_run_and_still_saves(workspace, tmp_path):
    result = trainer.train(make_config(workspace, tmp_path, "train.steps=50"), Recorder(stop_after=3))
    assert result.stopped_early and result.steps == 3 and result.lora_path.exists()
    nothing = trainer.train(make_config(workspace, tmp_path, "train.steps=50"), Recorder(stop_after=0))
    assert nothing.stopped_early and nothing.lora_path is None              # stopped before a step: no files
    assert not (nothing.run_dir / "checkpoints").exists() and not (nothing.run_dir / "lora").exists()


def test_gradient_checkpointing_and_accumulation_give_the_same_run(workspace, tmp_path):
    base = trainer.train(make_config(workspace, tmp_path, "train.steps=3", "train.gradient_accumulation=2"))
    checkpointed = trainer.train(make_config(workspace, tmp_path, "train.steps=3", "train.gradient_accumulation=2",
                                             "train.gradient_checkpointing=true"))
    assert checkpointed.losses == pytest.approx(base.losses, abs=1e-6)


def test_profile_and_bf16_autocast(workspace, tmp_path):
    result = trainer.train(make_config(workspace, tmp_path, "train.steps=4", "train.profile_steps=2",
                                       "train.mixed_precision=bf16"))
    trace = result.run_dir / "profile_trace.json"
    assert trace.exists() and json.loads(trace.read_text())["traceEvents"]
    assert all(torch.isfinite(torch.tensor(result.losses)))


def test_bad_training_settings_are_reported_together(workspace, tmp_path, caplog):
    config = make_config(workspace, tmp_path, "train.warmup_steps=10", "train.steps=5", "model.path=/nope",
                         "sample.resolution=70", "data.resolution=64,128,256,512,1024,2048")
    with pytest.raises(ConfigError) as error:
        check_training_config(config)
    keys = [key for key, _ in error.value.problems]
    assert {"train.warmup_steps", "train.lr_scheduler", "model.path", "sample.resolution", "data.resolution"} <= set(keys)

    with caplog.at_level(logging.WARNING):
        check_training_config(make_config(workspace, tmp_path, "train.batch_size=8",
                                                  "train.gradient_accumulation=16"))
    assert "effective batch 128" in caplog.text


@pytest.mark.parametrize("variant", ["klein", "dev"])
def test_targets_come_from_the_model_config(variant):
    transformer = build_tiny_pipeline(variant).transformer
    double, single = transformer.config.num_layers, transformer.config.num_single_layers
    assert len(resolve_targets(transformer, "attention_mlp")) == 12 * double + 2 * single
    assert len(resolve_targets(transformer, "attention")) == 8 * double + 2 * single
    assert resolve_targets(transformer, "attn.to_q") == [f"transformer_blocks.{i}.attn.to_q" for i in range(double)]
    assert len(resolve_targets(transformer, r"regex:single_transformer_blocks\.\d+\.attn\.to_out")) == single
    for bad in ("to_qq", "regex:(", "regex:norm_out.linear", "regex:nothing"):
        with pytest.raises(ConfigError) as error:
            resolve_targets(transformer, bad)
        assert error.value.problems[0][0] == "lora.targets"


def test_the_trained_lora_file_reproduces_the_trained_model(workspace, tmp_path):
    """The file the trainer writes (ComfyUI-native keys), loaded by diffusers into a fresh pipeline."""
    from peft import set_peft_model_state_dict

    from flux2_lora_core.checkpoints.checkpoint import find_checkpoints, read_checkpoint
    from flux2_lora_core.training.flow_matching import image_ids, predict_velocity, text_ids
    from flux2_lora_core.training.lora import add_lora

    given = build_tiny_pipeline("klein", seed=0).transformer   # the weights write_tiny_model wrote
    before = {k: v.clone() for k, v in given.state_dict().items()}
    result = trainer.train(make_config(workspace, tmp_path, "train.steps=4", "train.lr=1e-2"), transformer=given)
    after = given.state_dict()                                   # handed back as it came: same modules, same weights
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not getattr(given, "peft_config", None) and not given.training
    # The trained model, exactly: the final checkpoint's peft weights on the base model.
    pipe = build_tiny_pipeline("klein", seed=0)
    add_lora(pipe.transformer, rank=4, alpha=16.0, dropout=0.0, targets="attention_mlp", seed=0)
    tensors, _ = read_checkpoint(find_checkpoints(result.run_dir)[-1])
    set_peft_model_state_dict(pipe.transformer, tensors["adapter"])
    fresh = build_tiny_pipeline("klein", seed=0)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(1, 128, 4, 4, generator=generator)
    text = torch.randn(1, 8, pipe.transformer.config.joint_attention_dim, generator=generator)
    sigmas = torch.tensor([0.7])

    def run(transformer):
        with torch.no_grad():
            return predict_velocity(transformer.eval(), x, text, sigmas, img_ids=image_ids(4, 4),
                                    txt_ids=text_ids(8), guidance=None)

    trained, base = run(pipe.transformer), run(fresh.transformer)
    fresh.load_lora_weights(result.lora_path)
    loaded = run(fresh.transformer)
    assert (trained - base).abs().max() > 1e-3                 # the LoRA learned something visible
    assert (loaded - trained).abs().max() <= 1e-5


def test_a_diverged_run_stops_instead_of_saving_a_broken_lora(workspace, tmp_path):
    from flux2_lora_core.errors import TrainingDiverged

    config = make_config(workspace, tmp_path, "train.steps=30", "train.optimizer=sgd", "train.lr=1e12",
                         "train.max_grad_norm=0", "train.log_every=1")
    with pytest.raises(TrainingDiverged, match="the loss became"):
        trainer.train(config)
    assert not (tmp_path / "out" / "flux2_lora" / "lora").exists()
