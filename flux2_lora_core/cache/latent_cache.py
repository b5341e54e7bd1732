"""The latent cache: every (image, bucket) through the VAE once and every caption through the text
encoder once, kept on disk across runs, graphs and restarts.

Encoding is the slow part of a naive trainer (audit 1.2, 1.3, 2.3), and the encoders are the big
part of its memory: with everything cached, training needs neither. A build therefore

1. plans: hashes each image's bytes (memoised by size and mtime) and caption, and picks its bucket at
   every resolution of the schedule;
2. reuses every entry whose key (image hash, resolution, bucket, flip) or caption hash is already in
   the store for this exact model and encoding, and loads an encoder only if something is missing;
3. encodes the rest, writes new shards, then the manifests (see store.py), and releases the
   encoders before it returns.

A build that stops early (Ctrl+C, SIGTERM, ComfyUI's Cancel raised from `progress`, an error) lists what
it encoded in the manifests before the exception goes on, and a killed one has listed every full shard:
the next build reuses those entries and encodes only the rest.

The empty caption is always cached, so caption dropout works without the text encoder. With flips
on, both orientations are encoded: a flipped latent is never derived from an unflipped one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections import defaultdict
from pathlib import Path

import torch

from ..config import default_cache_dir
from ..data import DatasetItem, assign_bucket, file_sha256, load_image_rgb, probe_image
from ..disk import write_atomically
from ..errors import ConfigError, DatasetError, Flux2LoraError
from ..models import free_memory
from .encoding import check_mode, encode_images, encode_prompts, image_to_pixels
from .index import (
    CACHE_FORMAT_VERSION,
    INDEX,
    CachedItem,
    CacheSettings,
    CacheSummary,
    LatentCache,
    index_of,
    open_latent_cache,
    text_key,
)
from .store import VERIFY_MODES, ShardStore

log = logging.getLogger(__name__)



# ---------------------------------------------------------------------------------------------- build
def dataset_cache_root(cache_dir, dataset) -> Path:
    """One folder per dataset location, named so users can tell which is which."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", dataset.root.name)[:40] or "dataset"
    where = hashlib.sha256(str(dataset.root.resolve()).encode()).hexdigest()[:10]
    return Path(cache_dir or default_cache_dir()).expanduser() / f"{slug}-{where}"


def _check(settings: CacheSettings, family: str, batch_size: int, verify: str) -> None:
    check_mode(family, settings.text_conditioning)
    problems = []
    if batch_size < 1:
        problems.append(("cache.batch_size", f"{batch_size!r} must be at least 1"))
    if verify not in VERIFY_MODES:
        problems.append(("cache.verify", f"{verify!r} is not a verify mode: choose one of {', '.join(VERIFY_MODES)}"))
    if not settings.resolutions:
        problems.append(("data.resolution", "no resolution given"))
    if problems:
        raise ConfigError(problems)
    for resolution in settings.resolutions:
        settings.bucket_list(resolution)  # raises ConfigError for a bad resolution or max_aspect


def _image_hash(path: Path, memo: dict, rel: str) -> tuple[str, int, int]:
    """(sha256, width, height) of an image, re-read only when its size or mtime changed."""
    st = os.stat(path)
    stamp = [st.st_size, st.st_mtime_ns]
    known = memo.get(rel)
    if known and known[:2] == stamp:
        return known[2], known[3], known[4]
    info = probe_image(path)
    digest = file_sha256(path)
    memo[rel] = [*stamp, digest, info.width, info.height]
    return digest, info.width, info.height


