"""latent_cache.py + encoding.py on the tiny FLUX.2 models: exact tensors, reuse counted, damage caught."""

from __future__ import annotations

import pickle
from contextlib import contextmanager

import pytest
import torch
from PIL import Image

from flux2_lora_core.cache import CacheSettings, build_latent_cache, open_latent_cache
from flux2_lora_core.cache.encoding import MAX_SEQUENCE_LENGTH, encode_images, image_to_pixels
from flux2_lora_core.cache.frozen_encoders import LoadedEncoders
from flux2_lora_core.data.dataset import load_dataset
from flux2_lora_core.errors import DatasetError
from flux2_lora_core.models.tiny_models import build_tiny_pipeline

RES = 64  # tiny: 64 px images are 4x4 latent tokens


@pytest.fixture(scope="module")
def pipes():
    return {family: build_tiny_pipeline(family) for family in ("klein", "dev")}


class CountingEncoders(LoadedEncoders):
    """The real tiny encoders, counting how often the cache asks for each."""

    def __init__(self, pipe, family):
        super().__init__(pipe.vae, pipe.text_encoder, pipe.tokenizer, family)
        self.loads = {"vae": 0, "text": 0}

    @contextmanager
    def vae(self):
        self.loads["vae"] += 1
        with super().vae() as vae:
            yield vae

    @contextmanager
    def text_encoder(self):
        self.loads["text"] += 1
        with super().text_encoder() as pair:
            yield pair


@pytest.fixture
def dataset_dir(tmp_path, make_image):
    root = tmp_path / "data"
    sizes = {"a.png": (64, 64), "b.png": (96, 64), "c.jpg": (64, 112), "d.png": (80, 80)}
    for n, (name, size) in enumerate(sizes.items()):
        make_image(root / name, size=size, color=(40 * n, 200 - 30 * n, 90))
        (root / name).with_suffix(".txt").write_text(f"photo number {n}", encoding="utf-8")
    return root


def build(dataset_dir, encoders, tmp_path, batch_size=1, **settings):
    # One image per VAE call where tensors are compared exactly: batching changes float rounding, and the
    # tiny VAE's GroupNorm amplifies that on these nearly flat test images.
    settings = {"resolutions": (RES,), **settings}
    return build_latent_cache(load_dataset(dataset_dir), encoders, CacheSettings(**settings),
                              cache_dir=tmp_path / "cache", batch_size=batch_size)


