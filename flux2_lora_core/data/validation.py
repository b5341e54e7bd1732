"""Check a dataset before any GPU time is spent: every problem at once, with statistics.

Images are checked from their headers and one streamed read (SHA-256 for duplicates + end-marker
check for truncation), never fully decoded, on a few threads. Nothing in the folder can make this
raise: unreadable files, links, FIFOs and odd names become problems in the report.
"""

from __future__ import annotations

import math
import os
import statistics
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..errors import ConfigError, DatasetError, ImageError
from ..models import SHIPPED, shipped_config
from .buckets import assign_bucket, make_buckets
from .dataset import IMAGE_EXTENSIONS, Dataset, scan_dataset, with_trigger
from .images import ImageInfo, image_error, probe_image, verify_image_file

MIN_SIDE, SMALL_SIDE = 256, 512  # short side below MIN_SIDE: error; below SMALL_SIDE: warning
CAPTION_PEEK_BYTES = 64 * 1024  # captions are read this far; longer ones are sized by their byte count
BYTES_PER_TOKEN = 4  # token estimate: UTF-8 bytes / 4 (about right for English; CJK is undercounted ~2x)
TEXT_TOKENS, LATENT_CHANNELS, BF16_BYTES = 512, 128, 2  # cache layout, see FLUX2_FACTS.md
# Threads: hashlib and file reads release the GIL, the JPEG marker regex and Pillow's header parsing do
# not, so on a warm page cache threads beyond the cores buy nothing (2 cores, 1000 JPEGs: 1 thread 0.53 s,
# 2 threads 0.50 s, 4 threads 0.58 s); at least 2 still hide disk latency on cold or network folders.
WORKERS = max(2, min(8, os.cpu_count() or 1))
GROUP_LIMIT = 10  # format_text lists this many problems per code; to_dict lists all
CODES = {  # code -> heading, in the order format_text shows them
    "no_images": "no images", "too_few_images": "too few usable images", "unreadable_folder": "unreadable folders",
    "empty_file": "empty files", "not_an_image": "not images", "unreadable_image": "unreadable images",
    "damaged_image": "damaged images", "truncated_image": "truncated images",
    "decompression_bomb": "images too large to open", "too_small": "images too small", "small_image": "small images",
    "metadata_invalid_line": "bad metadata lines", "metadata_bad_file_name": "metadata names outside the folder",
    "metadata_missing_file": "metadata names missing files", "metadata_not_image": "metadata names non-images",
    "metadata_skipped_file": "metadata names images outside the dataset", "metadata_duplicate": "metadata duplicates",
    "unreadable_metadata": "unreadable metadata files", "caption_not_utf8": "captions not in UTF-8",
    "unreadable_caption": "unreadable captions", "metadata_changed": "metadata changed while checking",
    "missing_caption": "images without a caption", "empty_caption": "empty captions", "long_caption": "long captions",
    "orphan_caption": "captions without an image", "duplicate_image": "duplicate images",
    "animated_image": "animated or multi-page images", "unsupported_image": "unsupported image formats",
    "large_repeats": "very large repeat counts", "folder_seen_twice": "folders reached twice",
}


@dataclass(frozen=True)
class Problem:
    severity: str  # "error" | "warning"
    code: str  # a key of CODES
    path: str | None  # relative to the dataset root, POSIX separators; None for the dataset as a whole
    message: str
    fix: str
    line: int | None = None  # for metadata.jsonl problems


