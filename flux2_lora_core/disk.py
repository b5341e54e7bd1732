"""Writes that survive a crash or a power cut: a file is replaced whole or not at all, and stays written.

The latent cache, metrics, LoRA files and checkpoints all promise that a killed process leaves the previous
version readable, so they share these two steps: write to a hidden temporary name, fsync, rename over the
target, fsync the folder (which makes the rename itself durable).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


def write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves either the old file or the new one, never a mix."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync(path.parent)


def fsync(target) -> None:
    """fsync a file descriptor (errors raise: the data may not be on disk), or a folder by path (best effort: makes
    new names in it durable; Windows cannot open folders and some filesystems refuse)."""
    if not isinstance(target, int):
        with contextlib.suppress(OSError):
            fd = os.open(target, os.O_RDONLY)
            try:
                fsync(fd)
            finally:
                os.close(fd)
        return
    os.fsync(target)
    with contextlib.suppress(OSError, AttributeError):  # macOS: fsync alone stops at the drive's cache
        fcntl.fcntl(target, fcntl.F_FULLFSYNC)