def build_latent_cache(dataset, encoders, settings: CacheSettings = CacheSettings(), *, cache_dir=None,
                       batch_size: int = 4, verify: str = "quick", progress=None, prompts=(),
                       team=None) -> LatentCache:
    """Bring the cache for `dataset` up to date and return it (see the module docstring).

    `encoders` provides `family`, `fingerprint(part)` and context managers `vae()` /
    `text_encoder()` (see frozen_encoders.py); they are entered only when something must be encoded.
    `progress(phase, done, total)` is called as work completes ("latents", "captions").
    `prompts` (sample prompts) are encoded with the captions, so a run never loads the text encoder twice,
    and kept while the next build asks for them again; read them with `LatentCache.prompt(text)`.
    `team`: torchrun's processes filling the cache together (training.distributed.Team): rank 0 plans, every
    rank encodes a share and writes its own shards, rank 0 lists them all in the one manifest it writes.
    """
    from filelock import FileLock  # torch's own dependency: a lock that works on Windows too

    started = time.perf_counter()
    family = encoders.family
    _check(settings, family, batch_size, verify)
    root = dataset_cache_root(cache_dir, dataset)
    root.mkdir(parents=True, exist_ok=True)
    summary = CacheSummary()
    if team is not None and not team.main:
        return _help_build(dataset, encoders, settings, team, root, batch_size, verify)
    with FileLock(str(root / ".lock")):
        latents, texts = (store.load(verify) for store in _stores(root, encoders, settings))
        summary.rebuilt_shards = latents.damaged + texts.damaged
        extra = {text_key(p): p for p in prompts}
        known = (set(latents.entries), set(texts.entries))
        try:
            items, captions, todo = _plan(dataset, settings, latents, summary)
            missing = _missing_captions({**captions, **extra}, texts, summary)
            if team is not None:   # torchrun's ranks encode a share each
                todo, missing = _share_work(team, todo, missing)
            _encode_latents(dataset, encoders, todo, latents, batch_size, progress, summary)
            _encode_captions(encoders, missing, texts, family, settings, batch_size, progress, summary)
            if team is not None:
                _pool(team, (latents, texts), summary)
            empty_key = text_key("")
            # An item goes with any of its reference images, and with an entry an identical file's failure left out.
            skipped = {path for path, _ in summary.skipped}
            items = [item for item in items if item.path not in skipped and skipped.isdisjoint(item.references)
                     and item.all_latent_keys() <= latents.entries.keys()]
            if not items:
                raise DatasetError(f"no image of {dataset.root} could be cached:\n  "
                                   + "\n  ".join(f"{p}: {r}" for p, r in summary.skipped[:20]))
            latents.commit(keep={k for item in items for k in item.all_latent_keys()})
            texts.commit(keep={item.caption_key for item in items} | {empty_key} | extra.keys())
        except BaseException:  # Ctrl+C, SIGTERM, ComfyUI's Cancel, out of memory, a bad file...
            _keep_work(root, (latents, texts), known)
            raise
        summary.with_references = sum(bool(item.references) for item in items)
        summary.bytes_on_disk = latents.bytes_on_disk + texts.bytes_on_disk
        summary.seconds = time.perf_counter() - started
        cache = LatentCache(root, items, family, settings, latents, texts, empty_key, summary)
        write_atomically(root / INDEX, json.dumps(index_of(cache), indent=1).encode())
    if team is not None:
        team.barrier()   # the manifests and index are written: the other ranks may open them
    log.debug("latent cache %s: %s", root, summary.format_text())
    return cache


def _stores(root: Path, encoders, settings: CacheSettings, *, lists: bool = True) -> tuple[ShardStore, ShardStore]:
    """The latent and caption stores of these encoders and settings (not loaded yet)."""
    return (ShardStore(root / f"latents-{encoders.fingerprint('vae')[:16]}",
                       {"format": CACHE_FORMAT_VERSION, "kind": "latents", "vae": encoders.fingerprint("vae")},
                       lists=lists),
            ShardStore(root / f"text-{encoders.fingerprint('text')[:16]}-{settings.text_conditioning}",
                       {"format": CACHE_FORMAT_VERSION, "kind": "text", "family": encoders.family,
                        "text_encoder": encoders.fingerprint("text"), "mode": settings.text_conditioning},
                       lists=lists))


# ------------------------------------------------------------------------------------ several processes
def _share_of(team, todo: dict, missing: list) -> tuple[dict, list]:
    """This rank's part of the work: every team.world-th image of each bucket and caption (they come shortest
    first, so each rank gets long and short ones alike)."""
    return ({bucket: work[team.rank::team.world] for bucket, work in todo.items()},
            missing[team.rank::team.world])


def _share_work(team, todo: dict, missing: list) -> tuple[dict, list]:
    """Rank 0's plan on every rank (the others' own stores may be stale), then this rank's share of it."""
    return _share_of(team, *team.broadcast((todo, missing)))


def _pool(team, stores, summary) -> None:
    """Every rank's new shards and entries listed in rank 0's stores (each rank wrote its shards itself, under
    unique names), with the images any rank could not read. On the other ranks this only sends."""
    for store in stores:
        store.flush()
    mine = {"stores": [(store.entries, store.shards) for store in stores], "skipped": summary.skipped,
            "counts": (summary.images_encoded, summary.captions_encoded)}
    everyone = team.gather(mine if not team.main else None)
    if team.main:
        for theirs in everyone[1:]:
            for store, (entries, shards) in zip(stores, theirs["stores"]):
                store.entries.update(entries)
                store.shards.update(shards)
            summary.skipped.extend(theirs["skipped"])
            summary.images_encoded += theirs["counts"][0]
            summary.captions_encoded += theirs["counts"][1]


