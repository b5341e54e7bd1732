"""Where a caption lives and how it is read: sidecar files and metadata.jsonl lines, read lazily.

A Dataset holds `CaptionSource`s, never caption text, so a dataset of a million images costs a few
paths in memory and an edited caption is picked up on the next read (audit 1.4).
"""

from __future__ import annotations

import codecs
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from ..errors import ConfigError, DatasetError
from .images import IMAGE_EXTENSIONS, open_regular_file

_BOM = codecs.BOM_UTF8


def _caption_error(path, code: str, detail: str, fix: str) -> DatasetError:
    exc = DatasetError(f"{path}: {detail}: {fix}")
    exc.code, exc.detail, exc.fix = code, detail, fix
    return exc


def _decode(path, data: bytes, final: bool) -> str:
    try:
        return codecs.utf_8_decode(data[3:] if data.startswith(_BOM) else data, "strict", final)[0]
    except UnicodeDecodeError as exc:
        raise _caption_error(path, "caption_not_utf8", f"is not UTF-8 text (byte 0x{data[exc.start]:02x} at "
                             f"offset {exc.start})", "re-save it as UTF-8") from None


class MetadataEntry(NamedTuple):
    """One metadata.jsonl line: the image, its caption and, for edit LoRAs, its reference images."""

    file_name: str
    text: str
    references: tuple[str, ...] | None = None  # None: the line names none (sidecar or references/ ones apply)
    references_error: str = ""  # what is wrong with the line's "reference"/"references" value, if anything


def parse_metadata_entry(raw: bytes) -> MetadataEntry | str:
    """The line's entry, or what is wrong with the line. "reference" (a path) and "references" (a list of
    paths) are optional and may be combined, "reference" first; a value of the wrong type is not a bad line (the
    caption still counts) but a `references_error`."""
    try:
        obj = json.loads(raw.decode("utf-8").lstrip("\ufeff"))
    except UnicodeDecodeError:
        return "line is not UTF-8 text"
    except ValueError as exc:
        return f"line is not valid JSON ({exc.msg}, column {exc.colno})"
    missing = [key for key in ("file_name", "text") if not isinstance(obj, dict) or not isinstance(obj.get(key), str)]
    if missing:
        return f"line has no string {' or '.join(map(repr, missing))}"
    if "reference" not in obj and "references" not in obj:
        return MetadataEntry(obj["file_name"], obj["text"])
    one, many = obj.get("reference"), obj.get("references", [])
    errors, paths = [], []
    if isinstance(one, str):
        paths.append(one)
    elif one is not None:
        errors.append('"reference" is not a string (a path)')
    if not isinstance(many, list) or not all(isinstance(r, str) for r in many):
        errors.append('"references" is not a list of strings (paths)')
    if isinstance(many, list):
        paths += [r for r in many if isinstance(r, str)]
    return MetadataEntry(obj["file_name"], obj["text"], tuple(paths), " and ".join(errors))


@dataclass(frozen=True)
class CaptionSource:
    """Where one caption lives: a sidecar file, or line `line` (at byte `offset`) of a metadata.jsonl."""

    path: Path
    line: int | None = None
    offset: int = 0
    file_name: str = ""  # the metadata entry's file_name, to notice a metadata file edited since loading

    def peek(self, max_bytes: int | None = None) -> tuple[str, int]:
        """(text, size in UTF-8 bytes); the text is only the first `max_bytes` of a longer sidecar."""
        if self.line is not None:
            text = self._metadata_text()
            return text, len(text.encode("utf-8", "surrogatepass"))
        try:
            with open_regular_file(self.path) as f:
                size = os.fstat(f.fileno()).st_size
                data = f.read() if max_bytes is None else f.read(max_bytes)
        except OSError as exc:
            raise _caption_error(self.path, "unreadable_caption", f"cannot be read ({exc.strerror or exc})",
                                 "make it a readable text file") from None
        return _decode(self.path, data, final=len(data) >= size), size

    def read(self) -> str:
        return self.peek()[0].strip()

    def _metadata_text(self) -> str:
        try:
            with open_regular_file(self.path) as f:
                f.seek(self.offset)
                lines = [f.readline()]
                first = parse_metadata_entry(lines[0])
                if isinstance(first, str) or first.file_name != self.file_name:  # edited since loading: look again
                    f.seek(0)
                    lines = f.readlines()
            entries = (e for e in map(parse_metadata_entry, lines) if not isinstance(e, str))
            found = next((e for e in entries if e.file_name == self.file_name), None)
        except OSError as exc:
            raise _caption_error(self.path, "unreadable_caption", f"cannot be read ({exc.strerror or exc})",
                                 "make it a readable text file") from None
        if found is None:
            raise _caption_error(self.path, "metadata_changed", f"no longer has an entry for {self.file_name!r}",
                                 "load the dataset again")
        return found.text


def with_trigger(trigger_word: str, caption: str) -> str:
    """kohya style "trigger, caption"; just the trigger without a caption; never the trigger twice."""
    trigger, caption = trigger_word.strip(), caption.strip()
    if not trigger:
        return caption
    if not caption:
        return trigger
    if caption == trigger or caption.startswith((trigger + ",", trigger + " ")):
        return caption
    return f"{trigger}, {caption}"


def normalise_caption_extensions(value) -> tuple[str, ...]:
    """Accept ".txt", "txt", "txt, caption" or a sequence; lower-case, with dots, in the given order."""
    parts = value.split(",") if isinstance(value, str) else list(value or ())
    exts = []
    for part in parts:
        ext = str(part).strip().lower()
        ext = ext if ext.startswith(".") or not ext else "." + ext
        if ext in IMAGE_EXTENSIONS:
            raise ConfigError([("caption_extensions", f"{ext!r} is an image extension, not a caption one")])
        if len(ext) > 1 and ext not in exts:
            exts.append(ext)
    if not exts:
        raise ConfigError([("caption_extensions", f"{value!r} names no extension: use e.g. '.txt' or '.txt,.caption'")])
    return tuple(exts)
