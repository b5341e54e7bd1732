"""dataset.py: what load_dataset finds in a folder, in which order, with which captions and repeats."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import time

import pytest

from flux2_lora_core.data import dataset as dataset_module
from flux2_lora_core.data.dataset import Dataset, DatasetItem, load_dataset
from flux2_lora_core.data.images import IMAGE_EXTENSIONS
from flux2_lora_core.errors import ConfigError, DatasetError

pytestmark = pytest.mark.timeout(60)


def names(ds: Dataset) -> list[str]:
    return [ds.relative_path(item) for item in ds]


def test_every_extension_in_any_case_is_an_image_and_nothing_else_is(tmp_path, make_image, write_text):
    files = ["a.jpg", "b.JPG", "c.jpeg", "d.JpEg", "e.png", "f.PNG", "g.webp", "h.WEBP", "i.bmp", "j.Bmp",
             "k.tif", "l.TIF", "m.tiff", "n.TIFF", "o.gif", "p.GIF"]
    for name in files:
        ext = os.path.splitext(name)[1].lower()
        fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF"}.get(ext, ext[1:].upper())
        make_image(tmp_path / name, format=fmt)
    make_image(tmp_path / "x.heic", format="PNG")
    write_text(tmp_path / "x.txt", "the caption of an unsupported image is not an orphan: the image is reported")
    write_text(tmp_path / "notes.md", "hello")
    assert IMAGE_EXTENSIONS == {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
    ds = load_dataset(tmp_path)
    assert names(ds) == files and len(ds) == 16 and ds.root == tmp_path.resolve()
    assert [n.code for n in ds.notes] == ["unsupported_image"]


def test_a_gif_trains_on_its_first_frame_with_its_caption(tmp_path, write_text):
    from PIL import Image

    from flux2_lora_core.data.images import load_image_rgb
    from flux2_lora_core.data.validation import validate_dataset

    frames = [Image.new("RGB", (300, 300), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "clip.gif", save_all=True, append_images=frames[1:])
    write_text(tmp_path / "clip.txt", "a red frame")
    ds = load_dataset(tmp_path)
    assert names(ds) == ["clip.gif"] and ds.caption(0) == "a red frame" and ds.notes == ()  # not an orphan
    assert load_image_rgb(ds[0].image_path).getpixel((150, 150)) == (255, 0, 0)
    report = validate_dataset(ds)
    assert report.usable and report.errors == [] and report.stats["images"]["valid_pairs"] == 1
    assert {p.code for p in report.warnings} == {"animated_image", "small_image"}


def test_sidecar_captions_first_existing_extension_wins(tmp_path, make_image, write_text):
    for stem in "abc":
        make_image(tmp_path / f"{stem}.png")
    write_text(tmp_path / "a.txt", "from txt")
    write_text(tmp_path / "a.caption", "from caption")
    write_text(tmp_path / "b.TXT", "  upper-case extension, stripped \n")
    assert [i.read_caption() for i in load_dataset(tmp_path)] == ["from txt", "upper-case extension, stripped", ""]
    for exts in ((".caption", ".txt"), "caption, txt", ["caption", "TXT"]):
        ds = load_dataset(tmp_path, caption_extensions=exts)
        assert ds.caption_extensions == (".caption", ".txt")
        assert [ds.caption(i) for i in range(3)] == ["from caption", "upper-case extension, stripped", ""]
    ds = load_dataset(tmp_path, caption_extensions=".caption")
    assert [n.path for n in ds.notes if n.code == "orphan_caption"] == []  # .txt files are not captions now


def test_utf8_bom_is_dropped(tmp_path, make_image, write_text):
    make_image(tmp_path / "a.png")
    write_text(tmp_path / "a.txt", "\ufeffcafé")
    assert load_dataset(tmp_path)[0].read_caption() == "café"


def test_metadata_jsonl_captions_relative_to_its_folder(tmp_path, make_image, write_text):
    make_image(tmp_path / "a.png")
    make_image(tmp_path / "sub" / "b.png")
    make_image(tmp_path / "sub" / "c.png")
    make_image(tmp_path / "sub" / "deeper" / "d.png")
    write_text(tmp_path / "sub" / "c.txt", "sidecar wins")
    write_text(tmp_path / "metadata.jsonl", "\n".join(json.dumps(e) for e in [
        {"file_name": "a.png", "text": "caption a", "extra": 1},
        {"file_name": "sub/b.png", "text": "root says b"},
    ]) + "\n")
    write_text(tmp_path / "sub" / "metadata.jsonl", json.dumps({"file_name": "b.png", "text": "nearest says b"}) + "\n"
               + json.dumps({"file_name": "c.png", "text": "metadata c"}) + "\n"
               + json.dumps({"file_name": "deeper/d.png", "text": "caption d"}) + "\n")
    ds = load_dataset(tmp_path)
    assert [ds.caption(i) for i in range(len(ds))] == ["caption a", "nearest says b", "sidecar wins", "caption d"]
    assert ds[0].caption_source.line == 1 and ds[3].caption_source.line == 3
    assert ds.notes == ()


def test_bad_metadata_lines_do_not_stop_loading_and_keep_line_numbers(tmp_path, make_image, write_text):
    make_image(tmp_path / "a.png")
    make_image(tmp_path / "b.png")
    make_image(tmp_path / ".hidden" / "h.png")
    (tmp_path / "notes.doc").write_bytes(b"x")
    lines = ['{"file_name": "a.png", "text": "ok"}', "", "{not json", '["a list"]', '{"file_name": "b.png"}',
             '{"text": "no name"}', '{"file_name": "gone.png", "text": "x"}', '{"file_name": "../up.png", "text": "x"}',
             '{"file_name": "notes.doc", "text": "x"}', '{"file_name": ".hidden/h.png", "text": "x"}',
             '{"file_name": "a.png", "text": "again"}']
    write_text(tmp_path / "metadata.jsonl", "\n".join(lines))
    (tmp_path / "metadata.jsonl").write_bytes((tmp_path / "metadata.jsonl").read_bytes() + b"\n\xff\xfe\n")
    ds = load_dataset(tmp_path)
    assert [i.read_caption() for i in ds] == ["again", ""]
    found = [(n.line, n.code, n.severity) for n in ds.notes]
    assert found == [(3, "metadata_invalid_line", "error"), (4, "metadata_invalid_line", "error"),
                     (5, "metadata_invalid_line", "error"), (6, "metadata_invalid_line", "error"),
                     (7, "metadata_missing_file", "error"), (8, "metadata_bad_file_name", "error"),
                     (9, "metadata_not_image", "error"), (10, "metadata_skipped_file", "warning"),
                     (11, "metadata_duplicate", "warning"), (12, "metadata_invalid_line", "error")]
    assert all(n.path == "metadata.jsonl" for n in ds.notes)


def test_no_captions_and_the_trigger_word(tmp_path, make_image, write_text):
    make_image(tmp_path / "a.png")
    make_image(tmp_path / "b.png")
    make_image(tmp_path / "c.png")
    write_text(tmp_path / "b.txt", "a photo of a dog")
    write_text(tmp_path / "c.txt", "ohwx, already tagged")
    assert [i.read_caption() for i in load_dataset(tmp_path)] == ["", "a photo of a dog", "ohwx, already tagged"]
    ds = load_dataset(tmp_path, trigger_word="ohwx")
    assert [ds.caption(i) for i in range(3)] == ["ohwx", "ohwx, a photo of a dog", "ohwx, already tagged"]
    assert ds[1].read_raw_caption() == "a photo of a dog"


def test_kohya_repeat_folders_multiply_with_the_repeats_argument(tmp_path, make_image):
    make_image(tmp_path / "root.png")
    make_image(tmp_path / "10_mychar" / "a.png")
    make_image(tmp_path / "10_mychar" / "5_closeups" / "b.png")
    make_image(tmp_path / "10_mychar" / "plain" / "c.png")
    make_image(tmp_path / "0_zero" / "d.png")
    make_image(tmp_path / "_x" / "e.png")
    ds = load_dataset(tmp_path)
    reps = {ds.relative_path(i): i.repeats for i in ds}
    assert reps == {"0_zero/d.png": 1, "10_mychar/5_closeups/b.png": 5, "10_mychar/a.png": 10,
                    "10_mychar/plain/c.png": 10, "_x/e.png": 1, "root.png": 1}
    assert ds.num_samples == 28
    doubled = load_dataset(tmp_path, repeats=2)
    assert [i.repeats for i in doubled] == [2 * r for r in (1, 5, 10, 10, 1, 1)] and doubled.num_samples == 56
    # pointing at the repeat folder itself: its own name is not read
    assert {i.repeats for i in load_dataset(tmp_path / "10_mychar" / "5_closeups")} == {1}


def test_a_year_like_folder_name_is_flagged(tmp_path, make_image):
    make_image(tmp_path / "2023_trip" / "a.png")
    ds = load_dataset(tmp_path)
    assert ds[0].repeats == 2023 and [(n.code, n.path) for n in ds.notes] == [("large_repeats", "2023_trip")]


def test_recursive_on_and_off(tmp_path, make_image):
    make_image(tmp_path / "a.png")
    make_image(tmp_path / "sub" / "b.png")
    make_image(tmp_path / "sub" / "deep" / "c.png")
    assert names(load_dataset(tmp_path)) == ["a.png", "sub/b.png", "sub/deep/c.png"]
    assert names(load_dataset(tmp_path, recursive=False)) == ["a.png"]


def test_hidden_and_tool_folders_are_skipped(tmp_path, make_image):
    make_image(tmp_path / "a.png")
    for junk in (".hidden.png", "._a.png", "__MACOSX/a.png", ".ipynb_checkpoints/a.png", ".git/x.png",
                 "@eaDir/a.png/SYNOFILE_THUMB_M.jpg"):
        make_image(tmp_path / junk)
    assert names(load_dataset(tmp_path)) == ["a.png"]


def test_order_is_sorted_whatever_the_file_system_lists(tmp_path, make_image, monkeypatch):
    for name in ["b.png", "a/z.png", "A.png", "a.png", "a-b.png", "10_x/c.png", "2_x/c.png"]:
        make_image(tmp_path / name)
    expected = names(load_dataset(tmp_path))
    # component by component, by code point: a folder's files stay together, no locale involved
    assert expected == ["10_x/c.png", "2_x/c.png", "A.png", "a/z.png", "a-b.png", "a.png", "b.png"]
    real_scandir = os.scandir

    class Reversed:
        def __init__(self, path):
            self.entries = list(real_scandir(path))[::-1]

        def __enter__(self):
            return iter(self.entries)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(os, "scandir", Reversed)
    assert names(load_dataset(tmp_path)) == expected


def test_captions_are_read_lazily_and_fresh(tmp_path, make_image, write_text):
    make_image(tmp_path / "a.png")
    make_image(tmp_path / "b.png")
    write_text(tmp_path / "a.txt", "the first secret caption")
    write_text(tmp_path / "metadata.jsonl", '{"file_name": "b.png", "text": "the second secret caption"}\n')
    ds = load_dataset(tmp_path, trigger_word="ohwx")
    blob = pickle.dumps(ds)
    assert b"secret" not in blob and len(blob) < 2000  # no caption text, no pixels
    write_text(tmp_path / "a.txt", "edited after loading")
    write_text(tmp_path / "metadata.jsonl", '{"file_name": "zzz.png", "text": "a line was added above"}\n'
                                            '{"file_name": "b.png", "text": "edited too"}\n')
    assert [ds.caption(0), ds.caption(1)] == ["ohwx, edited after loading", "ohwx, edited too"]
    write_text(tmp_path / "metadata.jsonl", "")
    with pytest.raises(DatasetError, match="load the dataset again"):
        ds.caption(1)


def test_dataset_is_a_small_picklable_value(tmp_path, make_image):
    make_image(tmp_path / "a.png")
    ds = load_dataset(tmp_path)
    assert pickle.loads(pickle.dumps(ds)) == ds
    assert isinstance(ds.items, tuple) and isinstance(ds[0], DatasetItem)
    with pytest.raises(AttributeError):
        ds[0].repeats = 3  # frozen


def test_fingerprint_follows_content_captions_and_settings_not_location(tmp_path, make_image, write_text):
    src = tmp_path / "src"
    make_image(src / "a.png", color="red")
    make_image(src / "5_x" / "b.png", color="blue")
    write_text(src / "a.txt", "red")
    base = load_dataset(src).fingerprint()
    assert len(base) == 64 and base == load_dataset(src).fingerprint()
    time.sleep(0.01)
    copy = shutil.copytree(src, tmp_path / "copy")  # new mtimes, same bytes
    os.utime(copy / "a.png", (1, 1))
    assert load_dataset(copy).fingerprint() == base
    assert load_dataset(copy).fingerprint(content=False) != load_dataset(src).fingerprint(content=False)
    assert load_dataset(src, trigger_word="ohwx").fingerprint() != base
    assert load_dataset(src, repeats=2).fingerprint() != base
    write_text(copy / "a.txt", "changed")
    assert load_dataset(copy).fingerprint() != base
    write_text(copy / "a.txt", "red")
    make_image(copy / "a.png", color="green")
    assert load_dataset(copy).fingerprint() != base


@pytest.mark.parametrize("make, words", [
    (lambda tmp: tmp / "missing", "does not exist"),
    (lambda tmp: (tmp / "file.png").write_bytes(b"x") and tmp / "file.png", "is a file, not a folder"),
    (lambda tmp: tmp, "no images found"),
    (lambda tmp: "", "no dataset folder given"),
    (lambda tmp: "   ", "no dataset folder given"),
])
def test_unusable_paths_raise_dataset_error_naming_the_path_and_the_fix(tmp_path, make, words):
    path = make(tmp_path)
    with pytest.raises(DatasetError) as info:
        load_dataset(path)
    message = str(info.value)
    assert words in message and (not str(path).strip() or str(path) in message or str(path.resolve()) in message)


def test_quoted_and_home_relative_paths(tmp_path, make_image, monkeypatch):
    make_image(tmp_path / "a.png")
    monkeypatch.setenv("HOME", str(tmp_path.parent))
    assert len(load_dataset(f'"{tmp_path}"')) == 1
    assert len(load_dataset(f"~/{tmp_path.name}")) == 1


@pytest.mark.parametrize("kwargs, key", [({"repeats": 0}, "repeats"), ({"repeats": 1.5}, "repeats"),
                                         ({"caption_extensions": ()}, "caption_extensions"),
                                         ({"caption_extensions": " , "}, "caption_extensions"),
                                         ({"caption_extensions": (".png",)}, "caption_extensions")])
def test_bad_arguments_raise_config_error(tmp_path, make_image, kwargs, key):
    make_image(tmp_path / "a.png")
    with pytest.raises(ConfigError) as info:
        load_dataset(tmp_path, **kwargs)
    assert info.value.problems[0][0] == key


def test_symlink_loops_and_special_files_do_not_hang_the_scan(tmp_path, make_image):
    make_image(tmp_path / "sub" / "a.png")
    os.symlink(tmp_path, tmp_path / "sub" / "back")
    os.symlink("self", tmp_path / "self")
    os.symlink("loop.png", tmp_path / "loop.png")
    os.mkfifo(tmp_path / "pipe.png")
    os.mkfifo(tmp_path / "pipe.txt")
    (tmp_path / "dir.jpg").mkdir()
    ds = load_dataset(tmp_path)
    assert names(ds) == ["loop.png", "pipe.png", "sub/a.png"]  # validation reports the first two
    assert [(n.code, n.path) for n in ds.notes] == [("folder_seen_twice", "sub/back")]


def test_non_utf8_file_names_load(tmp_path, make_image):
    raw = os.fsencode(tmp_path) + b"/caf\xe9.png"
    make_image(os.fsdecode(raw))
    ds = load_dataset(tmp_path)
    assert len(ds) == 1 and os.fsencode(ds[0].image_path) == raw


def test_unreadable_sub_folder_becomes_a_note(tmp_path, make_image, monkeypatch):
    make_image(tmp_path / "a.png")
    make_image(tmp_path / "locked" / "b.png")
    real_scandir = os.scandir

    def scandir(path):  # tests run as root, where chmod 000 does not stop reads
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(dataset_module.os, "scandir", scandir)
    ds = load_dataset(tmp_path)
    assert names(ds) == ["a.png"]
    assert [(n.code, n.path, n.severity) for n in ds.notes] == [("unreadable_folder", "locked", "error")]