def test_cached_latents_equal_the_pipeline_encode_path(pipes, dataset_dir, tmp_path):
    pipe = pipes["klein"]
    cache = build(dataset_dir, LoadedEncoders.from_pipeline(pipe, "klein"), tmp_path)
    index = [item.path for item in cache.items].index("a.png")  # 64x64: the bucket is the image itself
    image = Image.open(dataset_dir / "a.png").convert("RGB")
    pixels = pipe.image_processor.preprocess(image, height=RES, width=RES)  # the pipeline's own preprocessing
    assert torch.equal(image_to_pixels(image, (RES, RES))[None], pixels)
    assert pixels.is_contiguous(memory_format=torch.channels_last)  # the layout ComfyUI's VAEEncode uses too
    with torch.no_grad():  # as the pipeline runs it: the memory layout decides the kernels and so the rounding
        expected = pipe._encode_vae_image(pixels, generator=None)[0]  # mode, 2x2 patchify, BatchNorm
    assert torch.equal(cache.latent(index, RES), expected)
    assert cache.latent(index, RES).shape == (128, RES // 16, RES // 16)


@pytest.mark.parametrize("family", ["klein", "dev"])
def test_cached_text_equals_encode_prompt(pipes, dataset_dir, tmp_path, family):
    pipe = pipes[family]
    encoders = LoadedEncoders.from_pipeline(pipe, family)
    cache = build(dataset_dir, encoders, tmp_path, text_conditioning="diffusers")
    for i, item in enumerate(cache.items):
        expected, _ = pipe.encode_prompt(prompt=(dataset_dir / item.path).with_suffix(".txt").read_text(), device="cpu")
        assert torch.equal(cache.text(i), expected[0])
    expected, _ = pipe.encode_prompt(prompt="", device="cpu")
    assert torch.equal(cache.text(None), expected[0])  # the empty caption, for caption dropout


def test_comfyui_conditioning_layouts(pipes, dataset_dir, tmp_path):
    # [dev]: ComfyUI encodes <s> + template unpadded, then pads the embeddings with zeros in front.
    dev = pipes["dev"]
    cache = build(dataset_dir, LoadedEncoders.from_pipeline(dev, "dev"), tmp_path, text_conditioning="comfyui")
    text = cache.text(0)
    assert text.shape == (MAX_SEQUENCE_LENGTH, 3 * dev.text_encoder.config.text_config.hidden_size)
    tokens = [dev.tokenizer.bos_token_id] + dev.tokenizer(
        "[SYSTEM_PROMPT]You are an AI that reasons about image descriptions. You give structured responses focusing "
        "on object relationships, object\nattribution and actions without speculation.[/SYSTEM_PROMPT][INST]photo "
        "number 0[/INST]", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        hidden = dev.text_encoder(input_ids=torch.tensor([tokens]), output_hidden_states=True).hidden_states
    expected = torch.cat([hidden[k][0] for k in (10, 20, 30)], dim=-1)
    pad = MAX_SEQUENCE_LENGTH - len(tokens)
    assert torch.count_nonzero(text[:pad]) == 0
    torch.testing.assert_close(text[pad:], expected, rtol=0, atol=1e-6)
    # [klein]: both programs pad the tokens to 512 on the right and encode them: identical embeddings.
    klein = pipes["klein"]
    comfy = build(dataset_dir, LoadedEncoders.from_pipeline(klein, "klein"), tmp_path, text_conditioning="comfyui")
    expected, _ = klein.encode_prompt(prompt="photo number 0", device="cpu")
    assert torch.equal(comfy.text(0), expected[0])


def test_second_run_encodes_nothing_and_loads_no_encoder(pipes, dataset_dir, tmp_path):
    first = CountingEncoders(pipes["klein"], "klein")
    cache = build(dataset_dir, first, tmp_path, batch_size=3)
    s = cache.summary
    assert (s.images_encoded, s.images_reused, s.captions_encoded) == (4, 0, 5)  # 4 captions + the empty one
    again = CountingEncoders(pipes["klein"], "klein")
    second = build(dataset_dir, again, tmp_path, batch_size=3).summary
    assert (second.images_encoded, second.captions_encoded) == (0, 0)
    assert (second.images_reused, second.captions_reused) == (4, 5)
    assert again.loads == {"vae": 0, "text": 0}


def test_a_changed_caption_or_image_reencodes_only_that_item(pipes, dataset_dir, tmp_path, make_image):
    encoders = LoadedEncoders.from_pipeline(pipes["klein"], "klein")
    before = build(dataset_dir, encoders, tmp_path)
    old_b = before.latent([i.path for i in before.items].index("b.png"), RES).clone()
    (dataset_dir / "a.txt").write_text("a new caption", encoding="utf-8")
    s = build(dataset_dir, encoders, tmp_path).summary
    assert (s.images_encoded, s.captions_encoded) == (0, 1)
    make_image(dataset_dir / "b.png", size=(96, 64), color=(1, 2, 3))
    after = build(dataset_dir, encoders, tmp_path)
    assert (after.summary.images_encoded, after.summary.captions_encoded) == (1, 0)
    assert not torch.equal(after.latent([i.path for i in after.items].index("b.png"), RES), old_b)


def test_another_model_or_resolution_never_reuses_entries(pipes, dataset_dir, tmp_path):
    build(dataset_dir, LoadedEncoders.from_pipeline(pipes["klein"], "klein"), tmp_path)
    other = build_tiny_pipeline("klein", seed=1)
    cache = build(dataset_dir, LoadedEncoders.from_pipeline(other, "klein"), tmp_path)
    assert (cache.summary.images_reused, cache.summary.captions_reused) == (0, 0)
    item = cache.items[0]
    image = Image.open(dataset_dir / item.path).convert("RGB")
    fresh = encode_images(other.vae, image_to_pixels(image, item.buckets[RES])[None])[0]
    assert torch.equal(cache.latent(0, RES), fresh)
    schedule = build(dataset_dir, LoadedEncoders.from_pipeline(other, "klein"), tmp_path, resolutions=(RES, 96))
    assert (schedule.summary.images_encoded, schedule.summary.images_reused) == (4, 4)  # 96 px is new
    assert schedule.latent(0, 96).shape[1:] == tuple(s // 16 for s in reversed(schedule.items[0].buckets[96]))


def test_buckets_follow_the_aspect_ratio_and_flips_are_encoded(pipes, dataset_dir, tmp_path):
    pipe = pipes["klein"]
    cache = build(dataset_dir, LoadedEncoders.from_pipeline(pipe, "klein"), tmp_path, flip=True)
    by_path = {item.path: i for i, item in enumerate(cache.items)}
    wide, tall = cache.items[by_path["b.png"]].buckets[RES], cache.items[by_path["c.jpg"]].buckets[RES]
    assert wide[0] > wide[1] and tall[1] > tall[0]
    for w, h in (wide, tall):
        assert w % 16 == 0 and h % 16 == 0 and w * h <= RES * RES
    assert cache.summary.images_encoded == 8  # both orientations of 4 images
    i = by_path["b.png"]
    image = Image.open(dataset_dir / "b.png").convert("RGB")
    mirrored = encode_images(pipe.vae, image_to_pixels(image, wide, flip=True)[None])[0]
    assert torch.equal(cache.latent(i, RES, flipped=True), mirrored)  # batch_size 1: each orientation alone
    derived = cache.latent(i, RES).flip(-1)  # what a cache that flips latents would (wrongly) train on
    assert (cache.latent(i, RES, flipped=True) - derived).abs().max() > 1e-2
    members = cache.bucket_members(RES)
    assert sorted(j for group in members.values() for j in group) == list(range(len(cache)))


def _shards(cache_root):
    return sorted(cache_root.glob("*/latents-*/shard-*.safetensors"))


def test_a_truncated_shard_is_caught_and_rebuilt(pipes, dataset_dir, tmp_path):
    encoders = LoadedEncoders.from_pipeline(pipes["klein"], "klein")
    cache = build(dataset_dir, encoders, tmp_path)
    expected = cache.latent(0, RES).clone()
    cache.close()
    (shard,) = _shards(tmp_path / "cache")
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(DatasetError, match="run `flux2-lora cache`"):
        open_latent_cache(cache.root)
    rebuilt = build(dataset_dir, encoders, tmp_path)
    assert rebuilt.summary.images_encoded == 4 and "truncated" in rebuilt.summary.rebuilt_shards[0][1]
    assert torch.equal(rebuilt.latent(0, RES), expected)
    assert len(_shards(tmp_path / "cache")) == 1  # the damaged shard is gone


def test_a_flipped_byte_is_caught_by_full_verification(pipes, dataset_dir, tmp_path):
    encoders = LoadedEncoders.from_pipeline(pipes["klein"], "klein")
    cache = build(dataset_dir, encoders, tmp_path)
    cache.close()
    (shard,) = _shards(tmp_path / "cache")
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x40  # inside the last tensor's bytes: the header still parses
    shard.write_bytes(bytes(data))
    open_latent_cache(cache.root, verify="quick")  # sizes and headers cannot see it...
    with pytest.raises(DatasetError, match="incomplete or damaged"):
        open_latent_cache(cache.root, verify="full")  # ...the SHA-256 does
    again = build_latent_cache(load_dataset(dataset_dir), encoders, CacheSettings(resolutions=(RES,)),
                               cache_dir=tmp_path / "cache", verify="full")
    assert "SHA-256" in again.summary.rebuilt_shards[0][1]


def test_leftovers_of_an_interrupted_build_are_removed(pipes, dataset_dir, tmp_path):
    encoders = LoadedEncoders.from_pipeline(pipes["klein"], "klein")
    cache = build(dataset_dir, encoders, tmp_path)
    store = next(cache.root.glob("latents-*"))
    (store / "shard-deadbeef.safetensors").write_bytes(b"half a shard")
    (store / ".manifest.json.1234.tmp").write_bytes(b"{")
    build(dataset_dir, encoders, tmp_path)
    assert not (store / "shard-deadbeef.safetensors").exists() and not (store / ".manifest.json.1234.tmp").exists()


def test_a_corrupt_manifest_means_a_rebuild_not_a_crash(pipes, dataset_dir, tmp_path):
    encoders = LoadedEncoders.from_pipeline(pipes["klein"], "klein")
    cache = build(dataset_dir, encoders, tmp_path)
    (next(cache.root.glob("latents-*")) / "manifest.json").write_text("{not json", encoding="utf-8")
    assert build(dataset_dir, encoders, tmp_path).summary.images_encoded == 4


def test_reopened_and_pickled_caches_read_the_same(pipes, dataset_dir, tmp_path):
    cache = build(dataset_dir, LoadedEncoders.from_pipeline(pipes["dev"], "dev"), tmp_path)
    for other in (open_latent_cache(cache.root), pickle.loads(pickle.dumps(cache))):
        assert other.fingerprint == cache.fingerprint and len(other) == len(cache)
        assert torch.equal(other.latent(2, RES), cache.latent(2, RES))
        assert torch.equal(other.text(1), cache.text(1)) and torch.equal(other.text(None), cache.text(None))
    assert "4 images" in repr(cache)


def test_unreadable_images_are_skipped_with_the_reason(pipes, dataset_dir, tmp_path):
    (dataset_dir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    cache = build(dataset_dir, LoadedEncoders.from_pipeline(pipes["klein"], "klein"), tmp_path)
    assert len(cache) == 4 and [p for p, _ in cache.summary.skipped] == ["broken.png"]
    for name in ("a.png", "b.png", "c.jpg", "d.png"):
        (dataset_dir / name).write_bytes(b"")
    with pytest.raises(DatasetError, match="no image"):
        build(dataset_dir, LoadedEncoders.from_pipeline(pipes["klein"], "klein"), tmp_path)


def test_a_target_goes_with_a_reference_that_cannot_be_encoded_even_a_shared_copy(pipes, dataset_dir, tmp_path,
                                                                                    truncated_copy):
    """Edit pairs: byte-identical references are encoded once; when that one decode fails, every target using the
    bytes is left out (not only the one whose path the failure names), and the others keep their references."""
    for target in ("a", "d"):                       # a and d share a bucket: the copies are one entry to encode
        truncated_copy(dataset_dir / "b.png", dataset_dir / f"{target}_ref.png", keep=0.6)   # the header reads
    Image.open(dataset_dir / "a.png").save(dataset_dir / "b_ref.png")
    cache = build(dataset_dir, LoadedEncoders.from_pipeline(pipes["klein"], "klein"), tmp_path)
    assert [item.path for item in cache.items] == ["b.png", "c.jpg"]
    assert [p for p, _ in cache.summary.skipped] == ["a_ref.png"]          # one decode, for both copies
    assert cache.references(0, RES).shape == (1, *cache.latent(0, RES).shape) and cache.references(1, RES) is None


def _live(cls) -> int:
    import gc

    gc.collect()
    return sum(isinstance(o, cls) for o in gc.get_objects())


@pytest.mark.parametrize("fmt", ["diffusers", "comfyui"])
def test_encoders_from_files_load_only_to_encode_and_match_the_pipeline(pipes, dataset_dir, tmp_path, fmt):
    from diffusers import AutoencoderKLFlux2

    from flux2_lora_core.cache.frozen_encoders import open_encoders
    from flux2_lora_core.config import ModelConfig
    from flux2_lora_core.models.tiny_models import COMFYUI_FILES, write_tiny_model

    write_tiny_model(tmp_path / "model", "klein", fmt=fmt)
    if fmt == "diffusers":
        model = ModelConfig(path=str(tmp_path / "model"))
    else:
        files = {part: str(tmp_path / "model" / name) for part, name in COMFYUI_FILES["klein"].items()}
        model = ModelConfig(path=files["transformer"], vae=files["vae"], text_encoder=files["text_encoder"],
                            tokenizer=files["tokenizer"])
    encoders = open_encoders(model)
    assert encoders.family == "klein"
    vaes = _live(AutoencoderKLFlux2)
    cache = build(dataset_dir, encoders, tmp_path, text_conditioning="diffusers")
    assert _live(AutoencoderKLFlux2) == vaes  # released before build returns: training holds no encoder
    reference = build(dataset_dir, LoadedEncoders.from_pipeline(pipes["klein"], "klein"), tmp_path / "ref",
                      text_conditioning="diffusers")
    for i in range(len(cache)):  # the same seed's weights, read from files: the same tensors
        assert torch.equal(cache.latent(i, RES), reference.latent(i, RES))
        assert torch.equal(cache.text(i), reference.text(i))
