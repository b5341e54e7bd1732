"""One configuration for the CLI, the ComfyUI nodes and run.json.

Each option is declared once, on one line of a frozen dataclass: its default, its help and its
checks. Loading, `key=value` overrides, validation, `--help` text and run.json all read that line, so
a new option is one line and a new section (lora, train, ...) is one dataclass added as a field of
`Config`. This replaces a hand-written `if` per override (audit 3.3). Field names are also the node
input names and the CLI keys, so one error message fits all three.

Precedence, lowest first: the defaults, `base` (a preset, or a node's widget values), the YAML file, then the
overrides in order. Every problem in all of them is raised at once, as one ConfigError of (dotted key, message) pairs.

Paths stay strings: surrounding quotes and whitespace are stripped and `~` is expanded; a relative
path stays relative, so it means "from the current directory of the process that uses it". Whether a
path exists is checked where it is used, or up front with `check_paths`.

YAML is read with YAML 1.2 booleans: only true/false are bools, so `yes`, `no` and `on` stay strings
and are reported rather than silently turned into bools; `1e-4` is a float, as in YAML 1.2.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple, get_type_hints

from .config_schema import (_build, _merge, _parse_override, _plain, _read_yaml, _Section, _sections, _set, _type_name,
                            config_root, option)
from .errors import ConfigError
from .presets import PRESETS  # noqa: F401  (config.PRESETS, as before)


# ---------------------------------------------------------------------------------------------- checks
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def _device(value: str) -> str:
    if not _DEVICE.fullmatch(value.lower()):
        raise ValueError(f"{value!r} is not a device: use auto, cpu, cuda, cuda:N or mps")
    return value.lower()


def _caption_extensions(value: tuple[str, ...]) -> tuple[str, ...]:
    from .data import normalise_caption_extensions  # here: captions imports PIL, config stays light

    try:
        return normalise_caption_extensions(value)
    except ConfigError as exc:
        raise ValueError(exc.problems[0][1]) from None


MIN_RESOLUTION, MAX_RESOLUTION = 64, 4096


def _resolutions(values: tuple[int, ...]) -> tuple[int, ...]:
    if not values:
        raise ValueError("give at least one resolution, e.g. 1024")
    # 64 px is far too small for a real model but is what the tiny CPU models (tests, the demo) train at.
    bad = [v for v in values if v % 16 or not MIN_RESOLUTION <= v <= MAX_RESOLUTION]
    if bad:
        raise ValueError(f"{', '.join(map(repr, bad))}: each resolution must be a multiple of 16 between "
                         f"{MIN_RESOLUTION} and {MAX_RESOLUTION}")
    twice = sorted({v for v in values if values.count(v) > 1})
    if twice:
        raise ValueError(f"{', '.join(map(repr, twice))} listed twice: give each resolution once")
    return values


def _absolute_folders(values: tuple[str, ...]) -> tuple[str, ...]:
    values = tuple(os.path.expanduser(v) for v in values if v)
    relative = [v for v in values if not os.path.isabs(v)]
    if relative:
        raise ValueError(f"{', '.join(map(repr, relative))}: give absolute folders")
    return values


def _file_name(value: str) -> str:
    bad = sorted(set(value) & set('/\\:*?"<>|') | {c for c in value if ord(c) < 32})
    if not value or value.startswith(".") or bad or value.endswith(".") or value != value.strip():
        raise ValueError(f"{value!r} is not a valid file name: it names the run folder and the LoRA file, so it must "
                         "be non-empty, not start or end with '.' or a space, and have none of / \\ : * ? \" < > |")
    return value


# ---------------------------------------------------------------------------------------------- sections
VARIANTS = ("flux2-dev", "flux2-klein-4b", "flux2-klein-9b")
VARIANT_ALIASES = {"dev": "flux2-dev", "klein-4b": "flux2-klein-4b", "klein-9b": "flux2-klein-9b"}
DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32"}


@dataclass(frozen=True)
class ModelConfig(_Section):
    path: str = option("", "a FLUX.2 diffusers folder, or a transformer single file (ComfyUI diffusion_models)",
                       path=True)
    variant: str = option("auto", "auto (read from the weights) | flux2-dev | flux2-klein-4b | flux2-klein-9b",
                          choices=("auto", *VARIANTS), aliases=VARIANT_ALIASES)
    vae: str = option("", "VAE file or folder; empty: the vae/ of model.path", path=True)
    text_encoder: str = option("", "text encoder file or folder; empty: model.path's", path=True)
    tokenizer: str = option("", "tokenizer folder; empty: model.path's", path=True)
    dtype: str = option("auto", "auto | bf16 | fp16 | fp32", choices=("auto", "bf16", "fp16", "fp32"),
                        aliases=DTYPE_ALIASES)
    quantization: str = option("none", "none | fp8 | nf4 | int8: store the frozen transformer blocks quantized "
                               "(an fp8 file stays fp8 under none)", choices=("none", "fp8", "nf4", "int8"))
    blocks_to_swap: int = option(0, "keep the last N transformer blocks' frozen weights in (pinned) host memory and "
                                 "copy each in just before use, overlapping compute: less GPU memory, some speed; "
                                 "turns train.gradient_checkpointing on; 0: off", min=0)
    device: str = option("auto", "auto | cpu | cuda | cuda:N | mps", check=_device)
    text_encoder_quantization: str = option("none", "none | fp8 | int8 | nf4: store the text encoder's linears "
                                            "quantized while captions are cached (the 48 GB [dev] encoder: ~24 GB in "
                                            "fp8/int8, ~13 GB in nf4); re-encodes the captions; an fp8 file stays fp8 "
                                            "under none", choices=("none", "fp8", "int8", "nf4"))
    text_conditioning: str = option("comfyui", "comfyui | diffusers: whose prompt encoding the LoRA is trained on",
                                    choices=("comfyui", "diffusers"))
    distilled: str = option("auto", "auto | true | false: whether a [klein] base is the step-distilled checkpoint "
                            "(sampled in 4 steps without CFG; LoRAs train poorly on it); auto: from a diffusers "
                            "folder's model_index.json, else the file name (flux-2-klein-4b vs flux-2-klein-base-4b)",
                            choices=("auto", "true", "false"), aliases={"on": "true", "off": "false"})


def _fraction(value: float) -> float:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{value!r} must be at least 0 and below 1")
    return value


@dataclass(frozen=True)
class DataConfig(_Section):
    path: str = option("", "dataset folder (required by cache and train)", path=True)
    caption_extensions: tuple[str, ...] = option((".txt",), "caption file extensions, first match wins: 'txt,caption'",
                                                 check=_caption_extensions)
    trigger_word: str = option("", "prepended to every caption ('trigger, caption')")
    repeats: int = option(1, "times each image is seen per epoch", min=1)
    recursive: bool = option(True, "also read images in sub-folders")
    references: bool = option(True, "use reference images beside the targets (edit LoRAs)")
    resolution: tuple[int, ...] = option((1024,), "a resolution or a schedule [512, 1024] (each is cached); "
                                         "multiples of 16 in 64..4096", check=_resolutions)
    buckets: bool = option(True, "aspect-ratio buckets; false: centre square crops")
    max_aspect: float = option(4.0, "widest bucket's long/short side ratio", min=1)
    flip: bool = option(False, "random horizontal flips (both orientations are cached)")
    # The dataset rule validate, cache and train share (data/report.py): files with errors are skipped and named.
    min_images: int = option(1, "fewest usable images once files with errors are skipped; fewer stops validate, "
                             "cache and train", min=1)
    strict: bool = option(False, "any problem, warnings included, stops validate, cache and train instead of the "
                          "files with errors being skipped")
    max_caption_tokens: int = option(4096, "longest caption in the text encoder's tokens; a longer one is an error "
                                     "and its image is skipped (encoding cost grows with the square of the length; "
                                     "above 512 tokens 'comfyui' conditioning keeps every token, 'diffusers' cuts "
                                     "the rest)", min=1)
    confine_to: tuple[str, ...] = option((), f"read dataset files only inside these folders ('{os.pathsep}'-separated; "
                                         "links leading out are skipped); empty: anywhere", sep=os.pathsep,
                                         check=_absolute_folders)
    validation_split: float = option(0.0, "fraction of the images held out of training to measure a validation loss "
                                     "on (every train.validate_every steps; it then picks the best checkpoint); "
                                     "0: none", check=_fraction)
    validation_path: str = option("", "a folder of held-out images with captions (the dataset's layout) to measure "
                                  "the validation loss on, instead of data.validation_split", path=True)


@dataclass(frozen=True)
class CacheConfig(_Section):
    dir: str = option("", "latent cache folder; empty: $FLUX2_LORA_CACHE, else $XDG_CACHE_HOME/flux2-lora, "
                      "else ~/.cache/flux2-lora", path=True)
    batch_size: int = option(1, "images (and captions) per encoder call; 1 encodes each alone, as ComfyUI's "
                                "VAEEncode / CLIPTextEncode do, so cached latents equal ComfyUI's to ~1e-6; larger "
                                "batches can be faster on a GPU and round differently (up to 1e-4 measured)", min=1)
    verify: str = option("quick", "quick (sizes and headers) | full (SHA-256 of every shard)",
                         choices=("quick", "full"))
    text_encoder_offload: str = option("auto", "auto | none | layers: layers keeps the text encoder in host memory "
                                       "and runs one layer at a time on the GPU (slower, fits any GPU); auto does so "
                                       "when its weights would not fit the free GPU memory", choices=("auto", "none",
                                                                                                      "layers"))

    @property
    def resolved_dir(self) -> Path:
        """Resolved when used, not stored: a saved config keeps following the user's environment."""
        return Path(self.dir) if self.dir else default_cache_dir()


