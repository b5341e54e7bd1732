"""What a built latent cache is on disk and to training: its index, settings and the reader.

`build_latent_cache` (latent_cache.py) writes it; training, a resumed run or another process reads
it through `LatentCache` without the dataset or the models: a small, picklable object (paths and an
index) whose shards open lazily, memory-mapped.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data import make_buckets
from ..errors import ConfigError, DatasetError
from .encoding import MAX_SEQUENCE_LENGTH, model_ready_embedding
from .store import ShardStore

CACHE_FORMAT_VERSION = 1
INDEX = "index.json"


def text_key(text: str) -> str:
    """A caption's or prompt's entry key: its text's SHA-256, so equal texts share one embedding."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class CacheSettings:
    """Everything besides the model and the data that changes what gets encoded."""

    resolutions: tuple[int, ...] = (1024,)
    buckets: bool = True        # aspect-ratio buckets; False: the square bucket only (centre crops)
    max_aspect: float = 4.0
    flip: bool = False          # also encode every image mirrored
    text_conditioning: str = "comfyui"

    def bucket_list(self, resolution: int) -> list[tuple[int, int]]:
        if not self.buckets:
            return [(resolution, resolution)]
        return make_buckets(resolution, max_aspect=self.max_aspect)


@dataclass
class CacheSummary:
    images_encoded: int = 0      # latents computed by this build (one per image, bucket and orientation)
    images_reused: int = 0
    captions_encoded: int = 0
    captions_reused: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (relative path, reason)
    rebuilt_shards: list[tuple[str, str]] = field(default_factory=list)  # (shard, what was wrong)
    bytes_on_disk: int = 0
    seconds: float = 0.0
    screened: str = ""  # validation's "usable: N of M images; these K will be skipped: ..." (data/report.py)
    screened_out: int = 0  # the K images of that line, left out before the build
    with_references: int = 0  # an edit dataset's images with reference images (their latents are counted above)

    def format_text(self) -> str:
        lines = [self.screened] if self.screened else []
        if self.with_references:
            lines.append(f"edit dataset: {self.with_references} images with reference images")
        lines += [f"latents: {self.images_encoded} encoded, {self.images_reused} reused; "
                 f"captions: {self.captions_encoded} encoded, {self.captions_reused} reused; "
                 f"{self.bytes_on_disk / 2**20:.1f} MiB on disk; {self.seconds:.1f} s"]
        lines += [f"rebuilt damaged shard {name}: {reason}" for name, reason in self.rebuilt_shards]
        lines += [f"skipped {path}: {reason}" for path, reason in self.skipped]
        return "\n".join(lines)


@dataclass(frozen=True)
class CachedItem:
    path: str                                   # relative to the dataset root
    repeats: int
    caption_key: str
    buckets: dict[int, tuple[int, int]]         # resolution -> (width, height)
    latent_keys: dict[int, tuple[str, ...]]     # resolution -> (plain, mirrored if flips are cached)
    # An edit dataset's reference images (relative paths) and their latents, encoded at the target's bucket:
    # resolution -> one (plain, mirrored) key tuple per reference. Empty for a text-to-image item.
    references: tuple[str, ...] = ()
    reference_keys: dict[int, tuple[tuple[str, ...], ...]] = field(default_factory=dict)

    def all_latent_keys(self) -> set[str]:
        return ({k for keys in self.latent_keys.values() for k in keys}
                | {k for refs in self.reference_keys.values() for keys in refs for k in keys})