@dataclass
class ValidationReport:
    root: Path
    problems: list[Problem]
    stats: dict
    strict: bool = False

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def usable(self) -> bool:
        return not self.errors  # strict mode already turned every warning into an error

    def to_dict(self) -> dict:
        images = self.stats["images"]
        summary = {"errors": len(self.errors), "warnings": len(self.warnings), "strict": self.strict,
                   "images": images["found"], "usable_images": images["usable"], "valid_pairs": images["valid_pairs"]}
        return {"usable": self.usable, "root": _shown(str(self.root)), "summary": summary, "stats": self.stats,
                "problems": [asdict(p) for p in self.problems]}

    def format_text(self, limit: int = GROUP_LIMIT) -> str:
        s, n_err, n_warn = self.stats, len(self.errors), len(self.warnings)
        verdict = "usable" if self.usable else "NOT USABLE"
        lines = [f"Dataset {_shown(str(self.root))}: {verdict} ({n_err} error{'s' * (n_err != 1)}, "
                 f"{n_warn} warning{'s' * (n_warn != 1)}{'; strict: warnings count as errors' * self.strict})",
                 "", "Statistics"]
        lines += [f"  {name:<14}{text}" for name, text in _stat_lines(s)]
        for severity, title in (("error", "Errors"), ("warning", "Warnings")):
            group = [p for p in self.problems if p.severity == severity]
            if group:
                lines += ["", f"{title} ({len(group)})"]
            for code in dict.fromkeys(p.code for p in group):
                same = [p for p in group if p.code == code]
                lines.append(f"  {CODES.get(code, code)} [{code}] ({len(same)}): fix: {same[0].fix}")
                for p in same[:limit]:
                    where = (p.path or "(dataset)") + (f":{p.line}" if p.line else "")
                    lines.append(f"    {where}: {p.message}" + (f" (fix: {p.fix})" if p.fix != same[0].fix else ""))
                if len(same) > limit:
                    lines.append(f"    ... and {len(same) - limit} more (the JSON report lists every one)")
        return "\n".join(lines)


def _stat_lines(s: dict) -> list[tuple[str, str]]:
    im, cap, res, cache = s["images"], s["captions"], s["resolution"], s["latent_cache"]
    rows = [("images", f"{im['found']} found, {im['usable']} usable, {im['valid_pairs']} with a caption "
                       f"(valid pairs); {im['samples']} samples per epoch with repeats")]
    if cap["count"]:
        c, t = cap["chars"], cap["tokens"]
        rows.append(("captions", f"{cap['count']}: chars min {c['min']} / mean {c['mean']} / median {c['median']} / "
                                 f"max {c['max']}; tokens about {t['min']} / {t['mean']} / {t['median']} / {t['max']} "
                                 f"({cap['token_estimate']})"))
    if res["min_width"] is not None:
        rows.append(("resolution", f"width {res['min_width']}-{res['max_width']}, height {res['min_height']}-"
                                   f"{res['max_height']} px; {res['min_megapixels']}-{res['max_megapixels']} MP"))
    counts = s["buckets"]["counts"]
    shown = ", ".join(f"{k}: {v}" for k, v in list(counts.items())[:8])
    shown += f", ... {len(counts) - 8} more" if len(counts) > 8 else ""
    rows.append((f"buckets @{s['buckets']['resolution']}", shown or "none"))
    images, texts = _human(cache["image_latent_bytes"]), _human(cache["text_embedding_bytes"])
    rows.append(("latent cache", f"about {cache['total_human']} for {cache['model_variant']} in bf16: image latents "
                                 f"{images} ({cache['images']} images) + text embeddings {texts} ({cache['captions']} "
                                 f"captions incl. the empty one, x {TEXT_TOKENS} tokens "
                                 f"x {cache['joint_attention_dim']})"))
    return rows


@dataclass
class _Checked:
    """One item's results from a worker thread."""

    info: ImageInfo | None = None
    digest: str | None = None
    image_error: ImageError | None = None
    caption: tuple[str, int] | None = None  # (text or its first CAPTION_PEEK_BYTES, size in bytes)
    caption_error: DatasetError | None = None


def _check(item) -> _Checked:
    out = _Checked()
    try:
        out.info = probe_image(item.image_path)
        out.digest = verify_image_file(item.image_path, out.info)
    except ImageError as exc:
        out.image_error = exc
    except Exception as exc:  # noqa: BLE001 — whatever is in the folder, report it instead of a traceback
        out.image_error = image_error(item.image_path, "unreadable_image", f"could not be checked ({exc!r})",
                                      "check the file")
    if item.caption_source is not None:
        try:
            out.caption = item.caption_source.peek(CAPTION_PEEK_BYTES)
        except DatasetError as exc:
            out.caption_error = exc
        except Exception as exc:  # noqa: BLE001
            out.caption_error = DatasetError(f"could not be read ({exc!r})")
    return out


