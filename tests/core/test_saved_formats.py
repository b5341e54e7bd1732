"""What earlier code wrote stays usable: a latent cache and a mid-run checkpoint from tests/fixtures/format_v1.

The fixture was written by tests/fixtures/make_format_fixture.py (commit and torch version in its expected.json)
through the CLI only: a tiny [klein] model, a two-image dataset, 4 steps with a checkpoint at step 2. Users keep
caches and checkpoints across upgrades, so a change to either format must come with a reader for the old one;
these tests are what says so. The tiny model is rebuilt here (seeded); the cache being reused whole shows it is
the same model the fixture was trained on.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from flux2_lora_core.cache import cache_for_config, dataset_cache_root
from flux2_lora_core.config import load_config
from flux2_lora_core.data import load_dataset
from flux2_lora_core.models import write_tiny_model
from flux2_lora_core.resume import resume

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "format_v1"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())


@pytest.fixture
def saved(tmp_path, monkeypatch):
    """A copy of the fixture's work/ folder, as the current directory (its config's paths are relative)."""
    shutil.copytree(FIXTURE / "work", tmp_path / "work")
    monkeypatch.chdir(tmp_path)
    write_tiny_model(tmp_path / "work" / "model", variant="klein")
    # A cache folder is named after the dataset's absolute location: this copy is the same dataset, moved here.
    (folder,) = (tmp_path / "work" / "cache").iterdir()
    folder.rename(dataset_cache_root("work/cache", load_dataset("work/dataset")))
    return tmp_path / "work"


def test_a_saved_cache_is_reused_without_encoding(saved):
    config = load_config(None, EXPECTED["train"] + ["cache.verify=full"])
    cache, _ = cache_for_config(config, prompts=config.sample.prompts)
    summary = cache.summary
    assert (summary.images_encoded, summary.captions_encoded, summary.rebuilt_shards) == (0, 0, [])
    assert summary.images_reused == 2 and summary.captions_reused >= 2


def test_a_saved_checkpoint_resumes_to_the_uninterrupted_run(saved):
    result = resume(saved / "runs" / "format")
    assert result.steps == EXPECTED["steps"] and not result.stopped_early
    records = map(json.loads, (saved / "runs" / "format" / "metrics.jsonl").read_text().splitlines())
    logged = {str(m["step"]): m["loss"] for m in records if m["step"] > EXPECTED["checkpoint_step"]}
    assert logged == pytest.approx(EXPECTED["losses"], abs=2e-5)  # metrics.jsonl keeps 5 decimals
    lora, expected = load_file(result.lora_path), load_file(FIXTURE / "expected_lora.safetensors")
    assert lora.keys() == expected.keys()
    worst = max((lora[k] - expected[k]).abs().max().item() for k in expected)
    assert worst <= 1e-6, f"resumed LoRA differs from the uninterrupted run's by {worst:.3g}"
