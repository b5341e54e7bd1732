"""A folder of tensors that survives crashes: safetensors shards plus one JSON manifest.

The latent cache is only worth having if it can be trusted across runs, graphs and restarts: a
shard half-written when the power went, a byte flipped on disk or a manifest from an older version
must never feed stale or garbage tensors to training. So:

- shards are written whole to a temporary name, flushed and renamed (a reader sees all or nothing);
- the manifest, written the same way and last, is the only thing that makes a shard's entries live;
- a build writes a shard as soon as one fills (or has waited FLUSH_SECONDS) and then the manifest, and again
  when it is interrupted (`save`), so Ctrl+C keeps everything encoded and a killed build loses at most the
  unwritten shard: the next build finds the listed entries and encodes only the rest;
- every shard's size and SHA-256 are in the manifest, checked on open ("quick": size and header,
  "full": also the hash), and a damaged shard's entries are dropped, so the builder re-encodes them;
- files the manifest does not know (left by a crash) are deleted when a build completes (`commit`), and only
  then are entries that build did not ask for dropped: an interrupted build never deletes anything.

Reading is memory-mapped through safetensors' `safe_open`: nothing is unpickled, and training holds
only the pages it touches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from ..data import file_sha256
from ..disk import write_atomically
from ..errors import Flux2LoraError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SHARD_BYTES = 256 << 20  # a shard is written once this much is pending: bounds the memory a build holds
FLUSH_SECONDS = 60.0     # ...or once the oldest pending tensor is this old: what a killed build can lose at most
VERIFY_MODES = ("quick", "full")


class ShardStore:
    """Named tensors in shards under `folder`, described by `folder/manifest.json`.

    `identity` is what the tensors depend on (format version, model fingerprint, encoding settings):
    a manifest with a different identity is discarded whole, so entries never outlive their model.
    `entries` maps a key to {"shard": file name, **info}; `extra` is free-form state the owner keeps.
    `lists=False`: a helper's store (another torchrun rank) that writes shards but never the manifest, which
    belongs to the process holding the folder's lock.
    """

    def __init__(self, folder: Path, identity: dict, *, lists: bool = True):
        self.folder = Path(folder)
        self.identity = identity
        self.lists = lists
        self.entries: dict[str, dict] = {}
        self.shards: dict[str, dict] = {}  # file name -> {"bytes": int, "sha256": str}
        self.extra: dict = {}
        self.damaged: list[tuple[str, str]] = []  # (shard file, reason) found by verify()
        self._pending: dict[str, tuple[torch.Tensor, dict]] = {}  # key -> (tensor, info), not yet in a shard
        self._pending_bytes = 0
        self._pending_since: float | None = None  # time.monotonic() of the oldest pending tensor
        self._readers: dict[str, object] = {}

    # ------------------------------------------------------------------------------------------ reading
    def load(self, verify: str = "quick") -> ShardStore:
        """Read the manifest and check every shard it names; damaged shards lose their entries."""
        path = self.folder / MANIFEST
        if not path.is_file():
            return self
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
            stale = manifest.get("identity") != self.identity
            entries, shards, extra = dict(manifest["entries"]), dict(manifest["shards"]), dict(manifest.get("extra", {}))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("cache manifest %s is unreadable (%s): rebuilding this cache", path, exc)
            return self
        if stale:
            log.info("cache in %s was built for other settings or another model: rebuilding it", self.folder)
            return self
        self.entries, self.shards, self.extra = entries, shards, extra
        self.verify(verify)
        return self

    def verify(self, mode: str = "quick") -> list[tuple[str, str]]:
        """Check each shard (size and header; with "full" also SHA-256); drop the entries of damaged ones."""
        for name, info in list(self.shards.items()):
            reason = self._check_shard(name, info, full=mode == "full")
            if reason:
                log.warning("cache shard %s is damaged (%s): its %d entries will be re-encoded", self.folder / name,
                            reason, sum(1 for e in self.entries.values() if e["shard"] == name))
                self.damaged.append((name, reason))
                del self.shards[name]
        self.entries = {k: e for k, e in self.entries.items() if e["shard"] in self.shards}
        return self.damaged

    def _check_shard(self, name: str, info: dict, *, full: bool) -> str | None:
        path = self.folder / name
        try:
            size = path.stat().st_size
        except OSError:
            return "missing"
        if size != info["bytes"]:
            return f"{size} bytes instead of {info['bytes']}: truncated or overwritten"
        try:
            with safe_open(str(path), framework="pt") as f:
                present = set(f.keys())
        except Exception as exc:  # safetensors raises its own error types for a bad header
            return f"unreadable header ({exc})"
        wanted = {key for key, e in self.entries.items() if e["shard"] == name}
        if not wanted <= present:
            return f"{len(wanted - present)} tensors missing"
        if full:
            try:
                digest = file_sha256(path)
            except Flux2LoraError as exc:
                return f"unreadable ({exc})"
            if digest != info["sha256"]:
                return "SHA-256 mismatch: the file's bytes changed"
        return None

    def get(self, key: str) -> torch.Tensor:
        """One tensor, memory-mapped from its shard (copy it before changing it in place)."""
        entry = self.entries[key]
        reader = self._readers.get(entry["shard"])
        if reader is None:
            reader = self._readers[entry["shard"]] = safe_open(str(self.folder / entry["shard"]), framework="pt")
        return reader.get_tensor(key)

    def close(self) -> None:
        self._readers.clear()

    def __getstate__(self):  # open readers are not picklable; they reopen lazily
        state = self.__dict__.copy()
        state["_readers"] = {}
        return state

    # ------------------------------------------------------------------------------------------ writing
    def put(self, key: str, tensor: torch.Tensor, **info) -> None:
        """Stage a tensor. When a shard's worth is pending, or the oldest pending tensor has waited FLUSH_SECONDS,
        the shard is written and listed in the manifest (`save`): a killed build loses at most that much work."""
        tensor = tensor.detach().to("cpu").contiguous()
        self._pending[key] = (tensor, info)  # one assignment: an interrupt never leaves half an entry staged
        self._pending_bytes += tensor.numel() * tensor.element_size()
        if self._pending_since is None:
            self._pending_since = time.monotonic()
        if self._pending_bytes >= SHARD_BYTES or time.monotonic() - self._pending_since >= FLUSH_SECONDS:
            self.save()

    def flush(self) -> None:
        """Write the staged tensors as one new shard and make them entries in memory (`save` lists them on disk)."""
        if not self._pending:
            return
        pending = self._pending
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"shard-{uuid.uuid4().hex[:16]}.safetensors"
        data = save({key: tensor for key, (tensor, _) in pending.items()}, metadata={"format": "pt"})
        write_atomically(self.folder / name, data)
        # Interrupted from here on, a second flush writes the same tensors again: the first shard is then a
        # leftover the next complete build deletes, never an entry pointing at missing data.
        self.shards[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        self.entries.update({key: {"shard": name, **info} for key, (_, info) in pending.items()})
        self._pending, self._pending_bytes, self._pending_since = {}, 0, None

    def save(self) -> None:
        """Flush and write the manifest with every entry so far: what an interrupted or killed build keeps.

        Deletes nothing and drops no entry (other datasets' or settings' entries wait for `commit`), so it is
        safe at any moment of a build; every entry it lists is in a shard already written whole."""
        self.flush()
        if self.lists:
            self._write_manifest()

    def commit(self, keep: set[str] | None = None) -> None:
        """The end of a complete build: flush, keep only the entries in `keep` (all when None), write the
        manifest, delete dead files."""
        self.flush()
        if keep is not None:
            self.entries = {k: e for k, e in self.entries.items() if k in keep}
        self._write_manifest()
        self.close()
        for path in self.folder.iterdir():
            if path.name != MANIFEST and path.name not in self.shards and path.is_file():
                try:  # replaced shards and leftovers of interrupted builds
                    path.unlink(missing_ok=True)
                except OSError as exc:  # Windows keeps files another process has mapped: next build retries
                    log.debug("could not delete %s yet: %s", path, exc)

    def _write_manifest(self) -> None:
        live = {e["shard"] for e in self.entries.values()}
        self.shards = {name: info for name, info in self.shards.items() if name in live}
        self.folder.mkdir(parents=True, exist_ok=True)
        manifest = {"identity": self.identity, "shards": self.shards, "entries": self.entries, "extra": self.extra}
        write_atomically(self.folder / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode("utf-8"))

    @property
    def bytes_on_disk(self) -> int:
        return sum(info["bytes"] for info in self.shards.values())