def _help_build(dataset, encoders, settings, team, root, batch_size, verify) -> LatentCache:
    """A rank other than 0: encode its share into shards of its own, hand them to rank 0, then open the cache
    rank 0 wrote. It takes no lock: rank 0 holds the folder's lock for the whole team."""
    summary = CacheSummary()
    latents, texts = _stores(root, encoders, settings, lists=False)
    todo, missing = _share_work(team, {}, [])
    _encode_latents(dataset, encoders, todo, latents, batch_size, None, summary)
    _encode_captions(encoders, missing, texts, encoders.family, settings, batch_size, None, summary)
    _pool(team, (latents, texts), summary)
    team.barrier()
    log.info("latent cache %s: this rank encoded %d latents and %d captions", root, summary.images_encoded,
             summary.captions_encoded)
    return open_latent_cache(root, verify=verify)


def _keep_work(root: Path, stores, known) -> None:
    """After an interrupted or failed build: list what was encoded in the manifests, so the next build encodes
    only the rest. Nothing is deleted (that waits for a complete build); the exception itself goes on."""
    try:
        for store in stores:
            store.save()
    except Exception as error:  # a full disk must not hide why the build stopped
        log.warning("latent cache %s: could not keep the work of the stopped build (%s)", root, error)
        return
    latents, captions = (len(store.entries.keys() - before) for store, before in zip(stores, known))
    if latents or captions:
        log.warning("latent cache %s: kept the %d latents and %d captions encoded before the stop; the next build "
                    "encodes only the rest", root, latents, captions)


def _plan(dataset, settings, latents, summary):
    """Items with their entry keys, the captions to look up, and the missing latents by bucket.

    An edit dataset's reference images are encoded at their target's bucket (resized and cropped to it as the
    target is, mirrored with it), so a sample's references have its grid and batch like it; an entry key names
    the pixels and the bucket, so a reference shared by several targets is encoded once per bucket."""
    memo = latents.extra.setdefault("files", {})
    items, captions, planned = [], {}, set()
    bucket_lists = {resolution: settings.bucket_list(resolution) for resolution in settings.resolutions}
    todo = defaultdict(list)  # (resolution, bucket) -> [(dataset item, keys)]
    flips = (False, True) if settings.flip else (False,)

    def plan(source, digest, resolution, bucket) -> tuple[str, ...]:
        keys = tuple(f"{digest}:{resolution}:{bucket[0]}x{bucket[1]}:{'flip' if f else 'plain'}" for f in flips)
        missing = [k for k in keys if k not in latents.entries and k not in planned]
        summary.images_reused += sum(k in latents.entries for k in keys)
        if missing:  # an exact duplicate image is encoded once
            planned.update(missing)
            todo[(resolution, bucket)].append((source, tuple(missing)))
        return keys

    for item in dataset.items:
        rel = dataset.relative_path(item)
        refs = tuple(dataset.relative_path(path) for path in item.references)
        try:
            digest, width, height = _image_hash(item.image_path, memo, rel)
            ref_digests = [_image_hash(path, memo, ref)[0] for path, ref in zip(item.references, refs)]
            caption = item.read_caption()
        except (Flux2LoraError, OSError) as exc:
            summary.skipped.append((rel, str(exc)))
            continue
        caption_key = text_key(caption)
        captions[caption_key] = caption
        buckets, keys, ref_keys = {}, {}, {}
        for resolution in settings.resolutions:
            bucket = buckets[resolution] = assign_bucket(width, height, bucket_lists[resolution])
            keys[resolution] = plan(item, digest, resolution, bucket)
            if refs:
                ref_keys[resolution] = tuple(plan(DatasetItem(path), ref_digest, resolution, bucket)
                                             for path, ref_digest in zip(item.references, ref_digests))
        items.append(CachedItem(rel, item.repeats, caption_key, buckets, keys, refs, ref_keys))
    live = {item.path for item in items} | {ref for item in items for ref in item.references}
    latents.extra["files"] = {rel: v for rel, v in memo.items() if rel in live}
    return items, captions, todo


