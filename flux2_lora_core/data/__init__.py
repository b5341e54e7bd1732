"""Datasets as users keep them: folders, captions and metadata.jsonl read into a Dataset (paths, no pixels), images
decoded safely, every problem found by validation, aspect-ratio buckets, and the generated demo dataset.
Above models/ only: it reads a variant's config to size the projected cache."""

from ..exports import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "buckets": ("BatchStream", "assign_bucket", "fit_to_bucket", "make_buckets", "resolution_at"),
    "captions": ("normalise_caption_extensions",),
    "dataset": ("Dataset", "DatasetItem", "load_dataset"),
    "demo_data": ("TRIGGER", "write_demo_dataset"),
    "images": ("file_sha256", "load_image_rgb", "probe_image"),
    "report": ("Problem", "ValidationReport", "skip_summary", "skipped_images"),
    "screening": ("screen", "validate_data"),
    "validation": ("MAX_CAPTION_TOKENS", "validate_dataset"),
})
