"""How config sections are declared, parsed and checked: the machinery behind config.py.

Kept apart so config.py reads as the list of options. Sections are discovered from the fields of the class
config.py marks with `@config_root` (`Config`), so a new section needs no change here; the mark, not an import of
config.py, is how this module finds it, so imports run one way (config.py imports this module, never the reverse).
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import field, fields
from functools import cache
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from .errors import ConfigError

_root: type | None = None  # the class marked @config_root: config.Config


def option(default, help: str, *, choices: Sequence[str] = (), aliases: Mapping[str, str] | None = None,
           min: float | None = None, path: bool = False, check=None, sep: str = ","):
    """A config field. `check(value)` returns the normalised value or raises ValueError(message).
    `sep` splits a list typed as one string ("512,1024"); prompts, which hold commas, use "|"."""
    return field(default=default, metadata={"help": help, "choices": tuple(choices), "aliases": dict(aliases or {}),
                                            "min": min, "path": path, "check": check, "sep": sep})


class _Section:
    """Validates and normalises on construction, so every section object in the program is valid."""

    def __post_init__(self):
        prefix, hints, problems = _section_name(type(self)), get_type_hints(type(self)), []
        for f in fields(self):
            try:
                object.__setattr__(self, f.name, _normalise(f, hints[f.name], getattr(self, f.name)))
            except ValueError as exc:
                problems.append((f"{prefix}.{f.name}", str(exc)))
        if problems:
            raise ConfigError(problems)


# ---------------------------------------------------------------------------------------------- framework
def config_root(cls: type) -> type:
    """Mark the dataclass whose fields are the sections (config.Config)."""
    global _root
    _root = cls
    _sections.cache_clear()
    return cls


@cache
def _sections() -> dict[str, type]:
    """The sections are the root's fields: adding one there is all a new section needs."""
    hints = get_type_hints(_root)
    return {f.name: hints[f.name] for f in fields(_root)}


def _section_name(cls: type) -> str:
    return next((name for name, c in _sections().items() if c is cls), cls.__name__.lower())


def _plain(value):
    return [_plain(v) for v in value] if isinstance(value, (tuple, list)) else value


def _type_name(tp) -> str:
    return f"list[{get_args(tp)[0].__name__}]" if get_origin(tp) is tuple else tp.__name__


_EXPECTED = {bool: "true or false", int: "a whole number", float: "a finite number", str: "text (quote it in YAML)"}


def _convert(value, tp, sep: str = ","):
    """Types are checked, not coerced: a bool is no int, "yes" no bool; an int is a fine float."""
    if get_origin(tp) is tuple:
        item = get_args(tp)[0]
        parts = value.split(sep) if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
        if item is int:  # "512,1024": a list typed as text, e.g. into a ComfyUI text widget
            parts = [int(p) if isinstance(p, str) and re.fullmatch(r"\s*\d+\s*", p) else p for p in parts]
        try:
            return tuple(_convert(p, item) for p in parts)
        except ValueError:
            raise ValueError(f"expected {_EXPECTED[item]} or a list of them, got {value!r}") from None
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if tp is str and value is None:  # `vae:` left empty in YAML: no value
        value = ""
    if type(value) is not tp or (tp is float and not math.isfinite(value)):
        raise ValueError(f"expected {_EXPECTED.get(tp, tp.__name__)}, got {value!r}")
    return value.strip() if tp is str else value


def _clean_path(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1].strip()
    return os.path.expanduser(text) if text else ""


def _normalise(f, tp, value):
    meta = f.metadata
    if meta["choices"] and isinstance(value, bool) and str(value).lower() in meta["choices"]:
        value = str(value).lower()  # a setting that grew past a bool (auto | true | false) still takes YAML's bools
    value = _convert(value, tp, meta["sep"])
    if meta["path"] and value:
        value = _clean_path(value)
    if meta["choices"]:
        choice = meta["aliases"].get(value.lower(), value.lower())
        if choice not in meta["choices"]:
            alias = f" (or {', '.join(meta['aliases'])})" if meta["aliases"] else ""
            raise ValueError(f"{value!r} is not one of {', '.join(meta['choices'])}{alias}")
        value = choice
    if meta["min"] is not None and value < meta["min"]:
        raise ValueError(f"must be at least {meta['min']}, got {value!r}")
    return meta["check"](value) if meta["check"] else value


