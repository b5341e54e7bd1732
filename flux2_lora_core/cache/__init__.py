"""The latent cache: what the frozen VAE and text encoder make of every image and caption (FLUX.2's exact recipes),
kept on disk in verified shards so later runs load no encoder. Above data/ and models/, below training."""

from ..exports import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "encoding": ("decoder_latents", "fit_image", "pack_latents"),
    "frozen_encoders": ("open_encoders", "source_fingerprint"),
    "index": ("CacheSettings", "CacheSummary", "CachedItem", "LatentCache", "open_latent_cache"),
    "latent_cache": ("build_latent_cache", "cache_for_config", "dataset_cache_root"),
})
