"""Reference images for edit LoRAs: which files are references of which targets (sidecar `_ref`, a `references/`
folder, metadata.jsonl), that they are never targets, the fingerprint, validation and confinement."""

from __future__ import annotations

import hashlib
import json
import os
import pickle

import pytest

from flux2_lora_core.config import Config
from flux2_lora_core.data import screen, validate_data
from flux2_lora_core.data.captions import parse_metadata_entry
from flux2_lora_core.data.dataset import Dataset, load_dataset
from flux2_lora_core.data.validation import validate_dataset

from .test_dataset import names

pytestmark = pytest.mark.timeout(60)


def refs(ds: Dataset) -> dict[str, list[str]]:
    return {ds.relative_path(item): [ds.relative_path(r) for r in item.references] for item in ds}


def notes(ds: Dataset) -> list[tuple]:
    return [(n.code, n.path, n.line, n.severity) for n in ds.notes]


def test_sidecar_references_in_numeric_order_any_extension(tmp_path, make_image):
    for name in ("a.png", "a_ref.jpg", "a_ref10.png", "a_ref2.PNG", "a_ref1.webp", "b.png"):
        make_image(tmp_path / name, format="JPEG" if name.endswith(".jpg") else None)
    ds = load_dataset(tmp_path)
    assert refs(ds) == {"a.png": ["a_ref.jpg", "a_ref1.webp", "a_ref2.PNG", "a_ref10.png"], "b.png": []}
    assert all(ref.is_absolute() and ref.parent == tmp_path.resolve() for ref in ds[0].references)
    assert ds.notes == () and ds.references is True


def test_an_x_ref_image_without_an_x_is_an_ordinary_target(tmp_path, make_image):
    make_image(tmp_path / "x_ref.png")  # kohya datasets may have such names
    make_image(tmp_path / "sub" / "y.png")
    make_image(tmp_path / "y_ref.png")  # y.png is in another folder: not its reference
    ds = load_dataset(tmp_path)
    assert refs(ds) == {"sub/y.png": [], "x_ref.png": [], "y_ref.png": []}


def test_one_sidecar_reference_serves_every_target_of_its_stem(tmp_path, make_image):
    make_image(tmp_path / "a.png")
    make_image(tmp_path / "a.jpg", format="JPEG")
    make_image(tmp_path / "a_ref.png")
    make_image(tmp_path / "a_ref_ref.png")  # the reference of a reference: no target
    ds = load_dataset(tmp_path)
    assert refs(ds) == {"a.jpg": ["a_ref.png"], "a.png": ["a_ref.png"]}
    assert notes(ds) == [("orphan_reference", "a_ref_ref.png", None, "warning")]


def test_a_references_folder_numbered_files_exact_stem_first_and_orphans(tmp_path, make_image, write_text):
    for name in ("img.png", "img_1.png", "other.png", "10_set/c.png"):
        make_image(tmp_path / name)
    for name in ("img.jpg", "img_2.png", "img_10.png", "img_1.png", "other_3.png", "lost.png", "lost_2.png",
                 "nested/img.png"):
        make_image(tmp_path / "references" / name, format="JPEG" if name.endswith(".jpg") else None)
    write_text(tmp_path / "references" / "img.txt", "text in references/ is not read")
    make_image(tmp_path / "10_set" / "references" / "c_1.png")
    ds = load_dataset(tmp_path)
    assert refs(ds) == {"10_set/c.png": ["10_set/references/c_1.png"],
                        "img.png": ["references/img.jpg", "references/img_2.png", "references/img_10.png"],
                        "img_1.png": ["references/img_1.png"],  # the exact stem wins over img's 1st
                        "other.png": ["references/other_3.png"]}
    assert [i.repeats for i in ds] == [10, 1, 1, 1]  # references/ is no dataset sub-folder
    assert notes(ds) == [("orphan_reference", "references/lost.png", None, "warning"),
                         ("orphan_reference", "references/lost_2.png", None, "warning")]
    assert refs(load_dataset(tmp_path, recursive=False))["img.png"][0] == "references/img.jpg"  # read even then


def test_sidecar_references_come_before_folder_ones(tmp_path, make_image):
    make_image(tmp_path / "a.png")
    make_image(tmp_path / "a_ref.png")
    make_image(tmp_path / "references" / "a.png")
    assert refs(load_dataset(tmp_path)) == {"a.png": ["a_ref.png", "references/a.png"]}