def validate_dataset(source, *, strict: bool = False, min_images: int = 1, resolution: int = 1024,
                     caption_extensions=(".txt",), trigger_word: str = "", recursive: bool = True,
                     max_caption_tokens: int = 512, model_variant: str = "flux2-klein-4b") -> ValidationReport:
    """Check every image and caption; report every problem and the statistics.

    `source` is a Dataset (its own caption/trigger/recursive settings are used) or a folder path.
    Raises DatasetError only when there is no folder to check, ConfigError for bad arguments.
    """
    joint_dim = _joint_attention_dim(model_variant)
    buckets = make_buckets(resolution)
    if isinstance(source, Dataset):
        dataset = source
    else:
        dataset = scan_dataset(source, caption_extensions=caption_extensions, trigger_word=trigger_word,
                               recursive=recursive)
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        checked = list(pool.map(_check, dataset.items))
    tally = _Tally(dataset, max_caption_tokens)
    for item, result in zip(dataset.items, checked):
        tally.add_item(item, result)
    problems = tally.finish(min_images)
    if strict:
        problems = [replace(p, severity="error") for p in problems]
    rank = {code: i for i, code in enumerate(CODES)}
    problems.sort(key=lambda p: (p.severity != "error", rank.get(p.code, len(rank)), p.code, p.path or "", p.line or 0))
    stats = _stats(dataset, tally, resolution, buckets, model_variant, joint_dim)
    return ValidationReport(dataset.root, problems, stats, bool(strict))


class _Tally:
    """Turns the workers' results into problems and the numbers the statistics need."""

    def __init__(self, dataset: Dataset, max_caption_tokens: int):
        self.dataset, self.max_tokens = dataset, max_caption_tokens
        self.problems = [Problem(n.severity, n.code, _shown(n.path) if n.path else None, n.message, n.fix, n.line)
                         for n in dataset.notes]
        self.usable: list[ImageInfo] = []
        self.digests: dict[str, list[str]] = {}
        self.chars: list[int] = []
        self.tokens: list[int] = []
        self.valid_pairs = 0

    def add(self, severity, code, path, message, fix, line=None):
        self.problems.append(Problem(severity, code, path, message, fix, line))

    def add_item(self, item, c: _Checked) -> None:
        rel = _shown(_relative(item.image_path, self.dataset.root))
        ok = self._image(rel, c)
        if ok:
            self.usable.append(c.info)
        source = item.caption_source
        if source is None:
            if ok:  # an unusable image needs no caption report on top
                names = " / ".join(Path(rel).stem + e for e in self.dataset.caption_extensions)
                trigger = item.trigger_word.strip()
                alone = f"the trigger word {trigger!r} alone" if trigger else "an empty caption"
                self.add("warning", "missing_caption", rel, f"no caption (no {names} file, no metadata line)",
                         f"write a caption file next to it (or a metadata.jsonl line); until then it trains on {alone}")
            return
        where = _shown(_relative(source.path, self.dataset.root))
        if c.caption_error is not None:
            exc = c.caption_error
            self.add("error", getattr(exc, "code", "unreadable_caption"), where,
                     f"caption for {rel} {getattr(exc, 'detail', exc)}",
                     getattr(exc, "fix", "make it a readable UTF-8 text file"), source.line)
            return
        text, n_bytes = c.caption
        final = with_trigger(item.trigger_word, text)
        final_bytes = n_bytes + len(final.encode("utf-8", "replace")) - len(text.encode("utf-8", "replace"))
        n_tokens = math.ceil(final_bytes / BYTES_PER_TOKEN)
        self.chars.append(len(final) if n_bytes <= CAPTION_PEEK_BYTES else final_bytes)
        self.tokens.append(n_tokens)
        if not text.strip():
            self.add("warning", "empty_caption", where, f"caption for {rel} is empty",
                     "write a caption, or delete it to make the missing caption explicit", source.line)
        elif ok:
            self.valid_pairs += 1
        if n_tokens > self.max_tokens:
            self.add("warning", "long_caption", where, f"caption for {rel} is about {n_tokens} tokens (UTF-8 bytes "
                     f"/ {BYTES_PER_TOKEN}), over max_caption_tokens={self.max_tokens}: the text encoder ignores the "
                     "rest", "shorten it to what the image shows", source.line)

    def _image(self, rel: str, c: _Checked) -> bool:
        """Report the image's own problems; True when it can be trained on."""
        if c.image_error is not None:
            exc = c.image_error
            self.add("error", getattr(exc, "code", "unreadable_image"), rel, getattr(exc, "detail", exc.reason),
                     getattr(exc, "fix", "check the file"))
            return False
        info, short = c.info, min(c.info.width, c.info.height)
        size = f"{info.width}x{info.height}"
        if info.n_frames > 1 and info.format != "MPO":  # MPO: a phone's extra pictures (depth, stereo)
            self.add("warning", "animated_image", rel, f"{info.format} with {info.n_frames} frames: only the first "
                     "is used", "save the frame you want as a still image")
        self.digests.setdefault(c.digest, []).append(rel)
        if short < MIN_SIDE:
            self.add("error", "too_small", rel, f"{size} is under {MIN_SIDE} px on the short side",
                     f"use images of at least {SMALL_SIDE} px (ideally the training resolution) or remove it")
            return False
        if short < SMALL_SIDE:
            self.add("warning", "small_image", rel, f"{size} is under {SMALL_SIDE} px on the short side: it will "
                     "be upscaled", "use a larger original if you have one")
        return True

    def finish(self, min_images: int) -> list[Problem]:
        for paths in self.digests.values():
            if len(paths) > 1:
                others = ", ".join(paths[1:6]) + (f" and {len(paths) - 6} more" if len(paths) > 6 else "")
                self.add("warning", "duplicate_image", paths[0], f"same bytes as {others}",
                         "keep one copy (duplicates weigh an image more without telling you)")
        if not self.dataset.items:
            where = "it or its sub-folders" if self.dataset.recursive else "it (recursive is off)"
            self.add("error", "no_images", None, f"no images found in {where}",
                     f"add {', '.join(sorted(IMAGE_EXTENSIONS))} images")
        elif len(self.usable) < min_images:
            self.add("error", "too_few_images", None, f"only {len(self.usable)} usable image(s), fewer than "
                     f"min_images={min_images}", "add images or fix the ones reported above")
        return self.problems


