"""Check a dataset before any GPU time is spent: every problem at once, with statistics.

Images are checked from their headers and one streamed read (SHA-256 for duplicates + end-marker
check for truncation), never fully decoded, on a few threads. Nothing in the folder can make this
raise: unreadable files, links, FIFOs and odd names become problems in the report.

What the report means for training (which images are skipped, when the dataset is refused) is one rule in
report.py, shared by validate, cache and train. Caption lengths are counted with the model's tokenizer
when one is given (what the text encoder will see), else estimated from the UTF-8 size.
"""

from __future__ import annotations

import math
import os
import statistics
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import ConfigError, DatasetError, ImageError
from ..models import SHIPPED, shipped_config
from .buckets import assign_bucket, make_buckets
from .dataset import IMAGE_EXTENSIONS, Dataset, scan_dataset, with_trigger
from .images import ImageInfo, image_error, probe_image, verify_image_file
from .report import CODES, TEXT_TOKENS, Problem, ValidationReport, human_size, printable, shown_path, skipped_images

# Short side below MIN_SIDE: error; below SMALL_SIDE: warning. Both are capped at the training resolution: an
# image as large as what it trains at is fine (the tiny models' tests train 64 px images at 64 px).
MIN_SIDE, SMALL_SIDE = 256, 512
CAPTION_PEEK_BYTES = 64 * 1024  # captions are read this far; longer ones are sized by their byte count
BYTES_PER_TOKEN = 4  # without a tokenizer: UTF-8 bytes / 4 (about right for English; CJK is undercounted ~2x)
CROP_WARNING = 0.10  # a reference that loses more than this share of its area to the crop to its image's shape
# Above LONG_CAPTION_TOKENS a caption gets a warning saying what its conditioning mode does with the rest (the
# prompt length both programs pad to: cache/encoding.py MAX_SEQUENCE_LENGTH); above max_caption_tokens it is an
# error and the image is skipped: the text encoder's attention grows with the square of the length, so a pasted
# 25,000-token document costs as much as thousands of ordinary captions (and would not fit a training batch).
LONG_CAPTION_TOKENS, MAX_CAPTION_TOKENS = 512, 4096  # MAX_CAPTION_TOKENS: the default of data.max_caption_tokens
BEYOND_512 = {  # what each model.text_conditioning does with a prompt's tokens past 512 (cache/encoding.py)
    "comfyui": "encoded whole, as ComfyUI encodes long prompts (nothing is cut); it costs more to encode and to "
               "train on, and cannot share a batch with shorter captions (train.batch_size above 1)",
    "diffusers": "diffusers' encoding keeps the first 512 tokens of the prompt (its template included) and "
                 "cuts the rest off: the model never sees the end of this caption",
}
CONDITIONING = tuple(BEYOND_512)
LATENT_CHANNELS, BF16_BYTES = 128, 2  # cache layout, see FLUX2_FACTS.md
# Threads: hashlib and file reads release the GIL, the JPEG marker regex and Pillow's header parsing do
# not, so on a warm page cache threads beyond the cores buy nothing (2 cores, 1000 JPEGs: 1 thread 0.53 s,
# 2 threads 0.50 s, 4 threads 0.58 s); at least 2 still hide disk latency on cold or network folders.
WORKERS = max(2, min(8, os.cpu_count() or 1))
@dataclass
class _Checked:
    """One item's results from a worker thread."""

    info: ImageInfo | None = None
    digest: str | None = None
    image_error: ImageError | None = None
    caption: tuple[str, int] | None = None  # (text or its first CAPTION_PEEK_BYTES, size in bytes)
    caption_error: DatasetError | None = None


def _check_image(path) -> _Checked:
    out = _Checked()
    try:
        out.info = probe_image(path)
        out.digest = verify_image_file(path, out.info)
    except ImageError as exc:
        out.image_error = exc
    except Exception as exc:  # noqa: BLE001 — whatever is in the folder, report it instead of a traceback
        out.image_error = image_error(path, "unreadable_image", f"could not be checked ({exc!r})", "check the file")
    return out


