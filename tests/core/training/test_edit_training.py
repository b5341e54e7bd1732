"""Edit LoRAs end to end on tiny FLUX.2 [klein]: an edit dataset's reference images are cached at their target's
bucket (mirrored with it), batched with it, fed to the step as extra clean tokens, scored by the validation loss,
and edited by the samples. The step's math itself is checked against diffusers' img2img script in
test_flow_matching_img2img.py; here, that the trainer's plumbing gives each target its own references."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from flux2_lora_core.cache import cache_for_config, open_latent_cache
from flux2_lora_core.data import BatchStream
from flux2_lora_core.data.demo_data import write_demo_dataset
from flux2_lora_core.training import Callbacks, prefetch, trainer

from .test_trainer import Recorder, make_config


@pytest.fixture(scope="module")
def workspace(training_files):
    return training_files("klein", 4)


@pytest.fixture(scope="module")
def edit_data(tmp_path_factory):
    """Four targets with `_ref` references; demo_01's reference is wider than its target (cropped to its bucket)."""
    folder = write_demo_dataset(tmp_path_factory.mktemp("edit") / "data", count=4, size=256, edit=True)
    Image.open(folder / "demo_01_ref.png").resize((420, 200)).save(folder / "demo_01_ref.png")
    return folder


def edit_config(workspace, data, tmp_path, *overrides):
    return make_config(workspace, tmp_path, f"data.path={data}", f"cache.dir={tmp_path / 'cache'}", *overrides)


def test_references_are_cached_at_their_targets_bucket_and_mirrored_with_it(workspace, edit_data, tmp_path):
    from flux2_lora_core.cache.encoding import encode_images, image_to_pixels
    from flux2_lora_core.data import load_image_rgb
    from flux2_lora_core.models import load_vae

    config = edit_config(workspace, edit_data, tmp_path, "data.flip=true")
    cache, _ = cache_for_config(config)
    assert cache.summary.images_encoded == 2 * 8                         # 4 targets + 4 references, both ways
    vae = load_vae(workspace / "model" / "vae", dtype=torch.float32, device=torch.device("cpu"))
    for i, item in enumerate(cache.items):
        assert item.references == (item.path.replace(".png", "_ref.png"),)
        target, refs = cache.latent(i, 64), cache.references(i, 64)
        assert refs.shape == (1, *target.shape)                          # the target's grid, whatever the ref's size
        bucket = item.buckets[64]
        image = load_image_rgb(edit_data / item.references[0])
        for flipped in (False, True):
            expected = encode_images(vae, image_to_pixels(image, bucket, flip=flipped)[None])[0]
            torch.testing.assert_close(cache.references(i, 64, flipped=flipped)[0], expected, rtol=0, atol=1e-5)
    assert all(len(key) == 3 and key[2] == 1 for key in cache.bucket_members(64))   # (w, h, references)
    reopened = open_latent_cache(cache.root)
    assert reopened.fingerprint == cache.fingerprint
    assert torch.equal(reopened.references(2, 64, flipped=True), cache.references(2, 64, flipped=True))
    plain, _ = cache_for_config(config.replace(data={"references": False}))
    assert plain.references(0, 64) is None and plain.fingerprint != cache.fingerprint
    assert plain.summary.images_encoded == 0                             # the targets' latents are the same entries


def test_the_step_gives_each_target_its_own_references(workspace, edit_data, tmp_path):
    config = edit_config(workspace, edit_data, tmp_path, "train.batch_size=2", "data.flip=true", "sample.steps=0",
                         "train.caption_dropout=0.5")
    s = trainer.setup(config, Callbacks())
    try:
        seen = set()
        for _ in range(8):                                               # until both orientations were drawn
            state = s.generator.get_state()
            indices = s.streams[64].next()
            x0, text, refs = trainer.micro_batch(s, indices, 64)
            s.generator.set_state(state)
            draws = torch.rand(2, len(indices), generator=s.generator)  # micro_batch's own draws, replayed
            for row, (i, flip) in enumerate(zip(indices, (draws[0] < 0.5).tolist())):
                assert torch.equal(x0[row], s.cache.latent(i, 64, flipped=flip))
                assert torch.equal(refs[row], s.cache.references(i, 64, flipped=flip))   # mirrored with its target
                seen.add(flip)
        assert seen == {False, True}
    finally:
        trainer.cleanup(s, release_model=True)


def test_edit_runs_train_on_the_references_and_prefetch_changes_nothing(workspace, edit_data, tmp_path, monkeypatch):
    common = ("train.batch_size=2", "data.flip=true", "sample.steps=0", "train.steps=4", "train.log_every=1")
    losses = {}
    for name, extra in (("plain", ("data.references=false",)), ("edit", ()), ("prefetched", ("train.prefetch_batches=2",))):
        monkeypatch.setattr(prefetch, "ON_CPU", name == "prefetched")
        recorder = Recorder()
        trainer.train(edit_config(workspace, edit_data, tmp_path / name, *common, *extra), recorder)
        losses[name] = [r.loss for r in recorder.reports]
    assert len(losses["edit"]) == 4 and all(math.isfinite(v) for v in losses["edit"])
    assert losses["prefetched"] == losses["edit"]                       # bit-exact: the same batches and draws
    assert losses["plain"] != losses["edit"]                            # the references reach the loss