def test_metadata_references_replace_sidecar_ones_and_are_never_targets(tmp_path, make_image, write_text):
    for name in ("a.png", "a_ref.png", "b.png", "c.png", "src/shared.png", "src/b_2.png", "d.png"):
        make_image(tmp_path / name)
    lines = [{"file_name": "a.png", "text": "edit a", "reference": "src/shared.png"},
             {"file_name": "b.png", "text": "edit b", "reference": "src/shared.png", "references": ["src/b_2.png"]},
             {"file_name": "c.png", "text": "edit c"},
             {"file_name": "d.png", "text": "no references at all", "references": []}]
    write_text(tmp_path / "metadata.jsonl", "\n".join(json.dumps(line) for line in lines) + "\n")
    ds = load_dataset(tmp_path)
    assert refs(ds) == {"a.png": ["src/shared.png"], "b.png": ["src/shared.png", "src/b_2.png"], "c.png": [],
                        "d.png": []}
    assert [ds.caption(i) for i in range(4)] == ["edit a", "edit b", "edit c", "no references at all"]
    # a_ref.png is still a reference (of a.png, by name), so neither it nor src/ is trained on
    assert notes(ds) == [] and "a_ref.png" not in names(ds)


def test_the_metadata_line_that_gives_the_caption_gives_the_references(tmp_path, make_image, write_text):
    """Two metadata files name sub/b.png: the deeper one's line wins, and without references of its own it leaves
    the image its by-name references, not the other line's."""
    for name in ("sub/b.png", "sub/b_ref.png", "sub/src.png"):
        make_image(tmp_path / name)
    write_text(tmp_path / "metadata.jsonl", json.dumps({"file_name": "sub/b.png", "text": "shallow",
                                                        "reference": "sub/src.png"}) + "\n")
    write_text(tmp_path / "sub" / "metadata.jsonl", json.dumps({"file_name": "b.png", "text": "deep"}) + "\n")
    ds = load_dataset(tmp_path)
    assert refs(ds) == {"sub/b.png": ["sub/b_ref.png"]} and ds.caption(0) == "deep"


def test_bad_metadata_references_are_errors_with_their_line(tmp_path, make_image, write_text):
    outside = tmp_path / "outside.png"
    make_image(outside)
    root = tmp_path / "data"
    for name in ("a.png", "b.png", "ok.png", "a_ref.png"):
        make_image(root / name)
    write_text(root / "notes.md", "not an image")
    (root / "folder.png").mkdir()
    lines = ['{"file_name": "a.png", "text": "x", "references": ["../outside.png", "/etc/passwd", "gone.png", '
             '"notes.md", "folder.png", "ok.png"]}',
             '{"file_name": "b.png", "text": "y", "reference": 3, "references": "ok.png"}',
             '{"file_name": "a_ref.png", "text": "a caption for a reference"}']
    write_text(root / "metadata.jsonl", "\n".join(lines) + "\n")
    ds = load_dataset(root)
    assert refs(ds) == {"a.png": ["ok.png"], "b.png": []}  # the good one is kept; b's own references are replaced
    found = [(n.line, n.code, n.severity, n.message) for n in ds.notes]
    assert [f[:3] for f in found] == [(1, "metadata_bad_reference", "error")] * 5 + [
        (2, "metadata_bad_reference", "error"), (3, "metadata_skipped_file", "warning")]
    messages = " | ".join(f[3] for f in found)
    for words in ("'../outside.png' is not inside the folder", "'/etc/passwd' is not inside", "'gone.png' does not "
                  "exist", "'notes.md' is not a supported image", "'folder.png' is not a supported image",
                  '"reference" is not a string', '"references" is not a list of strings', "is a reference image"):
        assert words in messages, words
    report = validate_dataset(ds, resolution=64)
    assert not report.usable and "metadata references that cannot be used" in report.format_text()


def test_a_metadata_entry_keeps_its_references_apart_from_its_caption(tmp_path):
    raw = b'{"file_name": "a.png", "text": "t", "references": ["r.png"]}\n'
    assert parse_metadata_entry(raw)[:2] == ("a.png", "t")
    assert parse_metadata_entry(raw).references == ("r.png",)
    assert parse_metadata_entry(b'{"file_name": "a.png", "text": "t", "reference": 3}').references_error == \
        '"reference" is not a string (a path)'
    assert parse_metadata_entry(b'{"file_name": "a.png", "text": "t"}').references is None


