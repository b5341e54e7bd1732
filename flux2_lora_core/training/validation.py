"""A held-out validation loss (`data.validation_split`, every `train.validate_every` steps): the training loss on
images the LoRA never trains on, at fixed noise and fixed noise levels, so its curve moves only with the weights.

The training loss of a diffusion model is mostly noise: every step draws new noise and a new noise level, so a
LoRA that has started to memorise its images shows no sign in it. On held-out images with the draws fixed, the
loss falls while the LoRA learns what generalises and turns up once it overfits; the checkpoint kept as "best"
is then the one with the lowest validation loss instead of the lowest smoothed training loss.

The held-out images are either chosen by the seed from the image paths (so the same data and seed hold out the
same images on every machine), cached with the rest and left out of the batch streams, or a folder of their own
(data.validation_path, cached as a dataset of its own by the same encoders). Each is scored at the run's last
resolution, with its own caption, at the noise levels LEVELS with noise drawn from a generator seeded anew at
every evaluation.
"""

from __future__ import annotations

import hashlib
import logging

import torch

from ..errors import ConfigError
from .flow_matching import session_loss

log = logging.getLogger(__name__)

LEVELS = (0.2, 0.4, 0.6, 0.8)   # the noise levels (sigmas) each held-out image is scored at: one batch of 4


def held_out(cache, split: float, seed: int) -> list[int]:
    """Indices of the cached images held out for validation: round(split x images), at least one, never all."""
    if not split:
        return []
    count = max(1, round(len(cache) * split))
    if count >= len(cache):
        raise ConfigError([("data.validation_split", f"{split} of {len(cache)} images holds out {count}: none would "
                                                      "be left to train on; lower it or add images")])
    order = sorted(range(len(cache)),
                   key=lambda i: hashlib.sha256(f"{seed}:{cache.items[i].path}".encode()).hexdigest())
    chosen = sorted(order[:count])
    log.info("validation: %d of %d images held out (%s%s)", count, len(cache),
             ", ".join(cache.items[i].path for i in chosen[:3]), ", ..." if count > 3 else "")
    return chosen


class Validator:
    """The validation loss of a session's transformer on the held-out images."""

    def __init__(self, indices: list[int], resolution: int, seed: int, cache=None):
        """`cache`: where the held-out images are (a validation folder's own); None: the training cache."""
        self.indices, self.resolution, self.seed, self.cache = indices, resolution, seed, cache

    def close(self) -> None:
        if self.cache is not None:   # a validation folder's own cache
            self.cache.close()

    @torch.no_grad()
    def loss(self, s) -> float:
        """Mean loss over the held-out images and LEVELS, in eval mode (no LoRA dropout), as training computes it."""
        generator = torch.Generator("cpu").manual_seed(self.seed)   # the same noise at every evaluation
        sigmas = torch.tensor(LEVELS, device=s.device)
        was_training = s.transformer.training
        s.transformer.eval()
        total = torch.zeros((), device=s.device)
        cache = self.cache or s.cache
        try:
            for index in self.indices:
                x0 = cache.latent(index, self.resolution)                      # (128, h, w)
                noise = torch.randn((len(LEVELS), *x0.shape), generator=generator)
                x0 = x0.to(s.device, s.dtype)[None].expand(len(LEVELS), *x0.shape)
                text = cache.text(index).to(s.device, s.dtype)[None].expand(len(LEVELS), -1, -1)
                refs = cache.references(index, self.resolution)                # (n, 128, h, w) or None
                if refs is not None:
                    refs = refs.to(s.device, s.dtype)[None].expand(len(LEVELS), *refs.shape)
                total += session_loss(s, x0, text, noise.to(s.device, s.dtype), sigmas, refs).float()
        finally:
            s.transformer.train(was_training)
        return float(total) / len(self.indices)


def validator_for(config, cache, held_cache=None) -> tuple[Validator | None, list[int]]:
    """(the run's Validator or None, the held-out indices the batch streams leave out). `held_cache`: the
    validation folder's cache (validation_cache), whose every image is scored."""
    if held_cache is not None:
        return Validator(list(range(len(held_cache))), config.data.resolution[-1], config.train.seed + 1,
                         held_cache), []
    indices = held_out(cache, config.data.validation_split, config.train.seed)
    if not indices:
        return None, []
    return Validator(indices, config.data.resolution[-1], config.train.seed + 1), indices


def validation_cache(config, encoders, team=None):
    """The validation folder's latent cache (None without data.validation_path): the same encoders and settings as
    the training data at the run's last resolution (the one scored), one repeat, no flips; every image is scored."""
    if not config.data.validation_path:
        return None
    from ..cache import cache_for_config

    held = config.replace(data={"path": config.data.validation_path, "validation_path": "", "repeats": 1,
                                "flip": False, "resolution": config.data.resolution[-1:]})   # the one scored
    cache, _ = cache_for_config(held, encoders=encoders, team=team)
    log.info("validation: %d images of %s", len(cache), config.data.validation_path)
    return cache