def test_an_edit_run_samples_edits_and_scores_held_out_pairs(workspace, edit_data, tmp_path):
    recorder = Recorder()
    config = edit_config(workspace, edit_data, tmp_path, "data.validation_split=0.25", "train.validate_every=2",
                         "train.steps=2", "sample.every=2")
    s = trainer.setup(config, Callbacks())
    try:
        chosen = s.sample_references                                    # each sample caption's own references
        assert [tuple(p.name for p in refs) for refs in chosen] == [("demo_00_ref.png",), ("demo_01_ref.png",)]
        held = s.validator.indices
        with_refs = s.validator.loss(s)
        s.cache.items[held[0]].reference_keys.clear()                   # the same pair without its reference
        assert s.validator.loss(s) != with_refs
    finally:
        trainer.cleanup(s, release_model=True)
    result = trainer.train(config, recorder)
    assert [r.validation_loss is not None for r in recorder.reports] == [False, True]
    (step, paths), = recorder.samples
    assert step == 2 and len(paths) == 2 and all(Image.open(p).size == (64, 64) for p in paths)
    plain = Recorder()                                                  # the same run without references
    trainer.train(config.replace(data={"references": False}, output={"dir": str(tmp_path / "plain")}), plain)
    (_, plain_paths), = plain.samples
    assert all(Image.open(a).tobytes() != Image.open(b).tobytes() for a, b in zip(paths, plain_paths))
    from flux2_lora_core.training.sampling import _reference_images

    wide = _reference_images(chosen[1], 64)                             # 420 x 200 on disk: fitted as training does
    assert [image.size for image in wide] == [(64, 64)]
    assert result.lora_path.exists()


def test_a_mixed_dataset_batches_targets_with_equal_reference_counts(workspace, tmp_path):
    data = write_demo_dataset(tmp_path / "mixed", count=4, size=256, edit=True)
    (data / "demo_02_ref.png").unlink()                                   # demo_02 and a plain image
    Image.open(data / "demo_00.png").save(data / "plain.png")
    config = edit_config(workspace, data, tmp_path, "train.batch_size=2", "sample.steps=0", "train.steps=3")
    cache, _ = cache_for_config(config)
    groups = BatchStream(cache, 64, 2, 0).groups
    assert {len(key) for key in groups} == {2, 3}                        # (w, h) and (w, h, 1) buckets
    for key, members in groups.items():
        assert {cache.references(i, 64) is None for i in members} == {len(key) == 2}
    assert len(trainer.train(config, Recorder()).losses) == 3


def test_an_edit_lora_sharded_over_two_ranks_is_the_one_process_lora(workspace, edit_data, tmp_path):
    """train.fsdp on 2 gloo ranks (each rank its share of every global batch, references with their targets; a
    rank without a sample runs a stand-in weighed 0, references included) trains the one-process LoRA."""
    from safetensors.torch import load_file

    from .test_distributed import run

    common = [f"model.path={workspace / 'model'}", f"data.path={edit_data}", "data.resolution=64",
              f"cache.dir={tmp_path / 'cache'}", "lora.rank=4", "train.steps=3", "train.lr=1e-3", "sample.steps=0",
              "train.timestep_sampling=uniform", "train.gradient_accumulation=2", "data.flip=true"]
    run(["train", *common, f"output.dir={tmp_path / 'one'}", "train.batch_size=2"])
    run(["train", *common, f"output.dir={tmp_path / 'two'}", "train.batch_size=1", "train.fsdp=true"], ranks=2)
    one, two = (load_file(tmp_path / name / "flux2_lora" / "lora" / "flux2_lora.safetensors") for name in ("one", "two"))
    assert one.keys() == two.keys() and max(float((one[k] - two[k]).abs().max()) for k in one) <= 1e-5


def test_an_edit_run_resumes_bit_exact_and_refuses_changed_references(workspace, edit_data, tmp_path, stop_after):
    """k steps + resume k steps is the 2k-step run, references and all; a reference edited since is other training
    data, refused like an edited image."""
    import shutil

    import torch
    from safetensors.torch import load_file

    from flux2_lora_core.errors import CheckpointError
    from flux2_lora_core.resume import resume

    data = tmp_path / "data"
    shutil.copytree(edit_data, data)
    common = ("data.flip=true", "train.caption_dropout=0.3", "train.batch_size=2", "sample.steps=0", "train.steps=4")
    straight = trainer.train(edit_config(workspace, data, tmp_path / "a", *common))
    first = trainer.train(edit_config(workspace, data, tmp_path / "b", *common), stop_after(2))
    second = resume(first.run_dir)
    assert first.losses + second.losses == straight.losses
    a, b = load_file(straight.lora_path), load_file(second.lora_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    third = trainer.train(edit_config(workspace, data, tmp_path / "c", *common), stop_after(2))
    Image.open(data / "demo_03_ref.png").rotate(90).save(data / "demo_03_ref.png")
    with pytest.raises(CheckpointError, match="changed since this checkpoint"):
        resume(third.run_dir)
