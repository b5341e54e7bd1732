"""One configuration for the CLI, the ComfyUI nodes and run.json.

Each option is declared once, on one line of a frozen dataclass: its default, its help and its
checks. Loading, `key=value` overrides, validation, `--help` text and run.json all read that line, so
a new option is one line and a new section (lora, train, ...) is one dataclass added as a field of
`Config`. This replaces a hand-written `if` per override (audit 3.3). Field names are also the node
input names and the CLI keys, so one error message fits all three.

Precedence, lowest first: the defaults, `base` (a preset, or a node's widget values), the YAML file,
then the overrides in the order given. Every problem in all of them is raised together, as one
ConfigError of (dotted key, message) pairs.

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
                            option)
from .errors import ConfigError


# ---------------------------------------------------------------------------------------------- checks
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def _device(value: str) -> str:
    if not _DEVICE.fullmatch(value.lower()):
        raise ValueError(f"{value!r} is not a device: use auto, cpu, cuda, cuda:N or mps")
    return value.lower()


def _caption_extensions(value: tuple[str, ...]) -> tuple[str, ...]:
    from .captions import normalise_caption_extensions  # here: captions imports PIL, config stays light

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


def _file_name(value: str) -> str:
    bad = sorted(set(value) & set('/\\:*?"<>|') | {c for c in value if ord(c) < 32})
    if not value or value in (".", "..") or bad or value.endswith("."):
        raise ValueError(f"{value!r} is not a valid file name: it names the run folder and the LoRA file, so it must "
                         "be non-empty, not end with '.', and have none of / \\ : * ? \" < > |")
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
    device: str = option("auto", "auto | cpu | cuda | cuda:N | mps", check=_device)
    text_conditioning: str = option("comfyui", "comfyui | diffusers: whose prompt encoding the LoRA is trained on",
                                    choices=("comfyui", "diffusers"))


@dataclass(frozen=True)
class DataConfig(_Section):
    path: str = option("", "dataset folder (required by cache and train)", path=True)
    caption_extensions: tuple[str, ...] = option((".txt",), "caption file extensions, first match wins: 'txt,caption'",
                                                 check=_caption_extensions)
    trigger_word: str = option("", "prepended to every caption ('trigger, caption')")
    repeats: int = option(1, "times each image is seen per epoch", min=1)
    recursive: bool = option(True, "also read images in sub-folders")
    resolution: tuple[int, ...] = option((1024,), "a resolution or a schedule [512, 1024] (each is cached); "
                                         "multiples of 16 in 64..4096", check=_resolutions)
    buckets: bool = option(True, "aspect-ratio buckets; false: centre square crops")
    max_aspect: float = option(4.0, "widest bucket's long/short side ratio", min=1)
    flip: bool = option(False, "random horizontal flips (both orientations are cached)")


@dataclass(frozen=True)
class CacheConfig(_Section):
    dir: str = option("", "latent cache folder; empty: $FLUX2_LORA_CACHE, else $XDG_CACHE_HOME/flux2-lora, "
                      "else ~/.cache/flux2-lora", path=True)
    batch_size: int = option(4, "images per VAE call", min=1)
    verify: str = option("quick", "quick (sizes and headers) | full (SHA-256 of every shard)",
                         choices=("quick", "full"))

    @property
    def resolved_dir(self) -> Path:
        """Resolved when used, not stored: a saved config keeps following the user's environment."""
        return Path(self.dir) if self.dir else default_cache_dir()


@dataclass(frozen=True)
class OutputConfig(_Section):
    dir: str = option("output", "parent folder of the run folders", path=True)
    name: str = option("flux2_lora", "run and LoRA file name (no folder separators)", check=_file_name)


@dataclass(frozen=True)
class Config:
    """The sections, in file and --help order. A new section is a _Section dataclass and one line here."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
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


def load_config(path=None, overrides: Sequence[str] = (), base: Mapping | Config | None = None) -> Config:
    """defaults < base < YAML file < overrides (in order); every problem of all of them in one ConfigError."""
    if isinstance(overrides, str):
        overrides = [overrides]
    problems: list[tuple[str, str]] = []
    raw: dict = {}
    _merge(raw, base.to_dict() if isinstance(base, Config) else base or {})
    if path is not None:
        _merge(raw, _read_yaml(path, problems))
    for text in overrides:
        _parse_override(text, raw, problems)
    return _build(raw, problems)


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