def _check(item) -> _Checked:
    out = _check_image(item.image_path)
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
                     max_caption_tokens: int = MAX_CAPTION_TOKENS, model_variant: str = "flux2-klein-4b",
                     tokenizer=None, text_conditioning: str = "comfyui", references: bool = True) -> ValidationReport:
    """Check every image, reference image and caption; report every problem and the statistics.

    `source` is a Dataset (its own caption/trigger/recursive/references settings are used) or a folder path.
    A reference image is checked as an image is; one with an error makes its target unusable (skipped).
    `tokenizer` (the model's) counts caption tokens; without one they are estimated. `text_conditioning`
    (model.text_conditioning) decides what the long-caption warning says happens past 512 tokens.
    Raises DatasetError only when there is no folder to check, ConfigError for bad arguments.
    """
    if text_conditioning not in CONDITIONING:
        raise ConfigError([("model.text_conditioning", f"{text_conditioning!r} is not one of comfyui, diffusers")])
    if isinstance(max_caption_tokens, bool) or not isinstance(max_caption_tokens, int) or max_caption_tokens < 1:
        raise ConfigError([("max_caption_tokens", f"{max_caption_tokens!r} is not a whole number of at least 1")])
    joint_dim = _joint_attention_dim(model_variant)
    buckets = make_buckets(resolution)
    if isinstance(source, Dataset):
        dataset = source
    else:
        dataset = scan_dataset(source, caption_extensions=caption_extensions, trigger_word=trigger_word,
                               recursive=recursive, references=references)
    refs = list(dict.fromkeys(ref for item in dataset.items for ref in item.references))  # one check per file
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        checked = list(pool.map(_check, dataset.items))
        ref_checked = dict(zip(refs, pool.map(_check_image, refs)))
    tally = _Tally(dataset, max_caption_tokens, text_conditioning, resolution)
    for item, result in zip(dataset.items, checked):
        tally.add_item(item, result, ref_checked)
    tally.count_tokens(tokenizer)
    problems = tally.finish(min_images)
    if strict:
        problems = [replace(p, severity="error") for p in problems]
    rank = {code: i for i, code in enumerate(CODES)}
    problems.sort(key=lambda p: (p.severity != "error", rank.get(p.code, len(rank)), p.code, p.path or "", p.line or 0))
    stats = _stats(dataset, tally, resolution, buckets, model_variant, joint_dim)
    stats["captions"]["token_estimate"] = "counted with the model's tokenizer" if tokenizer is not None else \
        f"estimated as UTF-8 bytes / {BYTES_PER_TOKEN}"
    return ValidationReport(dataset.root, problems, stats, bool(strict))


