"""Typed errors for everything a user can get wrong.

Every error raised for bad input is a `Flux2LoraError`: the CLI turns it into a one-paragraph
message and exit code 1 instead of a traceback, and the ComfyUI nodes show the same text. Messages
name the offending file, key or value (`!r`) and say what fixes it.
"""

from __future__ import annotations


class Flux2LoraError(Exception):
    """Base class: the input is unusable and the message says why and how to fix it."""


class DatasetError(Flux2LoraError):
    """The dataset folder (or a file in it) cannot be used."""


class PathNotAllowedError(Flux2LoraError):
    """A path lies outside the folders this process may use: on a shared ComfyUI server, its input, output and
    model folders and the folders its owner allowed. The message names the input, never what lies outside."""


class ImageError(DatasetError):
    """One image file cannot be decoded into RGB pixels."""

    def __init__(self, path, reason: str):
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class ConfigError(Flux2LoraError):
    """A configuration value is wrong. `problems` holds every (key, message) found, not just the first."""

    def __init__(self, problems: list[tuple[str, str]] | str):
        if isinstance(problems, str):
            problems = [("", problems)]
        self.problems = list(problems)
        lines = [f"{key}: {msg}" if key else msg for key, msg in self.problems]
        super().__init__("invalid configuration:\n  " + "\n  ".join(lines) if len(lines) > 1 else lines[0])


class ModelError(Flux2LoraError):
    """A model file or folder is missing, truncated, of the wrong kind or mismatched."""


class CheckpointError(Flux2LoraError):
    """A training checkpoint is missing, incomplete or damaged, and must not be resumed from.

    `path` is the file or folder at fault and `reason` the short "<file>: <what is wrong>" part of the message
    (what `checkpoint.newest_intact` lists for each checkpoint it skips); both may be None.
    """

    def __init__(self, message: str, *, path=None, reason: str | None = None):
        self.path = path
        self.reason = reason if reason is not None else message
        super().__init__(message)


class ExportError(Flux2LoraError):
    """A LoRA file cannot be written, read or converted (wrong kind of file, unknown key layout, ...)."""


class TrainingDiverged(Flux2LoraError):
    """The loss became NaN or infinite: the weights are ruined, and continuing would only save a broken LoRA."""
