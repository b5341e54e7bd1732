"""metadata.jsonl files of a dataset scan: every line read once, its image, caption and references checked.

Functions of the scan (dataset._Scan: its root, the images it found, `note` for problems, `reaches_out` for
confinement), split from dataset.py to keep each module readable. Items keep a line's byte offset, never its
text (captions.py reads it when asked). Problems become notes with the file and line number: validate_dataset
reports them, and an error on a line refuses the dataset (a lost line would silently take captions away).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .captions import CaptionSource, MetadataEntry, parse_metadata_entry
from .images import IMAGE_EXTENSIONS, open_regular_file
from .references import Parts



@dataclass(frozen=True)
class MetadataLine:
    folder: Parts  # the folder that holds the metadata file, relative to the dataset root
    path: Path  # the metadata file
    number: int  # 1-based line number
    offset: int  # byte offset of the line in the file
    entry: MetadataEntry | str  # or what is wrong with the line


def read_metadata(scan) -> list[MetadataLine]:
    """Every line of every metadata file, deepest folder last so that it wins. The lines' problems are noted by
    metadata_captions, in file and line order."""
    found = []
    for folder, path in sorted(scan.metadata, key=lambda m: (len(m[0]), m[0])):
        try:
            with open_regular_file(path) as f:
                lines = f.readlines()
        except OSError as exc:
            scan.note("error", "unreadable_metadata", path, f"cannot be read ({exc.strerror or exc})",
                      "make it a readable text file")
            continue
        offset = 0
        for number, raw in enumerate(lines, 1):
            start, offset = offset, offset + len(raw)
            if raw.strip():
                found.append(MetadataLine(folder, path, number, start, parse_metadata_entry(raw)))
    return found


def metadata_references(scan, lines: list[MetadataLine]) -> dict[tuple[Path, int], tuple[tuple[Parts, ...], list]]:
    """(metadata file, line number) -> (the usable references, [(what is wrong, fix)] for the others) of each
    line that names references."""
    found = {}
    for line in lines:
        entry = line.entry
        if isinstance(entry, str) or entry.references is None:  # a bad value gives () and references_error
            continue
        usable, bad = [], []
        if entry.references_error:
            bad.append((entry.references_error, 'write "reference": "a_src.png" or "references": ["a_1.png", '
                        '"a_2.png"]'))
        for name in entry.references:
            parts, message, fix = _reference(scan, line, name)
            if parts:
                usable.append(parts)
            else:
                bad.append((message, fix))
        found[line.path, line.number] = (tuple(usable), bad)
    return found


def _reference(scan, line: MetadataLine, name: str) -> tuple:
    """(parts, "", "") for a usable reference path, else (None, what is wrong, the fix): checked as a file_name
    is, and confined."""
    found = _in_folder(scan, line, name)
    if found is None:
        return None, f"reference {name!r} is not inside the folder", \
            "use a path relative to the folder that holds the metadata file"
    parts, full = found
    if scan.reaches_out(full):  # before anything else is looked at
        return None, f"reference {name!r} leads outside the folders the dataset may be read from", \
            "copy the file into the dataset instead of linking to it"
    if not os.path.lexists(full):
        return None, f"reference {name!r} does not exist", "fix the name or remove it from the line"
    if _not_an_image(full):
        return None, f"reference {name!r} is not a supported image", "point it at a .png/.jpg/.webp image"
    return parts, "", ""


def _in_folder(scan, line: MetadataLine, name: str) -> tuple[Parts, Path] | None:
    """(parts, full path) of a path a metadata line names (file_name or a reference), or None when it is not
    inside the metadata file's folder (absolute, with "..", or empty)."""
    rel = PurePosixPath(name.replace("\\", "/"))
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        return None
    parts = (*line.folder, *rel.parts)
    return parts, scan.root.joinpath(*parts)


def _not_an_image(full: Path) -> bool:
    return os.path.splitext(full.name)[1].lower() not in IMAGE_EXTENSIONS or os.path.isdir(full)


def metadata_captions(scan, lines: list[MetadataLine], reference_files, listed):
    """(target -> CaptionSource, target -> the references its line names), the deepest line winning; every
    line's problems noted. `reference_files`: every reference file (never a target); `listed`: metadata_references'."""
    captions, chosen, mine = {}, {}, {}
    for line in lines:
        if isinstance(line.entry, str):
            scan.note("error", "metadata_invalid_line", line.path, line.entry, 'write one JSON object per line with '
                      'string "file_name" and "text" keys, e.g. {"file_name": "a.png", "text": "a caption"}',
                      line.number)
            continue
        usable, bad = listed.get((line.path, line.number), ((), []))
        for message, fix in bad:
            scan.note("error", "metadata_bad_reference", line.path, message, fix, line.number)
        target = _target(scan, line, mine.setdefault(line.path, {}), reference_files)
        if target:
            captions[target] = CaptionSource(line.path, line.number, line.offset, line.entry.file_name)
            if (line.path, line.number) in listed:
                chosen[target] = usable
            else:                # the line that gives the caption gives the references too
                chosen.pop(target, None)
    return captions, chosen


def _target(scan, line: MetadataLine, mine: dict, reference_files) -> Parts | None:
    """The dataset image a line's file_name names, or None (noted) when it names none."""
    def bad(code, message, fix, severity="error"):
        scan.note(severity, code, line.path, message, fix, line.number)

    file_name = line.entry.file_name
    found = _in_folder(scan, line, file_name)
    if found is None:
        return bad("metadata_bad_file_name", f"file_name {file_name!r} is not inside the folder",
                   "use a path relative to the folder that holds the metadata file")
    target, full = found
    if target in reference_files:
        return bad("metadata_skipped_file", f"file_name {file_name!r} is a reference image, never a training "
                   "target: this caption is not used", "remove the line, or rename the file if it is a target "
                   "(a_ref.png, references/ and metadata references are reference images)", "warning")
    if target not in scan.images and not os.path.lexists(full):
        return bad("metadata_missing_file", f"file_name {file_name!r} does not exist",
                   "fix the name or remove the line")
    if target not in scan.images and _not_an_image(full):
        return bad("metadata_not_image", f"file_name {file_name!r} is not a supported image",
                   "point it at a .png/.jpg/.webp image or remove the line")
    if target not in scan.images:
        return bad("metadata_skipped_file", f"file_name {file_name!r} is not part of the dataset (hidden, or in a "
                   "sub-folder with recursive off)", "move the image or turn recursive on", "warning")
    if target in mine:
        bad("metadata_duplicate", f"file_name {file_name!r} is also on line {mine[target]}; this line is used",
            "keep one line per image", "warning")
    mine[target] = line.number
    return target