class _Tally:
    """Turns the workers' results into problems and the numbers the statistics need."""

    def __init__(self, dataset: Dataset, max_caption_tokens: int, text_conditioning: str, resolution: int):
        self.dataset, self.max_tokens, self.mode = dataset, max_caption_tokens, text_conditioning
        self.min_side, self.small_side = min(MIN_SIDE, resolution), min(SMALL_SIDE, resolution)
        self.problems = [Problem(n.severity, n.code, printable(n.path) if n.path else None, n.message, n.fix, n.line)
                         for n in dataset.notes]
        self.usable: list[tuple[str, ImageInfo]] = []  # images whose own file is fine; finish() drops skipped ones
        self.n_references: dict[str, int] = {}  # image -> its number of reference images (for the cache size)
        self.paired: set[str] = set()  # of those, the ones with a non-empty caption
        self.digests: dict[str, list[str]] = {}
        self.captions: list[_Caption] = []
        self.chars: list[int] = []
        self.tokens: list[int] = []
        self.valid_pairs = 0

    def add(self, severity, code, path, message, fix, line=None, image=None):
        self.problems.append(Problem(severity, code, path, message, fix, line, image))

    def add_item(self, item, c: _Checked, ref_checked: dict) -> None:
        rel = shown_path(item.image_path, self.dataset.root)
        ok = self._image(rel, c)
        ok = self._references(rel, item.references, ref_checked, c.info) and ok
        if ok:
            self.usable.append((rel, c.info))
            self.n_references[rel] = len(item.references)
        source = item.caption_source
        if source is None:
            if ok:  # an unusable image needs no caption report on top
                names = " / ".join(Path(rel).stem + e for e in self.dataset.caption_extensions)
                trigger = item.trigger_word.strip()
                alone = f"the trigger word {trigger!r} alone" if trigger else "an empty caption"
                self.add("warning", "missing_caption", rel, f"no caption (no {names} file, no metadata line)",
                         f"write a caption file next to it (or a metadata.jsonl line); until then it trains on {alone}",
                         image=rel)
            return
        where = shown_path(source.path, self.dataset.root)
        if c.caption_error is not None:
            exc = c.caption_error
            self.add("error", getattr(exc, "code", "unreadable_caption"), where,
                     f"caption for {rel} {getattr(exc, 'detail', exc)}",
                     getattr(exc, "fix", "make it a readable UTF-8 text file"), source.line, rel)
            return
        text, n_bytes = c.caption
        final = with_trigger(item.trigger_word, text)
        final_bytes = n_bytes + len(final.encode("utf-8", "replace")) - len(text.encode("utf-8", "replace"))
        self.chars.append(len(final) if n_bytes <= CAPTION_PEEK_BYTES else final_bytes)
        self.captions.append(_Caption(rel, where, source.line, final, final_bytes))
        if not text.strip():
            self.add("warning", "empty_caption", where, f"caption for {rel} is empty",
                     "write a caption, or delete it to make the missing caption explicit", source.line, rel)
        elif ok:
            self.paired.add(rel)

    def count_tokens(self, tokenizer) -> None:
        """Every caption's length in tokens, and the long-caption problems (see LONG_CAPTION_TOKENS)."""
        self.tokens = _token_counts(self.captions, tokenizer)
        how = "" if tokenizer is not None else f" (estimated: UTF-8 bytes / {BYTES_PER_TOKEN})"
        for cap, n in zip(self.captions, self.tokens):
            if n > self.max_tokens:
                self.add("error", "caption_too_long", cap.where, f"caption for {cap.image} is {n} tokens{how}, over "
                         f"max_caption_tokens={self.max_tokens}: the image is skipped (the text encoder's work grows "
                         "with the square of a caption's length)",
                         "shorten it to what the image shows, or raise max_caption_tokens", cap.line, cap.image)
            elif n > LONG_CAPTION_TOKENS:
                self.add("warning", "long_caption", cap.where, f"caption for {cap.image} is {n} tokens{how}, over "
                         f"{LONG_CAPTION_TOKENS}: {BEYOND_512[self.mode]}", "shorten it to what the image shows",
                         cap.line, cap.image)

    def _image(self, rel: str, c: _Checked) -> bool:
        """Report the image's own problems; True when it can be trained on."""
        if c.image_error is not None:
            exc = c.image_error
            self.add("error", getattr(exc, "code", "unreadable_image"), rel, getattr(exc, "detail", exc.reason),
                     getattr(exc, "fix", "check the file"), image=rel)
            return False
        info, short = c.info, min(c.info.width, c.info.height)
        size = f"{info.width}x{info.height}"
        if info.n_frames > 1 and info.format != "MPO":  # MPO: a phone's extra pictures (depth, stereo)
            self.add("warning", "animated_image", rel, f"{info.format} with {info.n_frames} frames: only the first "
                     "is used", "save the frame you want as a still image", image=rel)
        self.digests.setdefault(c.digest, []).append(rel)
        if short < self.min_side:
            self.add("error", "too_small", rel, f"{size} is under {self.min_side} px on the short side",
                     f"use images of at least {self.small_side} px (ideally the training resolution) or remove it",
                     image=rel)
            return False
        if short < self.small_side:
            self.add("warning", "small_image", rel, f"{size} is under {self.small_side} px on the short side: it will "
                     "be upscaled", "use a larger original if you have one", image=rel)
        return True

    def _references(self, rel: str, references, checked: dict, target) -> bool:
        """Report the image's reference images that cannot be used (each rules the image out); True if none. One
        whose shape differs from its target's is noted: training crops it to the target's bucket, and what the crop
        cuts off the LoRA never sees."""
        ok = True
        for ref in references:
            c = checked[ref]
            if c.image_error is None and target is not None:
                ratios = (c.info.width / c.info.height, target.width / target.height)
                lost = 1 - min(ratios) / max(ratios)
                if lost > CROP_WARNING:
                    self.add("warning", "reference_cropped", rel, f"reference {shown_path(ref, self.dataset.root)} "
                             f"is {c.info.width}x{c.info.height}, its image {target.width}x{target.height}: fitted to "
                             f"the image's shape, {lost:.0%} of it is cropped away",
                             "crop or pad the reference to its image's aspect ratio", image=rel)
            if c.image_error is not None:
                exc = c.image_error
                detail, fix = getattr(exc, "detail", exc.reason), getattr(exc, "fix", "check the file")
            elif min(c.info.width, c.info.height) < self.min_side:
                detail = f"{c.info.width}x{c.info.height} is under {self.min_side} px on the short side"
                fix = f"use a reference of at least {self.small_side} px"
            else:
                continue
            ok = False
            self.add("error", "bad_reference", rel, f"reference {shown_path(ref, self.dataset.root)}: {detail}",
                     f"{fix}, or remove that reference (the image is skipped until then)", image=rel)
        return ok

    def finish(self, min_images: int) -> list[Problem]:
        for paths in self.digests.values():
            if len(paths) > 1:
                others = ", ".join(paths[1:6]) + (f" and {len(paths) - 6} more" if len(paths) > 6 else "")
                self.add("warning", "duplicate_image", paths[0], f"same bytes as {others}",
                         "keep one copy (duplicates weigh an image more without telling you)", image=paths[0])
        items = self.dataset.items
        lacking = [shown_path(item.image_path, self.dataset.root) for item in items if not item.references]
        if lacking and len(lacking) < len(items):
            named = ", ".join(lacking[:3]) + (", ..." if len(lacking) > 3 else "")
            verb = "has" if len(lacking) == 1 else "have"
            self.add("warning", "mixed_references", None, f"{len(lacking)} of {len(items)} images {verb} no reference "
                     f"image ({named}): an edit LoRA learns best when every target has its reference(s)",
                     "add their references (a_ref.png beside a.png, or references/a.png), or train them apart")
        skipped = skipped_images(self.problems)  # before strict: what a lenient run would train on
        self.usable = [(rel, info) for rel, info in self.usable if rel not in skipped]
        self.valid_pairs = sum(rel in self.paired for rel, _ in self.usable)
        if not self.dataset.items:
            where = "it or its sub-folders" if self.dataset.recursive else "it (recursive is off)"
            self.add("error", "no_images", None, f"no images found in {where}",
                     f"add {', '.join(sorted(IMAGE_EXTENSIONS))} images")
        elif len(self.usable) < min_images:
            left = f" once the {len(skipped)} with errors are skipped" if skipped else ""
            self.add("error", "too_few_images", None, f"only {len(self.usable)} usable image(s){left}, fewer than "
                     f"min_images={min_images}", "add images or fix the ones reported above")
        return self.problems


