"""validation.py: every problem in one report, statistics, and the human and JSON forms."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from flux2_lora_core.data import validation
from flux2_lora_core.data.captions import CaptionSource
from flux2_lora_core.data.dataset import load_dataset
from flux2_lora_core.data.validation import Problem, ValidationReport, validate_dataset
from flux2_lora_core.errors import ConfigError, DatasetError

ROOT = Path(__file__).resolve().parents[3]

pytestmark = pytest.mark.timeout(60)


def codes(report: ValidationReport) -> dict[str, str]:
    return {p.path: p.code for p in report.problems if p.path}


@pytest.fixture
def clean(tmp_path, make_image, write_text):
    root = tmp_path / "clean"
    make_image(root / "a.jpg", (1024, 1024))
    make_image(root / "b.png", (1200, 800))
    make_image(root / "10_x" / "c.webp", (600, 900))
    for rel, text in (("a.txt", "one"), ("b.txt", "a longer caption"), ("10_x/c.txt", "three ✓")):
        write_text(root / rel, text)
    return root


def test_a_clean_dataset_is_usable_with_full_statistics(clean):
    report = validate_dataset(clean)
    assert report.usable and report.problems == [] and report.errors == report.warnings == []
    s = report.stats
    assert s["images"] == {"found": 3, "usable": 3, "valid_pairs": 3, "captioned": 3, "samples": 12,
                           "with_references": 0, "references": 0}
    assert s["captions"]["chars"] == {"min": 3, "mean": 8.7, "median": 7, "max": 16}
    assert s["captions"]["tokens"] == {"min": 1, "mean": 2.7, "median": 3, "max": 4}
    assert s["resolution"] == {"min_width": 600, "max_width": 1200, "min_height": 800, "max_height": 1024,
                               "min_megapixels": 0.54, "max_megapixels": 1.05}
    assert s["buckets"] == {"resolution": 1024, "counts": {"1024x1024": 1, "832x1248": 1, "1248x832": 1}}
    cache = s["latent_cache"]
    config = json.loads((ROOT / "flux2_lora_core" / "models" / "configs" / "flux2-klein-4b" / "transformer"
                         / "config.json").read_text())
    tokens = 64 * 64 + 2 * 52 * 78  # (h/16) * (w/16) per image
    assert cache["image_latent_bytes"] == tokens * 128 * 2
    assert cache["text_embedding_bytes"] == 4 * 512 * config["joint_attention_dim"] * 2  # 3 captions + the empty one
    assert cache["total_bytes"] == cache["image_latent_bytes"] + cache["text_embedding_bytes"]
    assert cache["total_human"] == "32.98 MiB"


def test_cache_size_follows_the_model_variant_config(clean):
    dev = validate_dataset(clean, model_variant="flux2-dev").stats["latent_cache"]
    assert dev["joint_attention_dim"] == 15360 and dev["text_embedding_bytes"] == 4 * 512 * 15360 * 2
    with pytest.raises(ConfigError, match="model_variant"):
        validate_dataset(clean, model_variant="../../etc")


def test_a_dataset_object_can_be_validated(clean):
    ds = load_dataset(clean, trigger_word="ohwx")
    report = validate_dataset(ds)
    assert report.usable and report.root == ds.root
    assert report.stats["captions"]["chars"]["min"] == len("ohwx, one")


def test_every_hostile_file_is_reported_at_once(hostile_dataset):
    root, expected = hostile_dataset
    start = time.monotonic()
    report = validate_dataset(root)
    assert time.monotonic() - start < 10
    assert report.usable  # every error is about one file: those are skipped, the rest trains
    assert not validate_dataset(root, strict=True).usable
    found: dict[str, set[str]] = {}
    for p in report.problems:
        found.setdefault(p.path, set()).add(p.code)
    for path, code in expected.items():
        assert code in found.get(path, ()), (path, code, found.get(path))
    assert found["cut.jpg"] == {"truncated_image"}  # no "missing caption" noise for unusable images
    dup = next(p for p in report.problems if p.code == "duplicate_image")
    assert "dup_b.png" in dup.message
    assert {p.path for p in report.errors} >= {"empty.png", "cut.jpg", "bomb.png", "badcap.txt", "pipe.png"}
    assert "badcap.png" in next(p.message for p in report.problems if p.code == "caption_not_utf8")
    assert set(report.skipped) == {p.image for p in report.errors} == {
        "empty.png", "text.png", "page.jpg", "cut.jpg", "cut.png", "pipe.png", "loop.png", "bomb.png", "tiny.png",
        "badcap.png", "long.png"}  # long.png: its caption is over max_caption_tokens
    s = report.stats["images"]
    assert s["usable"] == 9 and s["valid_pairs"] == 2  # good1, good2
    assert report.stats["captions"]["tokens"]["max"] == 2_500_000  # sized from the byte count


def test_huge_caption_files_are_read_only_in_part(tmp_path, make_image, write_text, monkeypatch):
    make_image(tmp_path / "a.png", (600, 600))
    write_text(tmp_path / "a.txt", "x" * 5_000_000)
    real_peek, seen = CaptionSource.peek, []

    def peek(self, max_bytes=None):
        text, size = real_peek(self, max_bytes)
        seen.append((max_bytes, len(text), size))
        return text, size

    monkeypatch.setattr(CaptionSource, "peek", peek)
    report = validate_dataset(tmp_path)
    assert seen == [(validation.CAPTION_PEEK_BYTES, validation.CAPTION_PEEK_BYTES, 5_000_000)]
    assert codes(report) == {"a.txt": "caption_too_long"}  # sized from the byte count, not the part read
    (long,) = [p for p in report.problems if p.path]
    assert "1250000 tokens (estimated" in long.message and report.skipped.keys() == {"a.png"}
    assert [p.code for p in report.problems if not p.path] == ["too_few_images"]  # nothing left to train on


def test_strict_turns_warnings_into_errors(tmp_path, make_image, write_text):
    make_image(tmp_path / "a.png", (600, 600))
    make_image(tmp_path / "b.png", (600, 600))
    write_text(tmp_path / "a.txt", "fine")
    lenient = validate_dataset(tmp_path)
    assert lenient.usable and [(p.severity, p.code) for p in lenient.problems] == [("warning", "missing_caption")]
    strict = validate_dataset(tmp_path, strict=True)
    assert not strict.usable and [(p.severity, p.code) for p in strict.problems] == [("error", "missing_caption")]
    assert strict.to_dict()["summary"]["strict"] is True and "strict" in strict.format_text()


def test_min_images_and_empty_folders(tmp_path, make_image, write_text):
    (tmp_path / "empty").mkdir()
    report = validate_dataset(tmp_path / "empty")  # a report, not an exception
    assert not report.usable and [p.code for p in report.errors] == ["no_images"]
    make_image(tmp_path / "two" / "a.png", (600, 600))
    make_image(tmp_path / "two" / "b.png", (100, 100))
    write_text(tmp_path / "two" / "a.txt", "a")
    write_text(tmp_path / "two" / "b.txt", "b")
    assert validate_dataset(tmp_path / "two").skipped.keys() == {"b.png"}  # too small: skipped, a.png trains
    report = validate_dataset(tmp_path / "two", min_images=2)
    assert [p.code for p in report.errors] == ["too_few_images", "too_small"]
    assert "min_images=2" in report.errors[0].message


def test_only_a_missing_folder_raises(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        validate_dataset(tmp_path / "nope")
    (tmp_path / "f.png").write_bytes(b"x")
    with pytest.raises(DatasetError, match="not a folder"):
        validate_dataset(tmp_path / "f.png")


def test_metadata_problems_carry_line_numbers(tmp_path, make_image, write_text):
    make_image(tmp_path / "a.png", (600, 600))
    write_text(tmp_path / "metadata.jsonl", '{"file_name": "a.png", "text": "ok"}\n{oops\n'
                                            '{"file_name": "b.png", "text": "x"}\n')
    report = validate_dataset(tmp_path)
    assert [(p.code, p.path, p.line) for p in report.errors] == [("metadata_invalid_line", "metadata.jsonl", 2),
                                                                ("metadata_missing_file", "metadata.jsonl", 3)]
    text = report.format_text()
    assert "metadata.jsonl:2" in text and "metadata.jsonl:3" in text and "'b.png'" in text


def test_permission_denied_files_are_reported(tmp_path, make_image, write_text, monkeypatch):
    make_image(tmp_path / "a.png", (600, 600))
    make_image(tmp_path / "b.png", (600, 700))
    write_text(tmp_path / "a.txt", "a")
    write_text(tmp_path / "b.txt", "b")
    real_open = os.open

    def deny(path, *args, **kwargs):  # tests run as root, where chmod 000 does not stop reads
        if str(path).endswith(("a.png", "b.txt")):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", deny)
    report = validate_dataset(tmp_path)
    assert codes(report) == {"a.png": "unreadable_image", "b.txt": "unreadable_caption"}
    assert all("ermission denied" in p.message for p in report.problems if p.path)
    assert not report.usable and "once the 2 with errors are skipped" in report.errors[0].message


def test_non_utf8_names_are_shown_escaped_in_text_and_json(tmp_path, make_image):
    make_image(os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9.png"), (600, 600))
    report = validate_dataset(tmp_path)
    assert [p.path for p in report.problems] == ["caf\\xe9.png"]
    json.dumps(report.to_dict(), ensure_ascii=False).encode("utf-8")
    report.format_text().encode("utf-8")


def test_to_dict_is_json_with_stable_keys(hostile_dataset):
    report = validate_dataset(hostile_dataset[0])
    data = json.loads(json.dumps(report.to_dict(), ensure_ascii=False))
    assert list(data) == ["usable", "root", "summary", "stats", "problems"]
    assert data["summary"] == {"errors": len(report.errors), "warnings": len(report.warnings), "strict": False,
                               "images": 20, "usable_images": 9, "valid_pairs": 2,
                               "skipped_images": list(report.skipped)}
    assert list(data["stats"]) == ["images", "captions", "resolution", "buckets", "latent_cache"]
    assert set(data["problems"][0]) == {"severity", "code", "path", "message", "fix", "line", "image"}
    assert len(data["problems"]) == len(report.problems)


def test_format_text_names_files_groups_codes_and_caps_long_lists(tmp_path, make_image, write_text):
    for i in range(25):
        make_image(tmp_path / f"img{i:02}.png", (600, 600))
    (tmp_path / "zero.png").write_bytes(b"")
    report = validate_dataset(tmp_path)
    text = report.format_text()
    assert text.splitlines()[0].startswith(f"Dataset {tmp_path}: usable (1 error, 25 warnings)")
    assert text.splitlines()[1].startswith("usable: 25 of 26 images; this one will be skipped")
    for words in ("Statistics", "latent cache", "buckets @1024", "Errors (1)", "Warnings (25)",
                  "zero.png: the file is empty (0 bytes)", "images without a caption [missing_caption] (25)",
                  "img00.png", "img09.png", "... and 15 more"):
        assert words in text, words
    assert "img10.png" not in text
    assert len(report.to_dict()["problems"]) == 26  # the JSON keeps every one
    assert len(text.splitlines()) < 40


def test_problem_order_is_errors_first_then_by_code(hostile_dataset):
    problems = validate_dataset(hostile_dataset[0]).problems
    severities = [p.severity for p in problems]
    assert severities == sorted(severities, key=lambda s: s != "error")
    assert problems == validate_dataset(hostile_dataset[0]).problems
    assert all(isinstance(p, Problem) and p.code in validation.CODES for p in problems)


def test_every_code_the_scan_and_validation_write_has_a_heading():
    """A code missing from CODES is shown raw and sorted last: every literal code written by a note()/add() call in
    the data package is a key of it."""
    import re
    from pathlib import Path

    import flux2_lora_core.data as data

    calls = re.compile(r'\b(?:note|add)\(\s*"(?:error|warning)",\s*"([a-z_]+)"')
    used = {code for path in Path(data.__file__).parent.glob("*.py") for code in calls.findall(path.read_text())}
    assert {"link_outside", "reference_cropped", "references_left_out", "bad_reference"} <= used
    assert used <= validation.CODES.keys(), used - validation.CODES.keys()


def test_an_unexpected_failure_on_one_file_is_reported_not_raised(tmp_path, make_image, write_text, monkeypatch):
    make_image(tmp_path / "a.png", (600, 600))
    make_image(tmp_path / "b.png", (600, 600))
    write_text(tmp_path / "a.txt", "a")
    write_text(tmp_path / "b.txt", "b")
    real_probe = validation.probe_image

    def probe(path):
        if str(path).endswith("b.png"):
            raise RuntimeError("a plugin bug")
        return real_probe(path)

    monkeypatch.setattr(validation, "probe_image", probe)
    report = validation.validate_dataset(tmp_path)
    assert [(p.code, p.path) for p in report.errors] == [("unreadable_image", "b.png")]
    assert "a plugin bug" in report.errors[0].message
