"""Training checkpoints you can trust: safetensors and JSON under a SHA-256 manifest, written atomically.

A checkpoint is a folder, `<run>/checkpoints/step_000100/`: `<stem>.safetensors` per tensor group (adapter,
optimizer, rng, ...), `<stem>.json` per document (state, config, ...), and `checksums.sha256`, written last, with
`# size <bytes> <file>` and `<sha256>  <file>` per file and a final `# self-check <sha256 of the lines above>`
that catches an edited manifest (GNU `sha256sum -c --strict` skips '#' lines). Nothing is pickled, ever.

A crash at any instant leaves only complete checkpoints under the names `find_checkpoints` lists: files go into a
hidden `.step_000100.tmp-<host>-<pid>-<token>/` beside the target, each fsynced, the manifest last; the folder is
fsynced, verified by re-reading (page cache dropped first where the OS allows), renamed to `step_000100` (the
atomic commit) and the parent fsynced. An existing `step_000100` is first renamed to `step_000100.replaced`, which
is listed too, then deleted once the new one is in place. Deleting hides a folder (rename to `.<name>.del-<token>`)
before removing it. cleanup.py removes what killed writers leave, at the next write or prune there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import stat
import time
from pathlib import Path

import torch
from safetensors.torch import load, save

from ..disk import fsync
from ..errors import CheckpointError
from .cleanup import _clean_leftovers, _hold_temp_folder, _remove

log = logging.getLogger(__name__)

MANIFEST = "checksums.sha256"
_HEADER = "# flux2_lora checkpoint v1: `sha256sum -c` checks the files below; '#' lines are comments"
_STEP = re.compile(r"step_(\d+)(\.replaced)?")
_STEM = re.compile(r"[^./\\\s][^/\\\x00-\x1f]*(?<=\S)")  # a file name: not hidden, no folders, no control chars


# ------------------------------------------------------------------------------------------------ writing
def write_checkpoint(folder, tensors: dict[str, dict[str, torch.Tensor]], documents: dict[str, object]) -> Path:
    """Write `tensors` (stem -> named tensors) and `documents` (stem -> JSON value) as the checkpoint `folder`,
    replacing it if it exists; returns `folder` once it is on disk, complete and verified."""
    folder = Path(folder)
    jsons = {_stem(stem): _json_bytes(stem, value) for stem, value in documents.items()}
    for stem, group in tensors.items():
        if _stem(stem) and (bad := [k for k, t in group.items() if not isinstance(k, str) or not torch.is_tensor(t)]):
            raise TypeError(f"checkpoint tensors {stem!r}: {bad!r} are not str -> tensor; put others in documents")
    try:
        _write(folder, tensors, jsons)
    except OSError as exc:  # disk full, permissions, ...: the CLI shows this instead of a traceback
        raise CheckpointError(f"could not write checkpoint {folder} ({exc}); the earlier checkpoints are untouched. "
                              "Free disk space or fix the folder's permissions, then retry.", path=folder) from exc
    log.info("checkpoint written and verified: %s", folder)
    return folder


def _write(folder: Path, tensors: dict[str, dict[str, torch.Tensor]], jsons: dict[str, bytes]) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(folder.parent)
    with _hold_temp_folder(folder) as tmp:
        listed = []
        for stem, group in tensors.items():  # one file serialized at a time: memory holds one, not all
            data = save({key: _cpu_copy(t) for key, t in group.items()}, metadata={"format": "pt"})
            listed.append(_write_file(tmp / f"{stem}.safetensors", data))
            del data
        listed += [_write_file(tmp / f"{stem}.json", data) for stem, data in jsons.items()]
        _write_file(tmp / MANIFEST, _manifest(listed))
        fsync(tmp)
        try:
            verify_checkpoint(tmp)
        except CheckpointError as exc:
            raise CheckpointError(f"checkpoint {folder} reads back differently from what was written ({exc.reason}): "
                                  "the disk or filesystem is failing; nothing was replaced", path=folder,
                                  reason=exc.reason) from None
        _put_in_place(tmp, folder)


def _stem(stem):
    if not isinstance(stem, str) or not _STEM.fullmatch(stem):
        raise ValueError(f"checkpoint file stem {stem!r}: must be a plain file name, not starting with '.' and without "
                         "slashes, control characters or spaces at either end")
    return stem


def _json_bytes(stem: str, value) -> bytes:
    def string_keys(v, where):  # JSON would silently turn int keys into strings: refuse rather than alter state
        for k, item in v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, (list, tuple)) else ():
            if isinstance(v, dict) and not isinstance(k, str):
                raise TypeError(f"checkpoint document {stem!r}: key {k!r} in {where} is not a string")
            string_keys(item, f"{where}[{k!r}]")

    string_keys(value, stem)
    try:
        return (json.dumps(value, indent=1, ensure_ascii=False) + "\n").encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise TypeError(f"checkpoint document {stem!r} is not JSON ({exc}): put tensors in `tensors`") from None


def _cpu_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy with its own storage: views, slices, shared storage and GPU tensors all work."""
    return torch.empty(t.shape, dtype=t.dtype, device="cpu").copy_(t.detach())