@dataclass(frozen=True)
class _Caption:
    image: str  # the image it belongs to, as shown
    where: str  # the caption file (or metadata.jsonl), as shown
    line: int | None
    text: str  # as trained on (trigger word included); only the first CAPTION_PEEK_BYTES of a longer file
    n_bytes: int  # the whole caption's size in UTF-8 bytes


def _token_counts(captions: list[_Caption], tokenizer) -> list[int]:
    """Tokens per caption: the tokenizer's count (the caption alone, without the prompt template), scaled up
    for a caption read only in part; without a tokenizer, UTF-8 bytes / BYTES_PER_TOKEN."""
    if tokenizer is None or not captions:
        return [math.ceil(c.n_bytes / BYTES_PER_TOKEN) for c in captions]
    # One batched call (fast tokenizers run it in parallel); verbose=False: a caption longer than the model's
    # nominal context is what the report is about, not a warning for the log.
    ids = tokenizer([c.text for c in captions], add_special_tokens=False, verbose=False)["input_ids"]
    counts = []
    for c, row in zip(captions, ids):
        read = len(c.text.encode("utf-8", "replace"))
        counts.append(len(row) if read >= c.n_bytes or not read else math.ceil(len(row) * c.n_bytes / read))
    return counts


def _stats(dataset: Dataset, tally: _Tally, resolution, buckets, model_variant: str, joint_dim: int) -> dict:
    def summary(values):
        if not values:
            return {"min": None, "mean": None, "median": None, "max": None}
        return {"min": min(values), "mean": round(statistics.fmean(values), 1),
                "median": statistics.median(values), "max": max(values)}

    counts: dict[tuple[int, int], int] = {}
    latent_bytes, assigned = 0, {}  # real datasets repeat a few camera sizes: assign each size once
    usable = [info for _, info in tally.usable]
    n_refs = sum(tally.n_references[rel] for rel, _ in tally.usable)  # each encoded at its target's bucket
    for rel, info in tally.usable:
        size = (info.width, info.height)
        bucket = assigned[size] if size in assigned else assigned.setdefault(size, assign_bucket(*size, buckets))
        counts[bucket] = counts.get(bucket, 0) + 1
        latent_bytes += (bucket[0] // 16) * (bucket[1] // 16) * LATENT_CHANNELS * BF16_BYTES * (
            1 + tally.n_references[rel])
    n_captions = len(usable) + 1  # one embedding per image, plus the empty caption (caption dropout)
    text_bytes = n_captions * TEXT_TOKENS * joint_dim * BF16_BYTES
    widths, heights = [i.width for i in usable], [i.height for i in usable]
    mps = [round(i.megapixels, 2) for i in usable]
    return {
        "images": {"found": len(dataset.items), "usable": len(usable), "valid_pairs": tally.valid_pairs,
                   "captioned": sum(1 for item in dataset.items if item.caption_source is not None),
                   "samples": dataset.num_samples,
                   "with_references": sum(1 for item in dataset.items if item.references),
                   "references": len({ref for item in dataset.items for ref in item.references})},
        "captions": {"count": len(tally.chars), "chars": summary(tally.chars), "tokens": summary(tally.tokens)},
        "resolution": {"min_width": min(widths, default=None), "max_width": max(widths, default=None),
                       "min_height": min(heights, default=None), "max_height": max(heights, default=None),
                       "min_megapixels": min(mps, default=None), "max_megapixels": max(mps, default=None)},
        "buckets": {"resolution": resolution, "counts": {f"{w}x{h}": n for (w, h), n in sorted(
            counts.items(), key=lambda kv: (-kv[1], kv[0]))}},
        "latent_cache": {"model_variant": model_variant, "joint_attention_dim": joint_dim, "images": len(usable),
                         "references": n_refs,
                         "captions": n_captions, "image_latent_bytes": latent_bytes, "text_embedding_bytes": text_bytes,
                         "total_bytes": latent_bytes + text_bytes, "total_human": human_size(latent_bytes + text_bytes)},
    }


def _joint_attention_dim(model_variant: str) -> int:
    if model_variant not in SHIPPED:
        raise ConfigError([("model_variant", f"{model_variant!r} is not one of {', '.join(sorted(SHIPPED))}")])
    return int(shipped_config(model_variant, "transformer")["joint_attention_dim"])