def test_references_off_attaches_none_and_still_trains_no_reference(tmp_path, make_image, write_text):
    make_image(tmp_path / "a.png")
    make_image(tmp_path / "a_ref.png")
    make_image(tmp_path / "b.png")
    make_image(tmp_path / "references" / "b.png")
    make_image(tmp_path / "src.png")
    write_text(tmp_path / "metadata.jsonl", '{"file_name": "b.png", "text": "t", "reference": "src.png"}\n')
    on, off = load_dataset(tmp_path), load_dataset(tmp_path, references=False)
    assert refs(on) == {"a.png": ["a_ref.png"], "b.png": ["src.png"]}
    assert refs(off) == {"a.png": [], "b.png": []} and off.references is False
    (left_out,) = [n for n in off.notes if n.code == "references_left_out"]     # said, not lost quietly
    assert left_out.severity == "warning" and left_out.message.startswith("3 images are reference images by their names (a_ref.png, ...)")
    assert "references_left_out" not in {n.code for n in on.notes}
    assert pickle.loads(pickle.dumps(off)) == off
    data = Config().replace(data={"path": str(tmp_path), "references": False}).data
    assert data.references is False and Config().data.references is True
    assert validate_data(data).stats["images"]["found"] == 2


def test_fingerprint_of_a_plain_dataset_is_unchanged(tmp_path, make_image, write_text):
    make_image(tmp_path / "a.png")
    make_image(tmp_path / "5_x" / "b.png")
    write_text(tmp_path / "a.txt", "red")
    ds = load_dataset(tmp_path)
    digest = hashlib.sha256(b"flux2-lora-dataset-v1\n")  # the formula before references existed
    for item in ds:
        record = [ds.relative_path(item), hashlib.sha256(item.image_path.read_bytes()).hexdigest(),
                  item.read_caption(), item.repeats]
        digest.update(json.dumps(record, ensure_ascii=True).encode() + b"\n")
    assert ds.fingerprint() == digest.hexdigest() == load_dataset(tmp_path, references=False).fingerprint()


def test_fingerprint_follows_the_references(tmp_path, make_image):
    make_image(tmp_path / "a.png", color="red")
    make_image(tmp_path / "a_ref.png", color="blue")
    base = load_dataset(tmp_path).fingerprint()
    quick = load_dataset(tmp_path).fingerprint(content=False)
    assert base != load_dataset(tmp_path, references=False).fingerprint()
    make_image(tmp_path / "a_ref.png", color="green")  # the reference's bytes change
    assert load_dataset(tmp_path).fingerprint() != base
    os.utime(tmp_path / "a_ref.png", ns=(1, 1))
    assert load_dataset(tmp_path).fingerprint(content=False) != quick
    make_image(tmp_path / "a_ref.png", color="blue")
    assert load_dataset(tmp_path).fingerprint() == base
    os.rename(tmp_path / "a_ref.png", tmp_path / "a_ref1.png")  # same bytes, another name
    assert load_dataset(tmp_path).fingerprint() != base


def test_a_broken_reference_skips_its_targets(tmp_path, make_image, write_text):
    for stem in ("a", "b", "c", "d"):
        make_image(tmp_path / f"{stem}.png", (300, 300))
        write_text(tmp_path / f"{stem}.txt", f"edit {stem}")
    make_image(tmp_path / "references" / "c.png", (300, 300))
    make_image(tmp_path / "references" / "d.png", (300, 300))
    make_image(tmp_path / "shared.png", (40, 40))  # too small
    (tmp_path / "a_ref.png").write_bytes(b"not a png at all")
    write_text(tmp_path / "metadata.jsonl", '{"file_name": "b.png", "text": "edit b", "reference": "shared.png"}\n'
                                            '{"file_name": "c.png", "text": "edit c", "references": ["shared.png", '
                                            '"references/c.png"]}\n')
    ds = load_dataset(tmp_path)
    report = validate_dataset(ds, resolution=256)
    assert report.usable and report.stats["images"]["usable"] == 1  # d.png
    assert {image: [(p.code, p.message) for p in problems] for image, problems in report.skipped.items()} == {
        "a.png": [("bad_reference", "reference a_ref.png: is a text file, not an image")],
        "b.png": [("bad_reference", "reference shared.png: 40x40 is under 256 px on the short side")],
        "c.png": [("bad_reference", "reference shared.png: 40x40 is under 256 px on the short side")]}
    assert names(screen(ds, report)) == ["d.png"]


