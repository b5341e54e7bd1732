"""`flux2-lora`: the engine's command line.

Exit codes are a contract that scripts rely on: 0 success, 1 the input is unusable (a clear
message on stderr, never a traceback), 2 bad usage (argparse's own convention), 130 / 143 stopped
by SIGINT (Ctrl+C) / SIGTERM, with the work done so far kept (checkpoint, latent cache). Heavy modules
are imported inside the command that needs them so `flux2-lora --help` and `validate` start fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from . import __version__
from .errors import ConfigError, Flux2LoraError
from .terminal import ProgressBars, StopOnSignal, TrainingBar, command_name, interrupted_exit, report_training

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
    from .data import normalise_caption_extensions  # here: captions imports PIL and numpy, --help needs neither

    try:
        return normalise_caption_extensions(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(exc.problems[0][1]) from None


def cmd_validate(args: argparse.Namespace) -> int:
    """The rule cache and train apply (data/report.py), on the same keys: the flags, else --config's data.* and
    model.*; the model's tokenizer, when one is named, counts caption tokens."""
    from .config import load_config
    from .data import validate_data

    if not (args.path or args.config):
        args.parser.error("give the dataset folder, or --config FILE with data.path")
    flags = {"data.path": args.path, "data.strict": args.strict, "data.min_images": args.min_images,
             "data.max_caption_tokens": args.max_caption_tokens, "data.caption_extensions": args.caption_ext,
             "data.resolution": args.resolution and [args.resolution], "data.trigger_word": args.trigger_word,
             "data.recursive": args.recursive, "data.references": args.references, "model.path": args.model,
             "model.variant": args.model_variant,
             "model.text_conditioning": args.text_conditioning}
    config = load_config(args.config).replace({key: value for key, value in flags.items() if value is not None})
    tokenizer = None
    if config.model.path:  # loads the tokenizer alone (torch and transformers are imported only here)
        from .cache import open_encoders

        tokenizer = open_encoders(config.model).tokenizer()
    variant = config.model.variant if config.model.variant != "auto" else "flux2-klein-4b"
    report = validate_data(config.data, tokenizer=tokenizer, text_conditioning=config.model.text_conditioning,
                           model_variant=variant)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    else:
        print(report.format_text())
    return EXIT_OK if report.usable else EXIT_UNUSABLE


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from .models import write_tiny_model

    out = Path(args.out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise Flux2LoraError(f"{out} already exists and is not an empty folder: choose a new OUT_DIR "
                             "(tiny-model never writes over existing files)")
    written = write_tiny_model(out, variant=args.variant, fmt=args.format, seed=args.seed)
    print(f"wrote a tiny random FLUX.2 [{args.variant}] model ({args.format} format) to {out}:")
    for path in written:
        print(f"  {path}")
    return EXIT_OK


def cmd_cache(args: argparse.Namespace) -> int:
    from .cache import cache_for_config
    from .config import check_paths, load_config
    from .preflight import cache_dir_problems

    config = load_config(args.config, args.overrides,
                         check=lambda c: check_paths(c, needs=("model", "data")) + cache_dir_problems(c))
    from .models import choose_device
    from .training import Team, follower, join, leave

    ranks, _ = join(choose_device(config.model.device))   # under torchrun every rank encodes a share
    try:
        if follower():
            cache_for_config(config, team=Team(ranks))
            return EXIT_OK
        with ProgressBars() as progress:
            cache, _ = cache_for_config(config, progress=progress, team=Team(ranks) if ranks.many else None)
    finally:
        leave()
    print(f"cached {len(cache)} images of {config.data.path} in {cache.root}")
    print(cache.summary.format_text())
    return EXIT_OK


def _load(args: argparse.Namespace):
    """The config, with its keys and the training checks (paths, combinations) reported in one message."""
    from .config import PRESETS, load_config
    from .preflight import training_problems

    return load_config(args.config, args.overrides, base=PRESETS[args.preset] if args.preset else None,
                       check=training_problems)


def _run(start, desc: str) -> int:
    """Run `start(callbacks)` under the progress bar and the signal handlers; report; exit 0 or 128 + signal."""
    from .training import follower

    with StopOnSignal() as stop:
        bar = TrainingBar(desc, stop)
        try:
            result = start(bar)
        finally:
            bar.close()
    if not follower():   # under torchrun, rank 0 reports for every rank
        report_training(result)
    return stop.code


def cmd_train(args: argparse.Namespace) -> int:
    from .training import train

    config = _load(args)
    return _run(lambda callbacks: train(config, callbacks), "train")


def cmd_resume(args: argparse.Namespace) -> int:
    from .resume import resume

    return _run(lambda callbacks: resume(args.path, steps=args.steps, output=args.output,
                                         overrides=args.overrides, callbacks=callbacks), "resume")


def cmd_find_lr(args: argparse.Namespace) -> int:
    from .training import run_range_test

    config = _load(args)
    with StopOnSignal():
        bar = TrainingBar("find-lr")
        try:
            test, plot = run_range_test(config, min_lr=args.min_lr, max_lr=args.max_lr, steps=args.steps,
                                        callbacks=bar)
        finally:
            bar.close()
    if not test.losses:
        print(f"error: the range test recorded no loss ({test.stopped}): lower --min-lr", file=sys.stderr)
        return EXIT_UNUSABLE
    suggestion = test.suggestion()
    print(f"learning-rate range test: {len(test.losses)} steps from {test.lrs[0]:.2e} to {test.lrs[-1]:.2e}"
          f"{f' ({test.stopped})' if test.stopped else ''}; plot: {plot}")
    print(f"suggested train.lr={suggestion:.2e}" if suggestion else
          "no suggestion: the loss never fell clearly; widen --min-lr/--max-lr or add --steps")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from .lora_files import export_lora

    out = export_lora(args.source, fmt=args.format, out=args.out)
    print(f"wrote {args.format} LoRA {out}")   # the one line: the engine logs the write at debug level only
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    import shlex
    import shutil

    from .demo import run_demo

    code = _run(lambda callbacks: run_demo(args.output, steps=args.steps, callbacks=callbacks,
                                           overrides=args.overrides), "demo")
    print("the first samples show the model before training, the last after; load the LoRA in ComfyUI with any "
          "LoRA loader, or in diffusers with pipe.load_lora_weights")
    command = command_name()
    if command != "flux2-lora" and not shutil.which("flux2-lora"):   # scripts/demo.sh runs the venv's copy
        activate = Path(sys.prefix, "bin", "activate")
        print(f"flux2-lora is not on your PATH: run it as {command}" + (
            f", or first `source {shlex.quote(str(activate))}` to use the bare name in this shell"
            if activate.is_file() else ""))
    return code


def cmd_plan(args: argparse.Namespace) -> int:
    from .training import SPEED_ORDER, format_plan, plan_for_variant

    name = args.variant if args.variant.startswith("flux2-") else f"flux2-{args.variant}"
    plan = plan_for_variant(name, args.resolution, batch_size=args.batch_size, rank=args.rank, vram_gib=args.vram,
                            optimizer=args.optimizer, references=args.references,
                            quantizations=(args.quantization,) if args.quantization else SPEED_ORDER)
    print(format_plan(plan))
    return EXIT_OK if args.vram is None or plan.best else EXIT_UNUSABLE


def _config_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="a YAML config file")
    p.add_argument("--preset", choices=["character", "style", "concept"],
                   help="starting settings for the kind of LoRA, under the file and the overrides")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="settings, applied after the file")


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be above 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flux2-lora", description="Train FLUX.2 LoRAs: validate a dataset, cache it, train, export; or try the demo.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="check a dataset folder and report every problem at once",
                       description="Check every image and caption in a dataset folder. Exit 0 when the dataset "
                                   "is usable: files with errors are named and skipped (cache and train skip the "
                                   "same ones), warnings are allowed; 1 when it is not (no images, fewer than "
                                   "--min-images left, a folder or metadata file unreadable, or any problem with "
                                   "--strict); 2 on bad usage. Settings not given come from --config (data.*, "
                                   "model.*), else the defaults.")
    p.add_argument("path", nargs="?", help="the dataset folder (default: data.path of --config)")
    p.add_argument("--config", metavar="FILE", help="a YAML config: its data.* and model.* keys, under these flags")
    p.add_argument("--json", action="store_true", help="print a machine-readable report")
    p.add_argument("--strict", action="store_true", default=None,
                   help="any problem, warnings included, makes the dataset unusable (data.strict)")
    p.add_argument("--min-images", type=positive_int, metavar="N",
                   help="fewest usable images once files with errors are skipped (data.min_images, default 1)")
    p.add_argument("--max-caption-tokens", type=positive_int, metavar="N",
                   help="a longer caption is an error and its image is skipped (data.max_caption_tokens, default "
                        "4096)")
    p.add_argument("--resolution", type=resolution, metavar="N",
                   help="training resolution for bucket and cache-size statistics (default 1024)")
    p.add_argument("--caption-ext", type=extensions, metavar="EXTS",
                   help="caption file extensions, comma-separated, first match wins (default txt)")
    p.add_argument("--trigger-word", help="prepended to every caption")
    p.add_argument("--no-recursive", dest="recursive", action="store_false", default=None,
                   help="do not scan sub-folders")
    p.add_argument("--no-references", dest="references", action="store_false", default=None,
                   help="check the targets without their reference images (data.references=false)")
    p.add_argument("--model", metavar="PATH", help="the model (model.path) whose tokenizer counts caption tokens; "
                                                   "without one they are estimated from the byte count")
    p.add_argument("--text-conditioning", choices=["comfyui", "diffusers"],
                   help="whose prompt encoding the long-caption warning describes (model.text_conditioning, "
                        "default comfyui)")
    p.add_argument("--model-variant", choices=["flux2-dev", "flux2-klein-4b", "flux2-klein-9b"],
                   help="model whose text-embedding size sizes the projected cache (default flux2-klein-4b)")
    p.set_defaults(func=cmd_validate, parser=p)

    p = sub.add_parser("cache", help="encode every image and caption once into the on-disk latent cache",
                       description="Build or update the latent cache for a dataset and model: unchanged items are "
                                   "reused, changed ones re-encoded, damaged shards rebuilt. Settings come from "
                                   "--config and/or key=value overrides (e.g. model.path=... data.path=... "
                                   "data.resolution=512,1024).")
    p.add_argument("--config", metavar="FILE", help="a YAML config file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="settings, applied after the file")
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("train", help="train a LoRA: cache, train, sample, save",
                       description="Train a FLUX.2 LoRA. Every setting is a dotted key (model.path, data.path, "
                                   "data.resolution, lora.rank, lora.alpha, train.steps, train.batch_size, train.lr, "
                                   "train.seed, sample.every, checkpoint.every, output.dir, output.name, ...), from "
                                   "--preset, then --config, then key=value overrides; every problem is reported "
                                   "at once.")
    _config_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("resume", help="continue a run from its newest intact checkpoint",
                       description="Continue training from a checkpoint folder, or from a run folder (its newest "
                                   "checkpoint that verifies; damaged ones are skipped and named). Goes on to the "
                                   "run's train.steps, or --steps N more. key=value overrides change settings; each "
                                   "change is reported.")
    p.add_argument("path", help="a checkpoint folder (checkpoints/step_N) or a run folder")
    p.add_argument("--steps", type=positive_int, metavar="N", help="train N more steps")
    p.add_argument("--output", metavar="DIR", help="continue into a new run folder under DIR (default: the same run)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="settings to change")
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("find-lr", help="learning-rate range test: loss against lr, with a suggestion",
                       description="Train briefly at exponentially growing learning rates and plot the loss "
                                   "(Leslie Smith's range test); suggests train.lr where the loss falls fastest.")
    _config_arguments(p)
    p.add_argument("--min-lr", type=positive_float, default=1e-7, metavar="LR")
    p.add_argument("--max-lr", type=positive_float, default=1e-2, metavar="LR")
    p.add_argument("--steps", type=positive_int, default=100, metavar="N")
    p.set_defaults(func=cmd_find_lr)

    p = sub.add_parser("export", help="convert a trained LoRA to ComfyUI, diffusers or kohya keys",
                       description="Write a LoRA (a .safetensors this tool wrote, or a run folder) in another key "
                                   "format. comfyui (default) loads in ComfyUI and diffusers alike.")
    p.add_argument("source", help="a LoRA .safetensors or a run folder")
    p.add_argument("--format", choices=["comfyui", "diffusers", "kohya"], default="comfyui")
    p.add_argument("--out", metavar="FILE", help="where to write (default: beside the source)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="train a LoRA on a tiny model and a generated dataset, offline (~1 min on CPU)",
                       description="The whole job with nothing downloaded: writes a tiny FLUX.2 [klein] model and a "
                                   "small dataset, trains a LoRA with before/after samples and curves, and prints "
                                   "where everything is.")
    p.add_argument("--output", default="flux2-lora-demo", metavar="DIR", help="(default ./flux2-lora-demo)")
    p.add_argument("--steps", type=positive_int, default=None, metavar="N", help="training steps (default 600)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="change any demo setting")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("plan", help="predict a training step's peak GPU memory per setting, and the fastest that fits",
                       description="Predict the peak memory of a training step from the model's config, for each "
                                   "base quantization (none/fp8/int8/nf4) with gradient checkpointing off and on, "
                                   "and name the fastest setting that fits --vram. The model was fitted to peaks "
                                   "measured on an H200 (bf16 base); quantized rows are not measured yet. Exit 1 "
                                   "when nothing fits.")
    p.add_argument("--variant", required=True, metavar="MODEL",
                   choices=["dev", "klein-4b", "klein-9b", "flux2-dev", "flux2-klein-4b", "flux2-klein-9b"],
                   help="dev, klein-4b or klein-9b")
    p.add_argument("--resolution", type=resolution, default=1024, metavar="N", help="image side in pixels (1024)")
    p.add_argument("--vram", type=positive_float, metavar="GIB", help="the GPU's memory, e.g. 24")
    p.add_argument("--quantization", choices=["none", "fp8", "int8", "nf4"], help="only this base quantization")
    p.add_argument("--batch-size", type=positive_int, default=1, metavar="N", help="train.batch_size (1)")
    p.add_argument("--rank", type=positive_int, default=16, metavar="N", help="lora.rank (16)")
    p.add_argument("--optimizer", choices=["adamw", "adamw8bit", "sgd"], default="adamw", help="train.optimizer")
    p.add_argument("--references", type=positive_int, default=0, metavar="N", help="edit LoRAs: references per target")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("tiny-model", help="write a tiny random-weight FLUX.2 model for tests and demos",
                       description="Build a seeded, randomly initialised, tiny FLUX.2 model offline and write it.")
    p.add_argument("out_dir", metavar="OUT_DIR", help="a new or empty folder")
    p.add_argument("--variant", choices=["klein", "dev"], default="klein")
    p.add_argument("--format", choices=["diffusers", "comfyui"], default="diffusers",
                   help="a diffusers pipeline folder, or ComfyUI-style single files (default diffusers)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tiny_model)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with key=value overrides allowed after options too (`resume RUN --steps 500 train.lr=5e-5`):
    argparse alone takes positionals only before the first option once a subcommand has consumed them."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.parse_args(argv)   # says what it does not recognise, as argparse does, and exits 2
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from .training import follower

    level = logging.DEBUG if args.verbose else logging.WARNING if follower() else logging.INFO   # rank 0 tells
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    try:
        with StopOnSignal():  # SIGTERM too ends in a message, not a silent kill; train's own handler nests inside
            return args.func(args)
    except Flux2LoraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    except OSError as exc:  # disk full, permission denied, ...: the user's environment, not a bug
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    except KeyboardInterrupt as exc:  # a cache build has kept what it encoded (and said so) before this
        return interrupted_exit(exc)
    except RuntimeError as exc:  # torch.OutOfMemoryError is one; anything else is a bug and keeps its traceback
        if "out of memory" not in str(exc).lower():
            raise
        print(f"error: out of memory ({str(exc).splitlines()[0]}): try train.gradient_checkpointing=true, a smaller "
              "train.batch_size or data.resolution, train.optimizer=adamw8bit, or an fp8 model file; "
              "`flux2-lora resume RUN_DIR` continues from the last checkpoint", file=sys.stderr)
        return EXIT_UNUSABLE


if __name__ == "__main__":
    sys.exit(main())
