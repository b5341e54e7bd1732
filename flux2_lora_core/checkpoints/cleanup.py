"""Cleaning up after killed checkpoint writers: temp folders, half-deleted folders and half-done replaces.

checkpoint.py commits a checkpoint with renames, so a writer killed at any instant leaves only complete checkpoints
under the listed names, but it may leave hidden folders behind. This module names those folders, tells an abandoned
one from one still in use, and removes or restores them; kept apart so checkpoint.py reads as write, check, find
and prune. It does not import checkpoint.py (which imports it).

Leftovers of killed writers go at the next write or prune in that folder. A writer holds an flock on its temp
folder, `.step_000100.tmp-<host>-<pid>-<token>/`, which the kernel drops when it dies (even by SIGKILL): an unlocked
temp folder with files in it is abandoned; an empty one after a minute (its writer may be between mkdir and flock).
Where flock does not work (Windows, some network filesystems): once its pid is gone on this host, or after 6 hours.
`.del-` folders always go; a `.replaced` one goes when its checkpoint exists, else takes its name back. One writer
per folder is expected: concurrent ones never lose a complete checkpoint, but one may fail.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from ..disk import fsync

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

log = logging.getLogger(__name__)

_TEMP = re.compile(r"\..+\.tmp-([A-Za-z0-9-]*)-(\d+)-[0-9a-f]{8}")
_TRASH = re.compile(r"\..+\.del-[0-9a-f]{8}")
_REPLACED = re.compile(r"step_\d+\.replaced")  # the old checkpoint, moved aside while a new one takes its name
_HOST = re.sub(r"[^A-Za-z0-9-]", "", socket.gethostname())[:32]
EMPTY_GRACE_S = 60  # an unlocked, empty temp folder may belong to a writer between mkdir and flock
STALE_S = 6 * 3600  # without flock: a temp folder this old is abandoned whatever its pid says


@contextlib.contextmanager
def _hold_temp_folder(folder: Path) -> Iterator[Path]:
    """Make the hidden folder, beside `folder`, that `folder` is written into (`_TEMP` matches its name) and hold its
    flock until the end; remove it then unless it was renamed into place."""
    tmp = folder.with_name(f".{folder.name}.tmp-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir()
    lock, _ = _flock(tmp)  # held until the end: tells cleaners this folder is in use
    try:
        yield tmp
    finally:
        if lock is not None:
            os.close(lock)
        if tmp.exists():  # an error while writing: never leave a partial folder behind
            shutil.rmtree(tmp, ignore_errors=True)


def _remove(folder: Path) -> None:
    """Hide first (one atomic rename), then delete: a crash midway leaves no half folder under a checkpoint name."""
    trash = folder.with_name(f".{folder.name}.del-{secrets.token_hex(4)}")
    try:
        os.rename(folder, trash)
    except FileNotFoundError:  # another cleaner got there first
        return
    fsync(folder.parent)
    shutil.rmtree(trash, ignore_errors=True)


def _clean_leftovers(folder: Path) -> None:
    try:
        entries = list(folder.iterdir())
    except OSError:
        return
    for p in entries:
        if _TRASH.fullmatch(p.name):
            shutil.rmtree(p, ignore_errors=True)
        elif (m := _TEMP.fullmatch(p.name)) and _abandoned(p, m[1], int(m[2])):
            log.info("removing %s, left by a writer that was killed", p)
            _remove(p)
        elif _REPLACED.fullmatch(p.name):
            primary = p.with_name(p.name.removesuffix(".replaced"))
            if os.path.lexists(primary):
                _remove(p)
            else:  # killed between the two renames of a replace: the old checkpoint takes its name back
                os.rename(p, primary)
                fsync(folder)


def _flock(folder: Path) -> tuple[int | None, bool | None]:
    """Try an exclusive flock on `folder`: (fd, True) got it; (None, False) another process holds it;
    (fd or None, None) flock does not work here. Closing fd releases the lock."""
    if fcntl is None:
        return None, None
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd, True
    except BlockingIOError:
        os.close(fd)
        return None, False
    except OSError:
        return fd, None


def _abandoned(tmp: Path, host: str, pid: int) -> bool:
    try:
        fd, got = _flock(tmp)
        if fd is not None:
            os.close(fd)
        age, empty = time.time() - tmp.stat().st_mtime, not any(tmp.iterdir())
    except OSError:
        return False
    dead = host == _HOST and not _pid_alive(pid)
    if got is not None:  # flock works: held means in use; free and written into means its writer died
        return got and (not empty or dead or age > EMPTY_GRACE_S)
    return dead or age > STALE_S


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass
    return True
