"""The validation report: every problem found, the statistics, the verdict, and its text and JSON forms.

It also holds the one rule that reads it, shared by validate, cache and train (screening.py applies it to a
dataset). A dataset should not be refused for a few broken files among many good ones, and training must not
quietly go around them either. So validation reports every problem, and the rule decides from the report alone:
- an error about one image (the file is broken, empty, not an image, too small; its caption cannot be read,
  is not UTF-8 or is over `max_caption_tokens`; one of its reference images has such an error) skips that image
  (`skipped_images`), and every command names it (`skip_summary`);
- an error about the dataset as a whole refuses it (`refusals`): no images, fewer than `min_images` left, a
  folder or metadata file that cannot be read, a bad metadata line. Skipping a file cannot fix those, and a
  lost metadata line would silently take captions away;
- `strict` refuses the dataset on any problem, warnings included (validate's `--strict`, `data.strict`).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

TEXT_TOKENS = 512  # rows per cached caption embedding in the size projection (see FLUX2_FACTS.md)
GROUP_LIMIT = 10  # format_text lists this many problems per code; to_dict lists all
CODES = {  # code -> heading, in the order format_text shows them
    "no_images": "no images", "too_few_images": "too few usable images", "unreadable_folder": "unreadable folders",
    "empty_file": "empty files", "not_an_image": "not images", "unreadable_image": "unreadable images",
    "damaged_image": "damaged images", "truncated_image": "truncated images",
    "decompression_bomb": "images too large to open", "too_small": "images too small", "small_image": "small images",
    "bad_reference": "images with an unusable reference image",
    "metadata_invalid_line": "bad metadata lines", "metadata_bad_file_name": "metadata names outside the folder",
    "metadata_missing_file": "metadata names missing files", "metadata_not_image": "metadata names non-images",
    "metadata_bad_reference": "metadata references that cannot be used",
    "metadata_skipped_file": "metadata names images outside the dataset", "metadata_duplicate": "metadata duplicates",
    "unreadable_metadata": "unreadable metadata files", "caption_not_utf8": "captions not in UTF-8",
    "unreadable_caption": "unreadable captions", "metadata_changed": "metadata changed while checking",
    "caption_too_long": "captions over max_caption_tokens", "missing_caption": "images without a caption",
    "empty_caption": "empty captions", "long_caption": "long captions",
    "orphan_caption": "captions without an image", "orphan_reference": "reference images without a target",
    "mixed_references": "images without reference images among edit pairs",
    "reference_cropped": "reference images shaped unlike their image",
    "references_left_out": "reference images left out (references off)", "duplicate_image": "duplicate images",
    "link_outside": "links leading outside the allowed folders",
    "animated_image": "animated or multi-page images", "unsupported_image": "unsupported image formats",
    "large_repeats": "very large repeat counts", "folder_seen_twice": "folders reached twice",
}


SUMMARY_LIMIT = 20  # skipped images named one per line by skip_summary; the report lists every one


@dataclass(frozen=True)
class Problem:
    severity: str  # "error" | "warning"
    code: str  # a key of CODES
    path: str | None  # relative to the dataset root, POSIX separators; None for the dataset as a whole
    message: str
    fix: str
    line: int | None = None  # for metadata.jsonl problems
    # The dataset image this is about (the image itself, or the image whose caption `path` is or whose reference is
    # unusable): an error with one skips that image; None for the dataset as a whole, folders, metadata lines and
    # orphan captions.
    image: str | None = None


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
        """Trainable as it is, leaving out `skipped` (the rule: see the module docstring)."""
        return not refusals(self.problems, self.strict)

    @property
    def skipped(self) -> dict[str, list[Problem]]:
        """image -> the errors that make training skip it (nothing is skipped under strict: it refuses instead)."""
        return {} if self.strict else skipped_images(self.problems)

    def to_dict(self) -> dict:
        images = self.stats["images"]
        summary = {"errors": len(self.errors), "warnings": len(self.warnings), "strict": self.strict,
                   "images": images["found"], "usable_images": images["usable"], "valid_pairs": images["valid_pairs"],
                   "skipped_images": list(self.skipped)}
        return {"usable": self.usable, "root": printable(str(self.root)), "summary": summary, "stats": self.stats,
                "problems": [asdict(p) for p in self.problems]}

    def format_text(self, limit: int = GROUP_LIMIT) -> str:
        s, n_err, n_warn = self.stats, len(self.errors), len(self.warnings)
        verdict = "usable" if self.usable else "NOT USABLE"
        lines = [f"Dataset {printable(str(self.root))}: {verdict} ({n_err} error{'s' * (n_err != 1)}, "
                 f"{n_warn} warning{'s' * (n_warn != 1)}{'; strict: warnings count as errors' * self.strict})"]
        if not self.strict:
            lines.append(skip_summary(self))
        lines += ["", "Statistics"]
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
    if im.get("with_references"):
        rows.append(("references", f"{im['with_references']} of {im['found']} images have reference images "
                                   f"({im['references']} files): an edit dataset"))
    if cap["count"]:
        c, t = cap["chars"], cap["tokens"]
        rows.append(("captions", f"{cap['count']}: chars min {c['min']} / mean {c['mean']} / median {c['median']} / "
                                 f"max {c['max']}; tokens {t['min']} / {t['mean']} / {t['median']} / {t['max']} "
                                 f"({cap['token_estimate']})"))
    if res["min_width"] is not None:
        rows.append(("resolution", f"width {res['min_width']}-{res['max_width']}, height {res['min_height']}-"
                                   f"{res['max_height']} px; {res['min_megapixels']}-{res['max_megapixels']} MP"))
    counts = s["buckets"]["counts"]
    shown = ", ".join(f"{k}: {v}" for k, v in list(counts.items())[:8])
    shown += f", ... {len(counts) - 8} more" if len(counts) > 8 else ""
    rows.append((f"buckets @{s['buckets']['resolution']}", shown or "none"))
    images, texts = human_size(cache["image_latent_bytes"]), human_size(cache["text_embedding_bytes"])
    refs = f" and {cache['references']} references" if cache.get("references") else ""
    rows.append(("latent cache", f"about {cache['total_human']} for {cache['model_variant']} in bf16: image latents "
                                 f"{images} ({cache['images']} images{refs}) + text embeddings {texts} "
                                 f"({cache['captions']} captions incl. the empty one, x {TEXT_TOKENS} tokens "
                                 f"x {cache['joint_attention_dim']})"))
    return rows


# ---------------------------------------------------------------------------------------------- the rule
def skipped_images(problems) -> dict[str, list]:
    """image (relative path, as reports show it) -> the error-level problems that rule it out, in report order.

    `problems` are validation Problems; only errors that name a dataset image (`problem.image`) count: the
    image's own file, or its caption.
    """
    skipped: dict[str, list] = {}
    for p in problems:
        if p.severity == "error" and p.image is not None:
            skipped.setdefault(p.image, []).append(p)
    return skipped


def refusals(problems, strict: bool) -> list:
    """The problems that make a dataset unusable: with `strict` every error (warnings included, as strict turned
    them into errors), else the errors about the dataset as a whole (no image named)."""
    return [p for p in problems if p.severity == "error" and (strict or p.image is None)]


def skip_summary(report, limit: int = SUMMARY_LIMIT) -> str:
    """'usable: 20 of 26 images; these 6 will be skipped:' and one line per skipped image: what validate shows
    under its verdict and what cache and train log before they start."""
    images, skipped = report.stats["images"], report.skipped
    head = f"usable: {images['usable']} of {images['found']} images"
    if not skipped:
        return head
    verb = "will" if report.usable else "would"  # refused for something else (too few images left, ...)
    lines = [f"{head}; {'this one' if len(skipped) == 1 else f'these {len(skipped)}'} {verb} be skipped "
             "(fix them and they are used; strict refuses the dataset instead):"]
    for image, problems in list(skipped.items())[:limit]:
        lines.append(f"  {image}: {problems[0].message} [{problems[0].code}]")
    if len(skipped) > limit:
        lines.append(f"  ... and {len(skipped) - limit} more (`flux2-lora validate` lists every one)")
    return "\n".join(lines)


def human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return ""


def printable(text: str) -> str:
    """Names that are not valid UTF-8 (kept by Python as surrogate escapes) shown as \\xNN, printable and JSON-safe."""
    return os.fsencode(text).decode("utf-8", "backslashreplace") if text else text


def shown_path(path, root: Path) -> str:
    """A dataset file's path as reports name it (relative to the root, POSIX, non-UTF-8 bytes escaped)."""
    return printable(_relative(Path(path), root))


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)