class LatentCache:
    """A built cache: what training reads instead of images, captions and encoders.

    Small and picklable (paths and an index; shards are opened lazily, memory-mapped), so it can
    cross ComfyUI sockets and process boundaries.
    """

    def __init__(self, root: Path, items: list[CachedItem], family: str, settings: CacheSettings,
                 latents: ShardStore, texts: ShardStore, empty_key: str, summary: CacheSummary | None = None):
        self.root, self.items, self.family, self.settings = root, items, family, settings
        self._latents, self._texts, self.empty_key = latents, texts, empty_key
        self.summary = summary or CacheSummary()

    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        return f"LatentCache({str(self.root)!r}, {len(self.items)} images, {list(self.settings.resolutions)} px)"

    def latent(self, index: int, resolution: int, *, flipped: bool = False) -> torch.Tensor:
        """(128, h, w) normalised latent, memory-mapped."""
        keys = self.items[index].latent_keys[resolution]
        if flipped and len(keys) < 2:
            raise ConfigError([("data.flip", "flipped latents were not cached: rebuild the cache with data.flip=true")])
        return self._latents.get(keys[1 if flipped else 0])

    def text(self, index: int | None) -> torch.Tensor:
        """(L, D) prompt embedding as the transformer receives it; None gives the empty caption's."""
        key = self.empty_key if index is None else self.items[index].caption_key
        embedding = self._texts.get(key)
        return model_ready_embedding(embedding, family=self.family, mode=self.settings.text_conditioning)

    def text_length(self, index: int | None) -> int:
        """Rows of `text(index)`, from the index alone (no tensor read): a batch needs equal lengths."""
        key = self.empty_key if index is None else self.items[index].caption_key
        rows = int(self._texts.entries[key]["rows"])
        padded = self.family == "dev" and self.settings.text_conditioning == "comfyui"
        return max(rows, MAX_SEQUENCE_LENGTH) if padded else rows

    def prompt(self, text: str) -> torch.Tensor:
        """A sample prompt's (L, D) embedding, encoded by the build that was given it in `prompts`."""
        key = text_key(text)
        if key not in self._texts.entries:
            raise DatasetError(f"prompt {text!r} is not in the latent cache {self.root}: pass it to "
                               "build_latent_cache(prompts=...)")
        return model_ready_embedding(self._texts.get(key), family=self.family, mode=self.settings.text_conditioning)

    def references(self, index: int, resolution: int, *, flipped: bool = False) -> torch.Tensor | None:
        """(n, 128, h, w) the item's reference latents at its target's bucket, mirrored with it; None without."""
        refs = self.items[index].reference_keys.get(resolution, ())
        if not refs:
            return None
        if flipped and len(refs[0]) < 2:
            raise ConfigError([("data.flip", "flipped latents were not cached: rebuild the cache with data.flip=true")])
        return torch.stack([self._latents.get(keys[1 if flipped else 0]) for keys in refs])

    def bucket_members(self, resolution: int) -> dict[tuple[int, ...], list[int]]:
        """Indices by what a batch must share: the bucket, and for an edit dataset also the number of references
        ((w, h, n)), since every sample of a batch carries the same token count."""
        groups = defaultdict(list)
        for i, item in enumerate(self.items):
            count = len(item.reference_keys.get(resolution, ()))
            groups[item.buckets[resolution] + ((count,) if count else ())].append(i)
        return dict(sorted(groups.items()))

    @property
    def fingerprint(self) -> str:
        """Identity of what training will read (models, settings, every entry key)."""
        record = [self._latents.identity, self._texts.identity,
                  [(i.path, i.repeats, i.caption_key, sorted(i.latent_keys.items()))
                   + ((i.references, sorted(i.reference_keys.items())) if i.references else ()) for i in self.items]]
        return hashlib.sha256(json.dumps(record, sort_keys=True, default=list).encode()).hexdigest()

    def close(self) -> None:
        self._latents.close()
        self._texts.close()


def index_of(cache: LatentCache) -> dict:
    """What `open_latent_cache` needs to read a built cache without the dataset or the models."""
    return {"format": CACHE_FORMAT_VERSION, "family": cache.family, "empty_key": cache.empty_key,
            "settings": {**cache.settings.__dict__, "resolutions": list(cache.settings.resolutions)},
            "latents": cache._latents.folder.name, "texts": cache._texts.folder.name,
            "latents_identity": cache._latents.identity, "texts_identity": cache._texts.identity,
            "items": [{"path": i.path, "repeats": i.repeats, "caption_key": i.caption_key,
                       "buckets": {str(r): list(b) for r, b in i.buckets.items()},
                       "latent_keys": {str(r): list(k) for r, k in i.latent_keys.items()},
                       **({"references": list(i.references),
                           "reference_keys": {str(r): [list(k) for k in refs] for r, refs in i.reference_keys.items()}}
                          if i.references else {})} for i in cache.items]}


def open_latent_cache(root, *, verify: str = "quick") -> LatentCache:
    """Reopen a built cache from its folder (for a resumed run, or another process) without the models.

    CacheError-free by design: anything missing or damaged is a DatasetError telling the user to run
    the cache step again, which repairs exactly what is broken.
    """
    root = Path(root)
    fix = "run `flux2-lora cache` (or the Cache Latents node) again to repair it"
    try:
        index = json.loads((root / INDEX).read_text(encoding="utf-8"))
        if index.get("format") != CACHE_FORMAT_VERSION:
            raise DatasetError(f"latent cache {root} has format {index.get('format')!r}, this version reads "
                               f"{CACHE_FORMAT_VERSION}: {fix}")
        settings = CacheSettings(**{**index["settings"], "resolutions": tuple(index["settings"]["resolutions"])})
        items = [CachedItem(i["path"], i["repeats"], i["caption_key"],
                            {int(r): tuple(b) for r, b in i["buckets"].items()},
                            {int(r): tuple(k) for r, k in i["latent_keys"].items()}, tuple(i.get("references", ())),
                            {int(r): tuple(tuple(k) for k in refs) for r, refs in i.get("reference_keys", {}).items()})
                 for i in index["items"]]
        latents = ShardStore(root / index["latents"], index["latents_identity"]).load(verify)
        texts = ShardStore(root / index["texts"], index["texts_identity"]).load(verify)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"latent cache {root} cannot be read ({exc}): {fix}") from None
    wanted = {k for item in items for k in item.all_latent_keys()}
    missing = len(wanted - latents.entries.keys())
    missing += len(({i.caption_key for i in items} | {index["empty_key"]}) - texts.entries.keys())
    if missing:
        raise DatasetError(f"latent cache {root} is incomplete or damaged ({missing} entries unreadable): {fix}")
    return LatentCache(root, items, index["family"], settings, latents, texts, index["empty_key"])