def test_screening_skips_targets_of_broken_references_and_keeps_the_rest(tmp_path, make_image, write_text):
    for stem in ("a", "b", "c"):
        make_image(tmp_path / f"{stem}.png", (300, 300))
        make_image(tmp_path / f"{stem}_ref.png", (300, 300))
        write_text(tmp_path / f"{stem}.txt", f"edit {stem}")
    (tmp_path / "b_ref.png").write_bytes(b"")
    ds = load_dataset(tmp_path)
    report = validate_dataset(ds, resolution=256)
    assert report.usable and list(report.skipped) == ["b.png"]
    assert report.errors[0].fix.startswith("re-export or re-download it, or remove that reference")
    text = report.format_text()
    assert "b.png: reference b_ref.png: the file is empty (0 bytes) [bad_reference]" in text
    images = report.stats["images"]
    assert (images["found"], images["usable"], images["with_references"], images["references"]) == (3, 2, 3, 3)
    assert report.stats["latent_cache"]["references"] == 2 and "and 2 references" in text
    assert names(screen(ds, report)) == ["a.png", "c.png"]


def test_some_targets_without_references_are_a_warning(tmp_path, make_image, write_text):
    for stem in ("a", "b", "c", "d", "e"):
        make_image(tmp_path / f"{stem}.png", (300, 300))
        write_text(tmp_path / f"{stem}.txt", "edit")
    make_image(tmp_path / "a_ref.png", (300, 300))
    write_text(tmp_path / "a_ref.txt", "a caption beside a reference")
    report = validate_dataset(tmp_path, resolution=256)
    assert [(p.code, p.path) for p in report.warnings] == [("orphan_caption", "a_ref.txt"), ("mixed_references", None)]
    mixed = report.warnings[1]
    assert mixed.message.startswith("4 of 5 images have no reference image (b.png, c.png, d.png, ...)")
    assert "caption of a reference image" in report.warnings[0].message
    assert report.usable and not validate_dataset(tmp_path, resolution=256, strict=True).usable
    plain = validate_dataset(tmp_path, resolution=256, references=False)
    assert [p.code for p in plain.warnings] == ["orphan_caption", "references_left_out"] and plain.stats["images"]["found"] == 5


def test_confined_references_never_lead_out(tmp_path, make_image, write_text):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    root = allowed / "set"
    for name in ("a.png", "b.png", "c.png"):
        make_image(root / name)
    make_image(outside / "secret_canary.png")
    make_image(outside / "refs" / "b.png")
    (root / "a_ref.png").symlink_to(outside / "secret_canary.png")
    (root / "references").symlink_to(outside / "refs", target_is_directory=True)
    (root / "linked").symlink_to(outside, target_is_directory=True)
    write_text(root / "metadata.jsonl", json.dumps({"file_name": "c.png", "text": "t",
                                                    "reference": "linked/secret_canary.png"}) + "\n")
    ds = load_dataset(root, confine_to=[allowed])
    assert refs(ds) == {"a.png": [], "b.png": [], "c.png": []}
    assert sorted((n.code, n.path) for n in ds.notes) == [
        ("link_outside", "a_ref.png"), ("link_outside", "linked"), ("link_outside", "references"),
        ("metadata_bad_reference", "metadata.jsonl")]
    assert "leads outside the folders" in next(n.message for n in ds.notes if n.code == "metadata_bad_reference")
    assert "canary" not in validate_dataset(ds).format_text().replace("linked/secret_canary.png", "")
    free = refs(load_dataset(root))  # without confinement, links are followed wherever they lead
    assert {k: free[k] for k in ("a.png", "b.png", "c.png")} == {
        "a.png": ["a_ref.png"], "b.png": ["references/b.png"], "c.png": ["linked/secret_canary.png"]}


def test_a_reference_shaped_unlike_its_image_is_a_warning_naming_the_share_cropped(tmp_path, make_image, write_text):
    for stem, ref_size in (("a", (300, 300)), ("b", (330, 300)), ("c", (600, 300))):
        make_image(tmp_path / f"{stem}.png", (300, 300))
        make_image(tmp_path / f"{stem}_ref.png", ref_size)
        write_text(tmp_path / f"{stem}.txt", f"edit {stem}")
    report = validate_dataset(tmp_path, resolution=256)
    (cropped,) = [p for p in report.warnings if p.code == "reference_cropped"]      # 9% of b's: under the bar
    assert cropped.path == "c.png" and cropped.message == ("reference c_ref.png is 600x300, its image 300x300: fitted "
                                                           "to the image's shape, 50% of it is cropped away")
    assert report.usable and report.stats["images"]["usable"] == 3