@dataclass(frozen=True)
class OutputConfig(_Section):
    dir: str = option("output", "parent folder of the run folders", path=True)
    name: str = option("flux2_lora", "run and LoRA file name (no folder separators)", check=_file_name)


def _positive(value: float) -> float:
    if value <= 0:
        raise ValueError(f"{value!r} must be above 0")
    return value


def _prompts(values: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(v for v in values if v)


@dataclass(frozen=True)
class LoraConfig(_Section):
    rank: int = option(16, "LoRA rank: capacity (and file size); 16-32 for a character, 32-64 for a style", min=1)
    alpha: float = option(16.0, "LoRA alpha: updates are scaled by alpha/rank; alpha = rank gives scale 1",
                          check=_positive)
    dropout: float = option(0.0, "dropout on the LoRA input, 0 to 0.5", check=_fraction)
    targets: str = option("attention_mlp", "attention | attention_mlp | module names 'to_q,to_k' | 'regex:<pattern>'")
    type: str = option("lora", "lora | dora (weight-decomposed LoRA: a trained magnitude per output row as well) | "
                       "lokr (Kronecker product) | loha (Hadamard product), each written in keys ComfyUI loads",
                       choices=("lora", "dora", "lokr", "loha"))
    init_from: str = option("", "a LoRA .safetensors to continue training (ComfyUI, diffusers or kohya keys): its "
                            "rank and alpha replace lora.rank/alpha, its layers start as trained; empty: a new LoRA")


SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


@dataclass(frozen=True)
class TrainConfig(_Section):
    steps: int = option(1000, "optimizer steps to train", min=1)
    batch_size: int = option(1, "images per forward pass (one bucket per batch)", min=1)
    gradient_accumulation: int = option(1, "forward passes per optimizer step", min=1)
    lr: float = option(1e-4, "peak learning rate", check=_positive)
    optimizer: str = option("adamw", "adamw (fused where supported) | adamw8bit (bitsandbytes) | sgd",
                            choices=("adamw", "adamw8bit", "sgd"))
    weight_decay: float = option(1e-4, "decoupled weight decay on the LoRA weights", min=0)
    lr_scheduler: str = option("constant", " | ".join(SCHEDULES), choices=SCHEDULES)
    warmup_steps: int = option(0, "linear warm-up steps at the start of the schedule", min=0)
    max_grad_norm: float = option(1.0, "clip the gradient norm to this; 0 turns clipping off", min=0)
    mixed_precision: str = option("auto", "auto (bf16 where supported, else off) | bf16 | fp16 (with a GradScaler) "
                                  "| no", choices=("auto", "bf16", "fp16", "no"))
    timestep_sampling: str = option("logit_normal", "uniform | logit_normal (favours mid noise levels) | mode",
                                    choices=("uniform", "logit_normal", "mode"))
    logit_mean: float = option(0.0, "logit-normal timestep sampling: mean (above 0: more noise)")
    logit_std: float = option(1.0, "logit-normal timestep sampling: standard deviation", check=_positive)
    timestep_shift: str = option("linear", "resolution-dependent shift of the noise levels towards noise: linear "
                                 "(FLUX.1's mu, reportedly FLUX.2's training) | empirical (the FLUX.2 pipelines' "
                                 "inference mu at 50 steps, much stronger) | none (diffusers' script)",
                                 choices=("linear", "empirical", "none"))
    loss_weighting: str = option("none", "none | sigma_sqrt | cosmap (diffusers' SD3 weightings)",
                                 choices=("none", "sigma_sqrt", "cosmap"))
    guidance: float = option(3.5, "[dev] guidance embedding value while training (diffusers' script: 3.5); "
                             "[klein] has none", min=0)
    caption_dropout: float = option(0.0, "fraction of steps trained on the empty caption", check=_fraction)
    gradient_checkpointing: str = option("auto", "auto | true | false: recompute activations in backward, much less "
                                         "memory for 1.4-2x the step time; auto: on where the step would not fit "
                                         "the device's free memory without it", choices=("auto", "true", "false"),
                                         aliases={"on": "true", "off": "false"})
    compile: bool = option(False, "torch.compile each transformer block")
    ema_decay: float = option(0.0, "also keep an exponential moving average of the LoRA weights, saved as "
                              "<name>_ema.safetensors (0.99-0.999 typical: smoother than the last step); 0: off",
                              check=_fraction)
    fsdp: bool = option(False, "under torchrun: shard the frozen base over the ranks (FSDP2); off: each holds it all")
    profile_steps: int = option(0, "write a torch.profiler trace of this many steps (after 2 warm-up steps)", min=0)
    prefetch_batches: int = option(2, "micro-batches a background thread reads ahead from the latent cache on a GPU "
                                   "(pinned on CUDA, for non-blocking copies; on the CPU it would only compete with "
                                   "the step); 0: each step reads its own", min=0)
    seed: int = option(42, "seed for LoRA init, data order, noise and timesteps: same seed, same run")
    log_every: int = option(10, "write metrics (and the gradient norm) every N steps", min=1)
    validate_every: int = option(100, "measure the validation loss every N steps (and at each checkpoint and the "
                                 "end), when images are held out", min=1)


@dataclass(frozen=True)
class SampleConfig(_Section):
    every: int = option(0, "sample images every N steps; 0: only after training (none with sample.steps=0)", min=0)
    at_start: bool = option(False, "also sample before the first step (the base model)")
    prompts: tuple[str, ...] = option((), "prompts separated by '|'; empty: the first two training captions",
                                      check=_prompts, sep="|")
    # 0 switches sampling off (no every-N, start or final samples): on a slow machine one sample can take longer
    # than a short run. A number rather than a new flag, so run.json of older runs (steps >= 1) loads unchanged.
    steps: int = option(20, "denoising steps per sample; 0: no samples at all (sample.every and sample.at_start "
                        "are then ignored)", min=0)
    guidance: float = option(4.0, "guidance scale ([klein] base: classifier-free; [dev]: embedded)", min=0)
    resolution: int = option(0, "sample side in pixels; 0: the last data.resolution", min=0)
    seed: int = option(0, "noise seed: the same across samples, so they are comparable")


@dataclass(frozen=True)
class CheckpointConfig(_Section):
    every: int = option(500, "save a resumable checkpoint every N steps (and always at the end); 0: only at the end",
                        min=0)
    keep: int = option(3, "newest checkpoints kept, plus the one with the best smoothed loss; 0: no count limit "
                       "(then only checkpoint.max_age_days removes)", min=0)
    max_age_days: float = option(0.0, "also remove checkpoints older than this many days (never the newest "
                                 "checkpoint.keep or the best); 0: no age limit", min=0)


@config_root
@dataclass(frozen=True)
class Config:
    """The sections, in file and --help order. A new section is a _Section dataclass and one line here."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def __post_init__(self):
        wrong = [name for name, cls in _sections().items() if not isinstance(getattr(self, name), cls)]
        if wrong:  # a programming error, not a user's: build from mappings with config_from_dict
            raise TypeError(f"Config({', '.join(wrong)}=...) must be given section objects, not {wrong[0]}=mapping")

    def to_dict(self) -> dict:
        """Plain JSON/YAML types (lists, not tuples): what run.json records and config_from_dict reads."""
        return {s: {f.name: _plain(getattr(getattr(self, s), f.name)) for f in fields(cls)}
                for s, cls in _sections().items()}

    def replace(self, updates: Mapping[str, Any] | None = None, /, **sections: Mapping[str, Any]) -> Config:
        """A validated copy: `cfg.replace({"data.resolution": [512]}, model={"dtype": "bf16"})`."""
        raw, problems = self.to_dict(), []
        for name, values in sections.items():
            _merge(raw, {name: values})
        for key, value in (updates or {}).items():
            _set(raw, key, value, problems, source=f"key {key!r}")
        return _build(raw, problems)


def default_cache_dir() -> Path:
    """$FLUX2_LORA_CACHE, else $XDG_CACHE_HOME/flux2-lora, else ~/.cache/flux2-lora, read when called."""
    if os.environ.get("FLUX2_LORA_CACHE"):
        return Path(os.environ["FLUX2_LORA_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "flux2-lora"


def config_from_dict(d: Mapping) -> Config:
    """Validate a {section: {key: value}} mapping (run.json's "config", a node's widget values)."""
    if not isinstance(d, Mapping):
        raise ConfigError([("", f"a config must be a mapping of sections ({', '.join(_sections())}), got {d!r}")])
    return _build(d, [])


def load_config(path=None, overrides: Sequence[str] = (), base: Mapping | Config | None = None, *,
                check=None) -> Config:
    """defaults < base < YAML file < overrides (in order); every problem of all of them in one ConfigError.

    `check(config)` returns the problems a command finds in a whole config (missing paths, settings that
    contradict each other); it runs even when some keys are bad (on the config with those at their
    defaults), so the user sees everything in one message rather than one round per kind of mistake.
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    problems: list[tuple[str, str]] = []
    raw: dict = {}
    _merge(raw, base.to_dict() if isinstance(base, Config) else base or {})
    if path is not None:
        _merge(raw, _read_yaml(path, problems))
    for text in overrides:
        _parse_override(text, raw, problems)
    config, problems = _build(raw, problems, partial=True)
    if check is not None:
        # A section with a bad key was checked with that key at its default: only its paths are still worth
        # reporting (e.g. no "warmup not below train.steps=1000" when the user's train.steps was the typo).
        reported, bad_sections = {key for key, _ in problems}, {key.partition(".")[0] for key, _ in problems}
        problems += [(key, msg) for key, msg in check(config) if key not in reported
                     and (key.partition(".")[0] not in bad_sections or _is_path(key))]
    if problems:
        raise ConfigError(problems)
    return config


def _is_path(key: str) -> bool:
    section, _, name = key.partition(".")
    cls = _sections().get(section)
    return bool(cls) and any(f.name == name and f.metadata["path"] for f in fields(cls))


class KeyInfo(NamedTuple):
    key: str
    type: str
    default: Any
    help: str


def describe_keys() -> list[KeyInfo]:
    """Every key, for `--help` and the docs: read from the field declarations, so never out of date."""
    return [KeyInfo(f"{s}.{f.name}", _type_name(get_type_hints(cls)[f.name]), _plain(f.default), f.metadata["help"])
            for s, cls in _sections().items() for f in fields(cls)]


def check_paths(config: Config, needs: Sequence[str] = ("model", "data")) -> list[tuple[str, str]]:
    """Problems with the paths a command needs, to be reported together with its other problems."""
    problems = []
    for need in needs:
        if need not in ("model", "data"):
            raise ValueError(f"check_paths: unknown need {need!r}")
        path = getattr(config, need).path
        what = "a FLUX.2 diffusers folder or transformer file" if need == "model" else "the dataset folder"
        if not path:
            problems.append((f"{need}.path", f"not set: give {what}, e.g. {need}.path=/path/to/it"))
        elif not Path(path).exists():
            start = "" if Path(path).is_absolute() else f" (relative to {os.getcwd()!r})"
            problems.append((f"{need}.path", f"{path!r} does not exist{start}"))
        elif need == "data" and not Path(path).is_dir():
            problems.append(("data.path", f"{path!r} is a file: give {what}"))
        if need == "model":
            problems += [(f"model.{k}", f"{getattr(config.model, k)!r} does not exist")
                         for k in ("vae", "text_encoder", "tokenizer")
                         if getattr(config.model, k) and not Path(getattr(config.model, k)).exists()]
    return problems