def _write_file(path: Path, data: bytes) -> tuple[str, int, str]:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        fsync(f.fileno())
        if hasattr(os, "posix_fadvise"):  # drop the clean pages: the verification then reads the disk, not memory
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return path.name, len(data), hashlib.sha256(data).hexdigest()


def _manifest(listed: list[tuple[str, int, str]]) -> bytes:
    lines = [_HEADER] + [line for name, size, digest in sorted(listed)
                         for line in (f"# size {size} {name}", f"{digest}  {name}")]
    body = "".join(line + "\n" for line in lines)
    return (body + f"# self-check {hashlib.sha256(body.encode()).hexdigest()}\n").encode()


def _put_in_place(tmp: Path, folder: Path) -> None:
    backup = folder.with_name(folder.name + ".replaced")
    if replacing := os.path.lexists(folder):  # the old one stays listed, as step_N.replaced, until the new is there
        os.rename(folder, backup)
        fsync(folder.parent)
    os.rename(tmp, folder)
    fsync(folder.parent)
    if replacing:
        _remove(backup)


# ---------------------------------------------------------------------------------------------- checking
def _damaged(folder: Path, name: str, what: str):
    raise CheckpointError(f"{folder / name}: {what}. The checkpoint {folder.name} is damaged and must not be used.",
                          path=folder / name, reason=f"{name}: {what}")


def _read_manifest(folder: Path) -> dict[str, tuple[int, str]]:
    """file name -> (size, sha256), after the manifest's own self-check."""
    try:
        text = (folder / MANIFEST).read_bytes().decode("utf-8")
    except FileNotFoundError:
        _damaged(folder, MANIFEST, "missing: the checkpoint was never completed, or the file was deleted")
    except (OSError, UnicodeDecodeError) as exc:
        _damaged(folder, MANIFEST, f"unreadable ({exc})")
    lines = text.split("\n")
    body = "".join(line + "\n" for line in lines[:-2])
    if len(lines) < 3 or lines[-1] or lines[-2] != f"# self-check {hashlib.sha256(body.encode()).hexdigest()}":
        _damaged(folder, MANIFEST, "edited or truncated: its last line, a self-check of the lines above, does not "
                 "match them")
    if lines[0] != _HEADER:
        _damaged(folder, MANIFEST, f"line 1 is {lines[0]!r}, not the flux2_lora checkpoint v1 header")
    sizes, digests = {}, {}
    for number, line in enumerate(lines[1:-2], start=2):
        m = re.fullmatch(r"# size (\d+) (.+)", line) or re.fullmatch(r"([0-9a-f]{64})  (.+)", line)
        into = sizes if line.startswith("#") else digests
        stem, _, ext = m[2].rpartition(".") if m else ("", "", "")
        if not m or ext not in ("safetensors", "json") or not _STEM.fullmatch(stem) or m[2] in into:
            _damaged(folder, MANIFEST, f"line {number} is not understood: {line!r}")
        into[m[2]] = m[1]
    if sizes.keys() != digests.keys():
        _damaged(folder, MANIFEST, f"{sorted(sizes.keys() ^ digests.keys())} lack a size or a SHA-256 line")
    return {name: (int(sizes[name]), digests[name]) for name in digests}


def _check_files(folder: Path, listed: dict[str, tuple[int, str]]) -> None:
    """The cheap checks: no unlisted file, every listed one a regular file of the right size."""
    if extra := sorted({p.name for p in folder.iterdir()} - set(listed) - {MANIFEST}):
        _damaged(folder, extra[0], f"not listed in {MANIFEST}" + (f" (nor are {extra[1:]})" if extra[1:] else "")
                 + ": something changed the checkpoint after it was written")
    for name, (size, _) in listed.items():
        try:
            st = os.lstat(folder / name)
        except FileNotFoundError:
            _damaged(folder, name, f"missing (listed in {MANIFEST})")
        if not stat.S_ISREG(st.st_mode):
            _damaged(folder, name, "not a regular file")
        if st.st_size != size:
            _damaged(folder, name, f"{st.st_size} bytes where {size} were written: truncated or overwritten")


