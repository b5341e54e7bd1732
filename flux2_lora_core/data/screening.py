"""A dataset as training will use it: validated by the shared rule (report.py), the skipped images left out.

`flux2-lora validate`, the Validate Dataset node, `flux2-lora cache` / the Cache Latents node and training all call
`validate_dataset` (here through `validate_data`, with a config's data.* keys) and read its verdict and
`skipped_images`, so they agree on every file: nothing validate refuses is trained on, and nothing is skipped
without being named.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from ..errors import DatasetError
from .dataset import scan_dataset
from .report import shown_path, skip_summary
from .validation import validate_dataset

log = logging.getLogger(__name__)


def screen(dataset, report):
    """`dataset` without the images `report` skips (logging which); DatasetError carrying the report when the
    dataset is not usable. The report must be of this dataset."""
    if not report.usable:
        raise DatasetError(f"dataset {report.root} is not usable for training:\n{report.format_text()}\n"
                           "fix the errors above (every command uses the same rule: `flux2-lora validate` checks it)")
    skipped = report.skipped
    if not skipped:
        return dataset
    log.warning("dataset %s: %s", report.root, skip_summary(report))
    kept = tuple(item for item in dataset.items if shown_path(item.image_path, dataset.root) not in skipped)
    return replace(dataset, items=kept)


def validate_data(data, *, dataset=None, tokenizer=None, text_conditioning: str = "comfyui",
                  model_variant: str = "flux2-klein-4b"):
    """`validate_dataset` with the settings of a config's `data` section (min_images, strict, max_caption_tokens,
    the scan settings; statistics at the last data.resolution): what `flux2-lora validate`, the cache build and
    training run, so the same settings give the same verdict. `dataset`, when given, is the scan to check.
    `data` is read by attribute (a config.DataConfig): data sits below the configuration layer."""
    if dataset is None:
        dataset = scan_dataset(data.path, caption_extensions=data.caption_extensions, trigger_word=data.trigger_word,
                               repeats=data.repeats, recursive=data.recursive, confine_to=data.confine_to,
                               references=data.references)
    return validate_dataset(dataset, strict=data.strict, min_images=data.min_images, resolution=data.resolution[-1],
                            max_caption_tokens=data.max_caption_tokens, model_variant=model_variant,
                            tokenizer=tokenizer, text_conditioning=text_conditioning)