def _encode_latents(dataset, encoders, todo, store, batch_size, progress, summary) -> None:
    total = sum(len(keys) for work in todo.values() for _, keys in work)
    if not total:
        return
    done = 0
    with encoders.vae() as vae:
        for (resolution, bucket), work in sorted(todo.items()):
            for start in range(0, len(work), batch_size):
                pixels, keys = [], []
                for item, item_keys in work[start:start + batch_size]:
                    try:
                        image = load_image_rgb(item.image_path)
                    except Flux2LoraError as exc:
                        summary.skipped.append((dataset.relative_path(item), str(exc)))
                        continue
                    for key in item_keys:
                        pixels.append(image_to_pixels(image, bucket, flip=key.endswith(":flip")))
                        keys.append(key)
                if keys:  # at most batch_size images per VAE call, both orientations of an image included
                    latents = torch.cat([_encode_with_backoff(vae, torch.stack(pixels[i:i + batch_size]))
                                         for i in range(0, len(pixels), batch_size)])
                    for key, latent in zip(keys, latents):
                        store.put(key, latent)
                    summary.images_encoded += len(keys)
                done += sum(len(k) for _, k in work[start:start + batch_size])
                if progress:  # may raise (ComfyUI's Cancel): the build keeps what was put so far
                    progress("latents", done, total)
    store.save()  # before the text encoder loads, which can take minutes: a killed build keeps every latent


def _encode_with_backoff(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Encode; on out-of-memory, halve the batch and go on rather than fail the build."""
    try:
        return encode_images(vae, pixels)
    except torch.OutOfMemoryError:
        if len(pixels) == 1:
            raise
        free_memory()
        half = len(pixels) // 2
        log.warning("out of memory encoding %d images at once: retrying in halves (lower cache.batch_size)",
                    len(pixels))
        return torch.cat([_encode_with_backoff(vae, pixels[:half]), _encode_with_backoff(vae, pixels[half:])])


def _missing_captions(captions, store, summary) -> list[tuple[str, str]]:
    """(key, text) of the captions (the empty one included) not in the store, shortest first: similar lengths
    batch together, less padding work."""
    captions = {**captions, text_key(""): ""}
    missing = [(key, text) for key, text in captions.items() if key not in store.entries]
    summary.captions_reused = len(captions) - len(missing)
    return sorted(missing, key=lambda kv: len(kv[1]))


def _encode_captions(encoders, missing, store, family, settings, batch_size, progress, summary) -> None:
    if not missing:
        return
    with encoders.text_encoder() as (text_encoder, tokenizer):
        for start in range(0, len(missing), batch_size):
            chunk = missing[start:start + batch_size]
            embeds = encode_prompts(text_encoder, tokenizer, [text for _, text in chunk], family=family,
                                    mode=settings.text_conditioning)
            for (key, _), embedding in zip(chunk, embeds):
                store.put(key, embedding, rows=int(embedding.shape[0]))
            summary.captions_encoded += len(chunk)
            if progress:
                progress("captions", summary.captions_encoded, len(missing))


def cache_for_config(config, *, encoders=None, progress=None, prompts=(), team=None):
    """(LatentCache, encoders) for a config's model, data and cache sections: what `flux2-lora cache`, the
    trainer and the Cache Latents node all do. Encoders open from config.model unless given. `team`: torchrun's
    ranks encoding a share each (build_latent_cache).

    The dataset is validated first, by the rule `flux2-lora validate` applies (data/report.py; data.min_images,
    data.strict, data.max_caption_tokens, caption lengths counted with the model's tokenizer): an unusable dataset
    is a DatasetError carrying the report, and images with errors are left out, named in the log and in the
    cache summary, so nothing is skipped without a word and nothing validate refuses is trained on.
    """
    from ..data import load_dataset, screen, skip_summary, validate_data
    from .frozen_encoders import open_encoders

    data = config.data
    dataset = load_dataset(data.path, caption_extensions=data.caption_extensions, trigger_word=data.trigger_word,
                           repeats=data.repeats, recursive=data.recursive, confine_to=data.confine_to,
                           references=data.references)
    encoders = encoders or open_encoders(config.model, config.cache)
    tokenizer = encoders.tokenizer() if hasattr(encoders, "tokenizer") else None
    report = validate_data(data, dataset=dataset, tokenizer=tokenizer,
                           text_conditioning=config.model.text_conditioning)
    dataset = screen(dataset, report)
    settings = CacheSettings(resolutions=data.resolution, buckets=data.buckets, max_aspect=data.max_aspect,
                             flip=data.flip, text_conditioning=config.model.text_conditioning)
    cache = build_latent_cache(dataset, encoders, settings, cache_dir=config.cache.resolved_dir,
                               batch_size=config.cache.batch_size, verify=config.cache.verify, progress=progress,
                               prompts=prompts, team=team)
    cache.summary.screened = skip_summary(report) if report.skipped else ""
    cache.summary.screened_out = len(report.skipped)
    return cache, encoders