def verify_checkpoint(folder) -> None:
    """Raise CheckpointError naming the file and the fault unless every byte of `folder` is as written."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {folder} does not exist or is not a folder", path=folder,
                              reason="no such folder")
    listed = _read_manifest(folder)
    _check_files(folder, listed)
    for name, (_, digest) in listed.items():
        try:
            with open(folder / name, "rb") as f:
                actual = hashlib.file_digest(f, "sha256").hexdigest()
        except OSError as exc:
            _damaged(folder, name, f"unreadable ({exc})")
        if actual != digest:
            _damaged(folder, name, "SHA-256 differs from the manifest: its bytes changed (disk error or an edit)")


def read_checkpoint(folder) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, object]]:
    """Verify `folder`, then load it: (stem -> named tensors, stem -> JSON value)."""
    folder = Path(folder)
    verify_checkpoint(folder)
    tensors, documents = {}, {}
    for name, (size, digest) in sorted(_read_manifest(folder).items()):
        data = (folder / name).read_bytes()  # parsed from the very bytes hashed here: nothing can change in between
        if len(data) != size or hashlib.sha256(data).hexdigest() != digest:
            _damaged(folder, name, "changed while being read")
        stem, _, ext = name.rpartition(".")
        (tensors if ext == "safetensors" else documents)[stem] = _parse(ext, data)
    return tensors, documents


def _parse(ext: str, data: bytes):
    if ext == "json":
        return json.loads(data)
    return {key: t.clone() for key, t in load(data).items()}  # clone: own, writable memory, not the bytes'


# ----------------------------------------------------------------------------------------------- finding
def find_checkpoints(run_or_checkpoints_dir) -> list[Path]:
    """The step_N folders (and step_N.replaced, just before its step_N) of a run, by step ascending."""
    path = Path(run_or_checkpoints_dir)
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if not folder.is_dir():
        return []
    found = [(int(m[1]), m[2] is None, p) for p in folder.iterdir() if (m := _STEP.fullmatch(p.name)) and p.is_dir()]
    return [p for *_, p in sorted(found)]


def checkpoint_step(folder) -> int:
    if not (m := _STEP.fullmatch(Path(folder).name)):
        raise CheckpointError(f"{folder}: not a checkpoint folder (expected a name like step_000100)", path=folder)
    return int(m[1])


def newest_intact(path) -> tuple[Path, list[tuple[Path, str]]]:
    """A checkpoint folder (verified) or the newest intact one of a run, plus the newer ones skipped and why."""
    path = Path(path)
    if _STEP.fullmatch(path.name) or (path / MANIFEST).exists():
        verify_checkpoint(path)
        return path, []
    skipped = []
    for candidate in reversed(find_checkpoints(path)):
        try:
            verify_checkpoint(candidate)
            return candidate, skipped
        except CheckpointError as exc:
            skipped.append((candidate, exc.reason))
    if not skipped:
        raise CheckpointError(f"no checkpoint in {path}: looked for step_NNNNNN folders in {path / 'checkpoints'} "
                              f"and {path}", path=path)
    listing = "\n  ".join(f"{p.name}: {reason}" for p, reason in skipped)
    raise CheckpointError(f"no intact checkpoint in {path}; every one is damaged:\n  {listing}\n"
                          "Start the run again, or restore a checkpoint from a backup.", path=path)


# ----------------------------------------------------------------------------------------------- pruning
def prune_checkpoints(checkpoints_dir, *, keep: int, keep_best: bool = True, max_age_days: float = 0.0,
                      protect: Path | None = None) -> list[Path]:
    """Remove checkpoints; returns the removed ones. Kept: the newest `keep` undamaged ones, the one with the lowest
    finite state.json "validation_loss" (where there is one; else "smoothed_loss") (`keep_best`) and `protect`. With keep >= 1 every other one is removed;
    keep=0 sets no count limit, and then only those whose manifest is older than `max_age_days` (> 0) go.
    "Undamaged" here is the cheap check (manifest, file sizes, state.json's hash); verify before resuming."""
    if keep < 0:
        raise ValueError(f"keep={keep!r}: must be 0 (no count limit) or more")
    folder = Path(checkpoints_dir)
    _clean_leftovers(folder)
    found = [p for p in find_checkpoints(folder) if not p.name.endswith(".replaced")]
    states = {p: _quick_state(p) for p in found}  # None: damaged
    kept = set([p for p in found if states[p] is not None][-keep:] if keep else [])
    # The best: the lowest held-out validation loss where the run measured one, else the lowest smoothed loss.
    judged = "validation_loss" if any(_finite(s, "validation_loss") for s in states.values()) else "smoothed_loss"
    losses = [(s[judged], p) for p, s in states.items() if _finite(s, judged)]
    if keep_best and losses:
        kept.add(min(losses)[1])
    kept |= {p for p in found if protect is not None and p.resolve() == Path(protect).resolve()}
    removed = []
    for p in (p for p in found if p not in kept):
        manifest = p / MANIFEST if (p / MANIFEST).exists() else p
        if keep or (max_age_days > 0 and time.time() - manifest.stat().st_mtime > max_age_days * 86400):
            if states[p] is None:
                log.warning("removing damaged checkpoint %s", p)
            _remove(p)
            removed.append(p)
    return removed


def _finite(state, key: str) -> bool:
    return isinstance(state, dict) and isinstance(state.get(key), (int, float)) and math.isfinite(state[key])


def _quick_state(folder: Path) -> dict | None:
    """state.json's content ({} when there is none) if the cheap checks pass, else None."""
    try:
        listed = _read_manifest(folder)
        _check_files(folder, listed)
        if "state.json" not in listed:
            return {}
        data = (folder / "state.json").read_bytes()
        return json.loads(data) if hashlib.sha256(data).hexdigest() == listed["state.json"][1] else None
    except (CheckpointError, OSError, ValueError):
        return None