def _unknown(key: str, what: str = "") -> str:
    """'unknown key' with the likeliest meant key: the same name in another section, else the closest."""
    sections = list(_sections())
    keys = [f"{s}.{f.name}" for s, cls in _sections().items() for f in fields(cls)]
    name = key.rsplit(".", 1)[-1]
    close = [k for k in keys if k.endswith("." + name)] or difflib.get_close_matches(key, keys + sections, 1, 0.6)
    what = what or ("section" if "." not in key else "key")
    hint = f": did you mean `{close[0]}`?" if close else f" (sections: {', '.join(sections)})"
    return f"unknown {what}{hint}"


def _merge(raw: dict, layer: Mapping) -> None:
    for name, values in layer.items():
        old = raw.get(name)
        raw[name] = {**old, **values} if isinstance(old, Mapping) and isinstance(values, Mapping) else values


def _set(raw: dict, key: str, value, problems: list, source: str) -> None:
    section, _, name = key.partition(".")
    if not name:
        cls = _sections().get(section)
        problems.append((key, f"{source} names a section, not a key: set one key, e.g. {section}."
                              f"{fields(cls)[0].name}=..." if cls else _unknown(key, "key")))
    elif isinstance(raw.setdefault(section, {}), Mapping):  # a scalar section is reported by _build
        raw[section] = {**raw[section], name: value}


def _field_type(key: str):
    section, _, name = key.partition(".")
    cls = _sections().get(section)
    return get_type_hints(cls).get(name) if cls else None


def _build(raw: Mapping, problems: list, *, partial: bool = False) -> Any:
    """The Config, or ConfigError with every problem. `partial`: return (Config, problems) instead, each bad
    key left at its default, so checks that need a whole config (paths, combinations) can still run."""
    problems, built = list(problems), {}
    for section, values in raw.items():
        cls = _sections().get(str(section))
        if cls is None:
            problems.append((str(section), _unknown(str(section))))
            continue
        values = {} if values is None else values  # `data:` with every key commented out
        if not isinstance(values, Mapping):
            problems.append((section, f"expected a mapping of {section}.* keys, got {values!r}"))
            continue
        names = {f.name for f in fields(cls)}
        problems += [(f"{section}.{k}", _unknown(f"{section}.{k}")) for k in values if k not in names]
        try:
            built[section] = cls(**{k: v for k, v in values.items() if k in names})
        except ConfigError as exc:
            problems += exc.problems
            if partial:
                bad = {key.partition(".")[2] for key, _ in exc.problems}
                try:
                    built[section] = cls(**{k: v for k, v in values.items() if k in names and k not in bad})
                except ConfigError:
                    built[section] = cls()
    if partial:
        return _root(**built), problems
    if problems:
        raise ConfigError(problems)
    return _root(**built)


# ---------------------------------------------------------------------------------------------- loading
class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans and exponent floats; duplicate keys are an error, not a silent overwrite."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping", node.start_mark, f"found duplicate key {key_node.value!r}",
                        key_node.start_mark)
                seen.add(key_node.value)
        return super().construct_mapping(node, deep)


_Loader.yaml_implicit_resolvers = {first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
                                   for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))
_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"), list("-+0123456789."))


def _read_yaml(path, problems: list) -> Mapping:
    where = Path(str(path).strip()).expanduser()
    try:
        data = yaml.load(where.read_text(encoding="utf-8"), Loader=_Loader)
    except FileNotFoundError:
        problems.append((str(where), "no such config file"))
    except UnicodeDecodeError:
        problems.append((str(where), "is not UTF-8 text"))
    except OSError as exc:
        problems.append((str(where), f"cannot be read ({exc.strerror or exc})"))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problems.append((str(where), f"is not valid YAML: {exc.problem or exc.context}{at}"))
    except yaml.YAMLError as exc:
        problems.append((str(where), f"is not valid YAML: {exc}"))
    else:
        if data is None or isinstance(data, Mapping):
            return data or {}
        sections = ", ".join(_sections())
        problems.append((str(where), f"must be a mapping of sections ({sections}), got a {type(data).__name__}"))
    return {}


def _parse_override(text: str, raw: dict, problems: list) -> None:
    key, eq, value = str(text).partition("=")
    key, value = key.strip(), value.strip()
    if not eq or not key:
        problems.append((key or str(text), f"override {text!r} is not key=value: write e.g. data.resolution=1024"))
        return
    if _field_type(key) in (str, tuple[str, ...]):  # text stays as typed: `output.name=001`, `model.path=/x y/z`
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
    else:
        try:
            value = yaml.load(value, Loader=_Loader)
        except yaml.YAMLError:
            problems.append((key, f"override {text!r}: {value!r} is not a YAML value"))
            return
    _set(raw, key, value, problems, source=f"override {text!r}")