def _stats(dataset: Dataset, tally: _Tally, resolution, buckets, model_variant: str, joint_dim: int) -> dict:
    def summary(values):
        if not values:
            return {"min": None, "mean": None, "median": None, "max": None}
        return {"min": min(values), "mean": round(statistics.fmean(values), 1),
                "median": statistics.median(values), "max": max(values)}

    counts: dict[tuple[int, int], int] = {}
    latent_bytes, assigned = 0, {}  # real datasets repeat a few camera sizes: assign each size once
    usable = tally.usable
    for info in usable:
        size = (info.width, info.height)
        bucket = assigned[size] if size in assigned else assigned.setdefault(size, assign_bucket(*size, buckets))
        counts[bucket] = counts.get(bucket, 0) + 1
        latent_bytes += (bucket[0] // 16) * (bucket[1] // 16) * LATENT_CHANNELS * BF16_BYTES
    n_captions = len(usable) + 1  # one embedding per image, plus the empty caption (caption dropout)
    text_bytes = n_captions * TEXT_TOKENS * joint_dim * BF16_BYTES
    widths, heights = [i.width for i in usable], [i.height for i in usable]
    mps = [round(i.megapixels, 2) for i in usable]
    return {
        "images": {"found": len(dataset.items), "usable": len(usable), "valid_pairs": tally.valid_pairs,
                   "captioned": sum(1 for item in dataset.items if item.caption_source is not None),
                   "samples": dataset.num_samples},
        "captions": {"count": len(tally.chars), "chars": summary(tally.chars), "tokens": summary(tally.tokens),
                     "token_estimate": f"UTF-8 bytes / {BYTES_PER_TOKEN}"},
        "resolution": {"min_width": min(widths, default=None), "max_width": max(widths, default=None),
                       "min_height": min(heights, default=None), "max_height": max(heights, default=None),
                       "min_megapixels": min(mps, default=None), "max_megapixels": max(mps, default=None)},
        "buckets": {"resolution": resolution, "counts": {f"{w}x{h}": n for (w, h), n in sorted(
            counts.items(), key=lambda kv: (-kv[1], kv[0]))}},
        "latent_cache": {"model_variant": model_variant, "joint_attention_dim": joint_dim, "images": len(usable),
                         "captions": n_captions, "image_latent_bytes": latent_bytes, "text_embedding_bytes": text_bytes,
                         "total_bytes": latent_bytes + text_bytes, "total_human": _human(latent_bytes + text_bytes)},
    }


def _joint_attention_dim(model_variant: str) -> int:
    if model_variant not in SHIPPED:
        raise ConfigError([("model_variant", f"{model_variant!r} is not one of {', '.join(sorted(SHIPPED))}")])
    return int(shipped_config(model_variant, "transformer")["joint_attention_dim"])


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return ""


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _shown(text: str) -> str:
    """Names that are not valid UTF-8 (kept by Python as surrogate escapes) shown as \\xNN, printable and JSON-safe."""
    return os.fsencode(text).decode("utf-8", "backslashreplace") if text else text
