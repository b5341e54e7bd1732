"""`flux2-lora`: the engine's command line.

Exit codes are a contract that scripts rely on: 0 success, 1 the input is unusable (a clear
message on stderr, never a traceback), 2 bad usage (argparse's own convention). Heavy modules
are imported inside the command that needs them so `flux2-lora --help` and `validate` start fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from . import __version__
from .captions import normalise_caption_extensions
from .errors import ConfigError, Flux2LoraError

logger = logging.getLogger("flux2_lora_core")

EXIT_OK, EXIT_UNUSABLE, EXIT_USAGE = 0, 1, 2


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def resolution(text: str) -> int:
    value = positive_int(text)
    if value % 16 or not 256 <= value <= 4096:
        raise argparse.ArgumentTypeError(f"{text!r} must be a multiple of 16 between 256 and 4096")
    return value


def extensions(text: str) -> tuple[str, ...]:
    try:
        return normalise_caption_extensions(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(exc.problems[0][1]) from None


def cmd_validate(args: argparse.Namespace) -> int:
    from .validation import validate_dataset

    report = validate_dataset(
        args.path, strict=args.strict, min_images=args.min_images, resolution=args.resolution,
        caption_extensions=args.caption_ext, trigger_word=args.trigger_word, recursive=args.recursive,
        model_variant=args.model_variant,
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    else:
        print(report.format_text())
    return EXIT_OK if report.usable else EXIT_UNUSABLE


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from .tiny_models import write_tiny_model

    out = Path(args.out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise Flux2LoraError(f"{out} already exists and is not an empty folder: choose a new OUT_DIR "
                             "(tiny-model never writes over existing files)")
    written = write_tiny_model(out, variant=args.variant, fmt=args.format, seed=args.seed)
    print(f"wrote a tiny random FLUX.2 [{args.variant}] model ({args.format} format) to {out}:")
    for path in written:
        print(f"  {path}")
    return EXIT_OK


class _ProgressBars:
    """The engine's progress(phase, done, total) callbacks as terminal bars with items/s and ETA."""

    def __init__(self):
        self.bars = {}

    def __call__(self, phase: str, done: int, total: int) -> None:
        from tqdm import tqdm

        bar = self.bars.get(phase)
        if bar is None:
            bar = self.bars[phase] = tqdm(total=total, desc=phase, unit="item", mininterval=0.5, file=sys.stderr)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for bar in self.bars.values():
            bar.close()


def cmd_cache(args: argparse.Namespace) -> int:
    from .config import check_paths, load_config
    from .dataset import load_dataset
    from .encoders import open_encoders
    from .latent_cache import CacheSettings, build_latent_cache

    config = load_config(args.config, args.overrides)
    problems = check_paths(config, needs=("model", "data"))
    if problems:
        raise ConfigError(problems)
    data = config.data
    dataset = load_dataset(data.path, caption_extensions=data.caption_extensions, trigger_word=data.trigger_word,
                           repeats=data.repeats, recursive=data.recursive)
    encoders = open_encoders(config.model)
    settings = CacheSettings(resolutions=data.resolution, buckets=data.buckets, max_aspect=data.max_aspect,
                             flip=data.flip, text_conditioning=config.model.text_conditioning)
    with _ProgressBars() as progress:
        cache = build_latent_cache(dataset, encoders, settings, cache_dir=config.cache.resolved_dir,
                                   batch_size=config.cache.batch_size, verify=config.cache.verify, progress=progress)
    print(f"cached {len(cache)} images of {dataset.root} in {cache.root}")
    print(cache.summary.format_text())
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flux2-lora", description="Train FLUX.2 LoRAs: validate datasets, build test models, and more.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="check a dataset folder and report every problem at once",
                       description="Check every image and caption in a dataset folder. Exit 0 when the dataset "
                                   "is usable (warnings allowed), 1 when it is not, 2 on bad usage.")
    p.add_argument("path", help="the dataset folder")
    p.add_argument("--json", action="store_true", help="print a machine-readable report")
    p.add_argument("--strict", action="store_true", help="treat warnings as errors")
    p.add_argument("--min-images", type=positive_int, default=1, metavar="N", help="fewest usable images (default 1)")
    p.add_argument("--resolution", type=resolution, default=1024, metavar="N",
                   help="training resolution for bucket and cache-size statistics (default 1024)")
    p.add_argument("--caption-ext", type=extensions, default=(".txt",), metavar="EXTS",
                   help="caption file extensions, comma-separated, first match wins (default txt)")
    p.add_argument("--trigger-word", default="", help="prepended to every caption")
    p.add_argument("--no-recursive", dest="recursive", action="store_false", help="do not scan sub-folders")
    p.add_argument("--model-variant", default="flux2-klein-4b",
                   choices=["flux2-dev", "flux2-klein-4b", "flux2-klein-9b"],
                   help="model whose text-embedding size sizes the projected cache (default flux2-klein-4b)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("cache", help="encode every image and caption once into the on-disk latent cache",
                       description="Build or update the latent cache for a dataset and model: unchanged items are "
                                   "reused, changed ones re-encoded, damaged shards rebuilt. Settings come from "
                                   "--config and/or key=value overrides (e.g. model.path=... data.path=... "
                                   "data.resolution=512,1024).")
    p.add_argument("--config", metavar="FILE", help="a YAML config file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="settings, applied after the file")
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("tiny-model", help="write a tiny random-weight FLUX.2 model for tests and demos",
                       description="Build a seeded, randomly initialised, tiny FLUX.2 model offline and write it.")
    p.add_argument("out_dir", metavar="OUT_DIR", help="a new or empty folder")
    p.add_argument("--variant", choices=["klein", "dev"], default="klein")
    p.add_argument("--format", choices=["diffusers", "comfyui"], default="diffusers",
                   help="a diffusers pipeline folder, or ComfyUI-style single files (default diffusers)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tiny_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except Flux2LoraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    except OSError as exc:  # disk full, permission denied, ...: the user's environment, not a bug
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
