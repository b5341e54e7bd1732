"""One rule for validate, cache and train (data/report.py, applied by data/screening.py): a few broken files are
skipped and named, never silently; too few good images, or any problem under strict, stops all three. Real files,
the tiny model, and real `flux2-lora` subprocesses for the exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from flux2_lora_core.config import Config, DataConfig
from flux2_lora_core.data import screen, skip_summary, validate_data
from flux2_lora_core.data.dataset import load_dataset
from flux2_lora_core.data.validation import MAX_CAPTION_TOKENS, validate_dataset
from flux2_lora_core.errors import DatasetError

ROOT = Path(__file__).resolve().parents[3]
BROKEN = {"tiny.png": "too_small", "empty.jpg": "empty_file", "cut.jpg": "truncated_image",
          "notes.png": "not_an_image", "latin1.png": "caption_not_utf8", "essay.png": "caption_too_long"}
ESSAY_TOKENS = 20_000  # one token per byte with the tiny models' byte-level tokenizers


def flux2_lora(*args, cwd=ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "flux2_lora_core", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    """20 good captioned images and 6 files with errors: 4 broken images, a non-UTF-8 and a 20k-token caption."""
    from flux2_lora_core.data.demo_data import write_demo_dataset

    root = write_demo_dataset(tmp_path_factory.mktemp("mixed") / "data", count=20, size=256)
    Image.new("RGB", (32, 32), "red").save(root / "tiny.png")
    (root / "tiny.txt").write_text("a tiny red square", encoding="utf-8")
    (root / "empty.jpg").write_bytes(b"")
    whole = root.parent / "whole.jpg"
    Image.effect_noise((400, 400), 64).convert("RGB").save(whole, quality=95)
    (root / "cut.jpg").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    (root / "notes.png").write_text("my notes, saved with the wrong extension\n", encoding="utf-8")
    for name, colour, caption in (("latin1.png", "purple", "caf\xe9 au lait".encode("latin-1")),
                                  ("essay.png", "olive", ("a very long caption. " * 1000).encode()[:ESSAY_TOKENS])):
        Image.new("RGB", (300, 300), colour).save(root / name)
        (root / name).with_suffix(".txt").write_bytes(caption)
    return root


def test_a_few_broken_files_are_skipped_and_named(mixed):
    report = validate_dataset(mixed)
    assert report.usable
    assert {image: problems[0].code for image, problems in report.skipped.items()} == BROKEN
    assert report.stats["images"]["found"] == 26 and report.stats["images"]["usable"] == 20
    text = report.format_text()
    first, summary = text.splitlines()[0], text.splitlines()[1]
    assert first == f"Dataset {mixed}: usable (6 errors, 22 warnings)"  # the warnings: under 512 px is small
    assert summary.startswith("usable: 20 of 26 images; these 6 will be skipped")
    assert all(f"  {name}: " in text for name in BROKEN)
    assert report.to_dict()["summary"]["skipped_images"] == list(report.skipped)
    dataset = load_dataset(mixed)
    kept = screen(dataset, report)
    assert len(kept) == 20 and not {kept.relative_path(item) for item in kept} & BROKEN.keys()


def test_strict_or_too_few_good_images_refuse_the_dataset(mixed):
    strict = validate_dataset(mixed, strict=True)
    assert not strict.usable and strict.skipped == {}
    assert "NOT USABLE" in strict.format_text().splitlines()[0] and "will be skipped" not in strict.format_text()
    few = validate_dataset(mixed, min_images=21)
    assert not few.usable and few.errors[0].code == "too_few_images"
    assert "only 20 usable image(s) once the 6 with errors are skipped, fewer than min_images=21" in few.errors[0].message
    for report in (strict, few):
        with pytest.raises(DatasetError, match="not usable for training"):
            screen(load_dataset(mixed), report)


def test_config_keys_carry_the_rule(mixed):
    data = DataConfig(path=str(mixed))
    assert (data.min_images, data.strict, data.max_caption_tokens) == (1, False, MAX_CAPTION_TOKENS)
    assert validate_data(data).skipped.keys() == BROKEN.keys()
    assert not validate_data(DataConfig(path=str(mixed), strict=True)).usable
    assert not validate_data(DataConfig(path=str(mixed), min_images=21)).usable
    lenient = validate_data(DataConfig(path=str(mixed), max_caption_tokens=ESSAY_TOKENS))
    assert "essay.png" not in lenient.skipped and "long_caption" in {p.code for p in lenient.warnings}


def test_cache_refuses_what_validate_refuses_before_loading_anything(mixed, tmp_path):
    from flux2_lora_core.cache import cache_for_config

    for update in ({"data.strict": True}, {"data.min_images": 21}):
        config = Config().replace({"data.path": str(mixed), "model.path": str(tmp_path / "no-model-needed"),
                                   "cache.dir": str(tmp_path / "cache"), **update})

        class Unused:  # the dataset is refused before an encoder is asked for anything
            family = "klein"

        with pytest.raises(DatasetError, match="not usable for training") as caught:
            cache_for_config(config, encoders=Unused())
        assert ("too_few_images" if "data.min_images" in update else "strict") in str(caught.value)


def test_validate_exit_codes_and_the_model_tokenizer(mixed, training_files):
    result = flux2_lora("validate", mixed)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "usable: 20 of 26 images; these 6 will be skipped" in result.stdout
    assert all(f"  {name}: " in result.stdout for name in BROKEN)
    assert flux2_lora("validate", mixed, "--strict").returncode == 1
    few = flux2_lora("validate", mixed, "--min-images", "21")
    assert few.returncode == 1 and "too_few_images" in few.stdout and "Traceback" not in few.stderr
    model = training_files("klein", 4) / "model"
    counted = flux2_lora("validate", mixed, "--model", model, "--json")
    assert counted.returncode == 0, counted.stderr
    report = json.loads(counted.stdout)
    (essay,) = [p for p in report["problems"] if p["image"] == "essay.png" and p["severity"] == "error"]
    assert essay["path"] == "essay.txt" and essay["code"] == "caption_too_long"
    assert essay["message"].startswith(f"caption for essay.png is {ESSAY_TOKENS} tokens, over max_caption_tokens=")
    assert report["stats"]["captions"]["token_estimate"] == "counted with the model's tokenizer"


def test_cache_and_train_skip_exactly_the_listed_files_and_say_so(mixed, training_files, tmp_path):
    from flux2_lora_core.models import load_tokenizer

    model = training_files("klein", 4) / "model"
    tokenizer = load_tokenizer(model / "tokenizer", model)
    summary = skip_summary(validate_dataset(mixed, tokenizer=tokenizer, resolution=64))
    assert f"essay.png: caption for essay.png is {ESSAY_TOKENS} tokens" in summary  # counted as cache counts
    common = [f"model.path={model}", f"data.path={mixed}", "data.resolution=64", f"cache.dir={tmp_path / 'cache'}"]
    cached = flux2_lora("cache", *common)
    assert cached.returncode == 0, cached.stderr
    assert summary in cached.stdout and summary in cached.stderr  # the summary printed, and logged as a warning
    assert "captions: 21 encoded" in cached.stdout  # 20 captions and the empty one: the 20k-token one never ran
    (index,) = (tmp_path / "cache").glob("*/index.json")
    items = {item["path"] for item in json.loads(index.read_text())["items"]}
    assert len(items) == 20 and not items & BROKEN.keys()

    trained = flux2_lora("train", *common, f"output.dir={tmp_path / 'runs'}", "train.steps=1", "lora.rank=2",
                         "sample.steps=0", "checkpoint.every=0")
    assert trained.returncode == 0, trained.stderr
    assert summary in trained.stderr


def test_the_training_result_names_the_skipped_files(mixed, training_files, tmp_path):
    """What the Train node shows under its summary (nodes/progress.py), from the run itself."""
    from flux2_lora_core.config import load_config
    from flux2_lora_core.training import train

    model = training_files("klein", 4) / "model"
    result = train(load_config(None, [f"model.path={model}", f"data.path={mixed}", "data.resolution=64",
                                      f"cache.dir={tmp_path / 'cache'}", f"output.dir={tmp_path / 'runs'}",
                                      "train.steps=1", "lora.rank=2", "sample.steps=0", "checkpoint.every=0"]))
    assert result.skipped.startswith("usable: 20 of 26 images; these 6 will be skipped")
    assert all(f"  {name}: " in result.skipped for name in BROKEN)
