"""A training folder as a small, picklable value: which images, where each caption lives, how often.

Rules (kohya-compatible where kohya has one):
- Images are files with an extension in IMAGE_EXTENSIONS, any case. Hidden files and folders
  (".name", incl. macOS "._x.jpg" forks) and tool folders (SKIPPED_FOLDERS) are never read.
- A caption comes from a sidecar file with the image's exact stem and the first of `caption_extensions`
  that exists, extension in any case (`a.png` -> `a.txt`, `a.TXT`); else from a `metadata.jsonl` line
  {"file_name", "text"} whose file_name is relative to that file's folder (the deepest such file wins);
  else there is none. Sidecar text is UTF-8 (a BOM is dropped), stripped of surrounding whitespace.
- A sub-folder named `N_name` (e.g. `10_mychar`) repeats its images N times; the innermost such
  folder counts, and the `repeats` argument multiplies everything (`10_mychar` with repeats=2 gives 20),
  so the balance between folders stays as the folder names say. The dataset folder's own name is
  never read as a repeat count.
- Order: relative paths sorted component by component (code points, no locale), whatever the
  file system lists.
Reference images (edit LoRAs train on reference image(s) + target + instruction caption); references.py sorts them:
- Sidecar: beside target `a.png`, `a_ref.<ext>` and `a_ref<N>.<ext>` (any image extension) are its references, in
  the order _ref, _ref1, _ref2, ...; an `x_ref.png` without an image `x.*` in its folder is an ordinary target.
- Folder: a sub-folder named exactly `references` holds references of the images of the folder above it:
  `references/a.<ext>`, then `references/a_<N>.<ext>` in numeric order (`references/img_1.png` belongs to a target
  `img_1` if there is one). Only files directly in it are read, also with recursive off; it is never a dataset
  sub-folder (no N_name repeats); a file there matching no target is noted (orphan_reference).
- metadata.jsonl: a line's "reference": "path" and/or "references": ["path", ...] (checked as file_name is)
  replace that image's sidecar and folder references.
- Sidecar references come before folder ones. A reference is never a training target, also with `references`
  off (then no item carries references); one file may serve several targets.
`confine_to` (folders) keeps a scan inside them: the dataset folder must lie in one, and a link in it that leads
out (to a file or a folder) is skipped with a note, never followed or read (references too: a metadata reference
leading out is refused): for a server that must not read beyond the folders it serves. Without it, links are
followed wherever they lead.
Captions are read when asked for (`item.read_caption()`), never held: items store the sidecar path,
or the metadata file with the line's byte offset. Problems found while scanning (bad metadata lines,
unreadable folders, orphan captions) are kept as `notes` for `validate_dataset` to report.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, DatasetError, PathNotAllowedError
from .captions import CaptionSource, normalise_caption_extensions, with_trigger
from .images import IMAGE_EXTENSIONS, file_sha256
from .metadata import metadata_captions, metadata_references, read_metadata
from .references import REFERENCES_FOLDER, find_references

OTHER_IMAGE_EXTENSIONS = frozenset({".heic", ".heif", ".avif", ".jxl", ".jfif", ".svg", ".psd", ".dng"})
SKIPPED_FOLDERS = frozenset({"__MACOSX", "@eaDir", "__pycache__"})  # plus every hidden ".name"
LARGE_REPEATS = 100  # a folder like "2023_trip" would mean 2023 repeats: warn above this
_REPEAT_FOLDER = re.compile(r"(\d+)_.+")


@dataclass(frozen=True)
class ScanNote:
    """Something load_dataset noticed but did not fail on; validate_dataset turns it into a Problem."""

    severity: str  # "error" | "warning"
    code: str
    path: str | None  # relative to the dataset root, POSIX separators
    message: str
    fix: str
    line: int | None = None


@dataclass(frozen=True)
class DatasetItem:
    image_path: Path
    caption_source: CaptionSource | None = None
    repeats: int = 1
    trigger_word: str = ""
    references: tuple[Path, ...] = ()  # absolute paths of its reference images, in order (edit LoRAs)

    def read_raw_caption(self) -> str:
        """The caption as written ("" when there is none); DatasetError if it cannot be read."""
        return self.caption_source.read() if self.caption_source else ""

    def read_caption(self) -> str:
        """The caption the model trains on: the trigger word prepended to the raw caption."""
        return with_trigger(self.trigger_word, self.read_raw_caption())


@dataclass(frozen=True)
class Dataset:
    root: Path
    items: tuple[DatasetItem, ...]
    caption_extensions: tuple[str, ...] = (".txt",)
    trigger_word: str = ""
    repeats: int = 1
    recursive: bool = True
    metadata_file: str = "metadata.jsonl"
    notes: tuple[ScanNote, ...] = ()
    references: bool = True  # the setting: whether items carry their reference images

    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        # Short on purpose: ComfyUI echoes str() of every input in its error payloads, and the
        # dataclass default would list every item.
        trigger = f", trigger={self.trigger_word!r}" if self.trigger_word else ""
        return f"Dataset({str(self.root)!r}, {len(self.items)} images{trigger})"

    def __iter__(self):
        return iter(self.items)

    def __getitem__(self, index: int) -> DatasetItem:
        return self.items[index]

    def caption(self, index: int) -> str:
        return self.items[index].read_caption()

    def relative_path(self, item_or_path) -> str:
        path = item_or_path.image_path if isinstance(item_or_path, DatasetItem) else Path(item_or_path)
        return path.relative_to(self.root).as_posix()

    @property
    def num_samples(self) -> int:
        """Images seen per epoch: every image counted `repeats` times."""
        return sum(item.repeats for item in self.items)

    def fingerprint(self, *, content: bool = True) -> str:
        """SHA-256 over each item's relative path, image bytes, final caption and repeats (and its references'
        paths and bytes when it has any: a dataset without references keeps the fingerprint it had).

        Content hashes (default) rather than size+mtime: the latent cache this keys is expensive to
        rebuild, and copying or unzipping a dataset onto another machine changes every mtime while the
        pixels stay the same; hashing costs ~0.6 s per GB. `content=False` uses size and mtime_ns
        instead for a quick "did anything change" check. The folder's absolute location is not
        included, so a moved dataset keeps its fingerprint. Raises DatasetError (ImageError) for a file
        that cannot be read: validate first.
        """
        def file_key(path: Path) -> str:
            if content:
                return file_sha256(path)
            st = os.stat(path)
            return f"{st.st_size}:{st.st_mtime_ns}"

        files = list(dict.fromkeys([i.image_path for i in self.items] + [r for i in self.items for r in i.references]))
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            keys = dict(zip(files, pool.map(file_key, files)))
        digest = hashlib.sha256(b"flux2-lora-dataset-v1\n")
        for item in self.items:
            record = [self.relative_path(item), keys[item.image_path], item.read_caption(), item.repeats]
            if item.references:
                record.append([[self.relative_path(ref), keys[ref]] for ref in item.references])
            digest.update(json.dumps(record, ensure_ascii=True).encode() + b"\n")
        return digest.hexdigest()


def load_dataset(path, *, caption_extensions=(".txt",), trigger_word: str = "", repeats: int = 1,
                 recursive: bool = True, metadata_file: str = "metadata.jsonl", confine_to=(),
                 references: bool = True) -> Dataset:
    """Scan a dataset folder. Raises DatasetError when the path is not a folder or holds no images,
    PathNotAllowedError when it lies outside `confine_to`."""
    dataset = scan_dataset(path, caption_extensions=caption_extensions, trigger_word=trigger_word, repeats=repeats,
                           recursive=recursive, metadata_file=metadata_file, confine_to=confine_to,
                           references=references)
    if not dataset.items:
        where = "it or its sub-folders" if recursive else "it (sub-folders were not scanned: recursive is off)"
        raise DatasetError(f"no images found in {dataset.root}: looked in {where} for "
                           f"{', '.join(sorted(IMAGE_EXTENSIONS))} files; put the training images there")
    return dataset


def scan_dataset(path, *, caption_extensions=(".txt",), trigger_word: str = "", repeats: int = 1,
                 recursive: bool = True, metadata_file: str = "metadata.jsonl", confine_to=(),
                 references: bool = True) -> Dataset:
    """load_dataset, except that a folder without images gives an empty Dataset (for validation)."""
    exts = normalise_caption_extensions(caption_extensions)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ConfigError([("repeats", f"{repeats!r} is not a whole number of at least 1")])
    roots = tuple(os.path.realpath(os.path.expanduser(str(folder))) for folder in confine_to)
    root = _dataset_root(path, roots)
    scan = _Scan(root, exts, bool(recursive), metadata_file, roots)
    lines = read_metadata(scan)
    listed = metadata_references(scan, lines)
    refs = find_references(scan.images, scan.reference_files, {p for found, _ in listed.values() for p in found})
    captions, chosen = metadata_captions(scan, lines, refs.files, listed)
    used = {p for found in chosen.values() for p in found}
    for parts in (p for p in refs.unattached if p not in used):
        scan.note("warning", "orphan_reference", parts, "reference image with no target image of its name",
                  "name it after its target (a_ref.png or references/a.png for a.png), or delete it")
    if refs.files and not references:   # left out by their names alone: say so rather than lose images quietly
        first = "/".join(min(refs.files))
        scan.note("warning", "references_left_out", (), f"{len(refs.files)} images are reference images by their "
                  f"names ({first}, ...) and, with references off, are not trained on",
                  "turn references on to train an edit LoRA with them, or rename them to train on them as images")
    trigger = str(trigger_word or "")
    items = []
    for parts, folder_repeats in sorted(scan.images.items()):
        if parts in refs.files:
            continue
        stems = scan.captions.get(parts[:-1], {}).get(os.path.splitext(parts[-1])[0], {})
        sidecar = next((stems[e] for e in exts if e in stems), None)
        source = CaptionSource(sidecar) if sidecar else captions.get(parts)
        own = chosen[parts] if parts in chosen else refs.by_target.get(parts, ())
        own = tuple(root.joinpath(*p) for p in own) if references else ()
        items.append(DatasetItem(root.joinpath(*parts), source, folder_repeats * repeats, trigger, own))
    # A caption beside an unsupported image (x.heic + x.txt) is not an orphan: the image is reported instead.
    image_stems = {(p[:-1], os.path.splitext(p[-1])[0]) for p in scan.images if p not in refs.files} | scan.unsupported
    reference_stems = {(p[:-1], os.path.splitext(p[-1])[0]) for p in refs.files}
    for folder, stems in sorted(scan.captions.items()):
        for stem, found in sorted(stems.items()):
            for path in sorted(found.values()) if (folder, stem) not in image_stems else ():
                if (folder, stem) in reference_stems:
                    scan.note("warning", "orphan_caption", path, "caption of a reference image: not used (the "
                              "target's caption is the edit instruction)", "delete it, or move its text into the "
                              "target's caption")
                else:
                    scan.note("warning", "orphan_caption", path, "caption file with no image of the same name",
                              "add the image, rename the caption to match it, or delete it")
    return Dataset(root, tuple(items), exts, trigger, repeats, bool(recursive), metadata_file, tuple(scan.notes),
                   bool(references))


class _Scan:
    """One walk over the folder tree: images, sidecar captions, references/ folders, metadata files and what went
    wrong."""

    def __init__(self, root: Path, exts: tuple[str, ...], recursive: bool, metadata_file: str, roots=()):
        self.root, self.exts, self.metadata_file, self.roots = root, exts, metadata_file, roots
        self.images: dict[tuple[str, ...], int] = {}  # relative parts -> folder repeats (sidecar references too)
        self.reference_files: dict[tuple[str, ...], list[str]] = {}  # folder -> image names in its references/
        self.captions: dict[tuple[str, ...], dict[str, dict[str, Path]]] = {}  # folder -> stem -> ext -> path
        self.metadata: list[tuple[tuple[str, ...], Path]] = []
        self.unsupported: set[tuple[tuple[str, ...], str]] = set()  # (folder, stem) of images in formats not read
        self.notes: list[ScanNote] = []
        st = os.stat(root)
        seen, stack = {(st.st_dev, st.st_ino)}, [((), 1)]
        while stack:
            folder, folder_repeats = stack.pop()
            for name, is_dir, key in self._entries(folder):
                parts = (*folder, name)
                lower = name.lower()
                ext = os.path.splitext(lower)[1]
                if is_dir:
                    if name == REFERENCES_FOLDER:
                        self._reference_folder(parts)
                    elif recursive and key in seen:
                        self.note("warning", "folder_seen_twice", parts, "links back to a folder already scanned",
                                  "remove the link (it was skipped to avoid a loop or counting images twice)")
                    elif recursive:
                        seen.add(key)
                        stack.append((parts, self._repeats(parts, folder_repeats)))
                elif ext in IMAGE_EXTENSIONS:  # also FIFOs and broken links: validation reports them
                    self.images[parts] = folder_repeats
                elif name == metadata_file:
                    self.metadata.append((folder, self.root.joinpath(*parts)))
                elif cap := max((e for e in exts if lower.endswith(e) and len(lower) > len(e)), key=len, default=""):
                    stem = name[:len(name) - len(cap)]
                    self.captions.setdefault(folder, {}).setdefault(stem, {})[cap] = self.root.joinpath(*parts)
                elif ext in OTHER_IMAGE_EXTENSIONS:
                    self.unsupported.add((folder, os.path.splitext(name)[0]))
                    self._unsupported(parts, ext)

    def _reference_folder(self, folder):
        """Images directly in a references/ folder: references, never targets; nothing below it is read."""
        for name, is_dir, _ in self._entries(folder):
            ext = os.path.splitext(name.lower())[1]
            if not is_dir and ext in IMAGE_EXTENSIONS:
                self.reference_files.setdefault(folder[:-1], []).append(name)
            elif not is_dir and ext in OTHER_IMAGE_EXTENSIONS:
                self._unsupported((*folder, name), ext)

    def _unsupported(self, parts, ext):
        self.note("warning", "unsupported_image", parts, f"{ext} files are not read",
                  f"convert it to PNG or JPEG ({', '.join(sorted(IMAGE_EXTENSIONS))} are read)")

    def note(self, severity, code, parts, message, fix, line=None):
        rel = parts.relative_to(self.root).as_posix() if isinstance(parts, Path) else "/".join(parts) or None
        self.notes.append(ScanNote(severity, code, rel, message, fix, line))

    def _entries(self, folder):
        """(name, is_dir, (dev, inode)) per entry, sorted by name; unreadable folders become notes."""
        try:
            with os.scandir(self.root.joinpath(*folder)) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            self.note("error", "unreadable_folder", folder, f"folder cannot be read ({exc.strerror or exc}); "
                      "its images are not in the dataset", "make it readable (e.g. chmod a+rx) or move the images")
            return
        for entry in entries:
            if entry.name.startswith(".") or entry.name in SKIPPED_FOLDERS:
                continue
            if self.roots and _leads_out(entry, self.roots):
                self.note("warning", "link_outside", (*folder, entry.name), "links outside the folders the dataset "
                          "may be read from: not read", "copy the file into the dataset instead of linking to it")
                continue
            try:
                is_dir = entry.is_dir()  # follows symlinks
                st = entry.stat() if is_dir else None
                key = (st.st_dev, st.st_ino) if st else None
            except OSError:  # a symlink loop or a vanished entry: as a file, probe_image reports it
                is_dir, key = False, None
            if not is_dir and not entry.name.lower().endswith(tuple(IMAGE_EXTENSIONS)):
                try:
                    if not entry.is_file():  # FIFOs, sockets, broken links: only images get reported
                        continue
                except OSError:
                    continue
            yield entry.name, is_dir, key

    def _repeats(self, parts, inherited: int) -> int:
        match = _REPEAT_FOLDER.fullmatch(parts[-1])
        if not match or int(match.group(1)) < 1:
            return inherited
        count = int(match.group(1))
        if count > LARGE_REPEATS:
            self.note("warning", "large_repeats", parts, f"folder name means {count} repeats (kohya's N_name "
                      "convention)", "rename the folder if that is not intended, e.g. '10_name' for 10 repeats")
        return count

    def reaches_out(self, path) -> bool:
        """Whether `path` (inside the dataset) leads out of the folders the scan is confined to."""
        return bool(self.roots) and not _inside(os.path.realpath(path), self.roots)


def _inside(real_path: str, roots: tuple[str, ...]) -> bool:
    return any(real_path == root or real_path.startswith(root.rstrip(os.sep) + os.sep) for root in roots)


def _leads_out(entry: os.DirEntry, roots: tuple[str, ...]) -> bool:
    try:
        return entry.is_symlink() and not _inside(os.path.realpath(entry.path), roots)
    except OSError:  # cannot tell where it leads: do not follow it
        return True


def _dataset_root(path, roots=()) -> Path:
    text = str(path).strip().strip("\"'") if path is not None else ""
    if not text:
        raise DatasetError("no dataset folder given: name the folder that holds the training images")
    root = Path(text).expanduser()
    if roots and not _inside(os.path.realpath(root), roots):  # before anything is looked at
        raise PathNotAllowedError(f"dataset folder {text!r} is outside the folders datasets may be read from: "
                                  "move the dataset into one of them")
    try:
        is_dir = root.is_dir()
        exists = is_dir or root.exists()
    except OSError as exc:
        raise DatasetError(f"cannot open dataset folder {root}: {exc.strerror or exc}: check the path") from None
    if not exists:
        raise DatasetError(f"dataset folder {text!r} does not exist (looked for {root.absolute()}): check the spelling, "
                           "or give an absolute path")
    if not is_dir:
        raise DatasetError(f"{root} is a file, not a folder: give the folder that holds the images")
    return root.resolve()
