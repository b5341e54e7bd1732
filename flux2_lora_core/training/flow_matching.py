"""The FLUX.2 flow-matching training step, as pure functions over tensors.

FLUX.2 is a rectified flow: a noise level sigma in (0, 1) mixes a clean latent x0 with Gaussian noise
on a straight line, x_t = (1 - sigma) x0 + sigma noise, and the transformer predicts that line's
velocity, noise - x0. One training step samples sigma, builds x_t, asks the model and takes the
squared error. tests/core/test_flow_matching.py checks the whole step against a line-by-line
transcription of diffusers' examples/dreambooth/train_dreambooth_lora_flux2{,_klein}.py.

An edit LoRA's step also gives the model reference images: their clean latents follow the noisy target's
tokens, each with position ids of its own (time coordinate 10, 20, ... as Flux2Pipeline._prepare_image_ids and
ComfyUI's FLUX.2 "index" reference method number them), and the loss covers the target's tokens only, as
train_dreambooth_lora_flux2_img2img.py computes it.

Latents here are the cached ones: BatchNorm-normalised, 2x2-patchified grids (B, 128, h, w)
(encoding.encode_images); the transformer sees them packed row-major as (B, h*w, 128) tokens.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from contextlib import nullcontext

import torch

from ..cache import pack_latents

SIGMA_METHODS = ("uniform", "logit_normal", "mode")
LOSS_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")
MU_SCHEDULES = ("empirical", "linear")
SIGMA_EPS = 1e-5  # sampled sigmas stay in [eps, 1 - eps]: sigma^-2 weighting and 1/sigma stay finite
# The pipelines' default num_inference_steps: which sampler's noise levels an "empirical" shift trains on.
DEFAULT_SHIFT_STEPS = 50
# FLUX.2's scheduler_config.json (and FLUX.1's): mu rises linearly from 0.5 at 256 tokens to 1.15 at 4096.
BASE_SEQ_LEN, BASE_MU, MAX_SEQ_LEN, MAX_MU = 256, 0.5, 4096, 1.15
# The time coordinate of the i-th reference image (0-based) is REFERENCE_SCALE (i + 1): the pipelines'
# _prepare_image_ids(scale=10) and ComfyUI's ref_index_scale for FLUX.2.
REFERENCE_SCALE = 10


# ---------------------------------------------------------------------------------------------- positions
def image_ids(height: int, width: int, device=None) -> torch.Tensor:
    """(h*w, 4) int64 rows (0, y, x, 0), row-major: Flux2Pipeline._prepare_latent_ids for one sample.

    One 2-D tensor, not (B, h*w, 4): the transformer reads only the first sample's ids anyway.
    """
    one = torch.arange(1, device=device)
    return torch.cartesian_prod(one, torch.arange(height, device=device), torch.arange(width, device=device), one)


def text_ids(length: int, device=None) -> torch.Tensor:
    """(L, 4) int64 rows (0, 0, 0, l): Flux2Pipeline._prepare_text_ids for one prompt."""
    one = torch.arange(1, device=device)
    return torch.cartesian_prod(one, one, one, torch.arange(length, device=device))


def reference_ids(count: int, height: int, width: int, device=None) -> torch.Tensor:
    """(count*h*w, 4) int64 rows (10 (i + 1), y, x, 0) for `count` reference grids of h x w, one after another:
    Flux2Pipeline._prepare_image_ids for one sample. References of an edit dataset are cached at their target's
    bucket, so every reference of a sample has the target's grid."""
    grid = image_ids(height, width, device).repeat(count, 1)           # (count*h*w, 4), time coordinate 0
    grid[:, 0] = REFERENCE_SCALE * torch.arange(1, count + 1, device=device).repeat_interleave(height * width)
    return grid


class PositionIds:
    """Position ids per (resolution, prompt length, references, device), each built once, at most `maxsize` kept.

    Buckets make a handful of resolutions recur for the whole run; the bound keeps memory flat when
    a dataset has many. Least recently used entries go first.
    """

    def __init__(self, maxsize: int = 8):
        if maxsize < 1:
            raise ValueError(f"PositionIds maxsize must be at least 1, got {maxsize!r}")
        self.maxsize = maxsize
        self._entries: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def get(self, height: int, width: int, text_length: int, device,
            references: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(img_ids ((1 + references) h*w, 4): the target's, then its references', txt_ids (L, 4)); the very same
        tensors on every hit."""
        key = (height, width, text_length, str(torch.device(device)), references)
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        img = image_ids(height, width, device)
        if references:
            img = torch.cat([img, reference_ids(references, height, width, device)])
        value = (img, text_ids(text_length, device))
        self._entries[key] = value
        while len(self._entries) > self.maxsize:
            self._entries.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._entries)


# ---------------------------------------------------------------------------------------------- noise levels
def sample_sigmas(batch: int, *, method: str, generator: torch.Generator, logit_mean: float = 0.0,
                  logit_std: float = 1.0, mode_scale: float = 1.29) -> torch.Tensor:
    """(B,) float32 noise levels in (0, 1), one per sample, on the generator's device.

    "uniform": every noise level alike. "logit_normal": sigmoid(N(logit_mean, logit_std)), SD3's
    choice that spends the steps on middle noise levels; a positive mean means more noise.
    "mode": SD3's mode sampling, 1 - u - s (cos^2(pi u / 2) - 1 + u), heavier in the middle for s > 0.
    diffusers' script samples the same u but trains on sigma = 1 - floor(1000 u) / 1000 (its
    scheduler's timesteps run from 1000 down); for uniform, mode and a zero logit mean that is the same
    distribution up to the 1/1000 grid, for a non-zero mean its sign is flipped.
    """
    device = generator.device
    if method == "uniform":
        sigmas = torch.rand(batch, generator=generator, device=device)
    elif method == "logit_normal":
        sigmas = torch.sigmoid(logit_mean + logit_std * torch.randn(batch, generator=generator, device=device))
    elif method == "mode":
        u = torch.rand(batch, generator=generator, device=device)
        sigmas = 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    else:
        raise ValueError(f"unknown sigma sampling method {method!r}: choose one of {', '.join(SIGMA_METHODS)}")
    return sigmas.float().clamp(SIGMA_EPS, 1 - SIGMA_EPS)


def empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """The FLUX.2 pipelines' compute_empirical_mu: two linear fits in the token count, at 10 and 200
    sampling steps, interpolated linearly in the step count (beyond 4300 tokens only the 200-step fit)."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200 = a2 * image_seq_len + b2
    m_10 = a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    return float(a * num_steps + m_200 - 200.0 * a)


def linear_mu(image_seq_len: int) -> float:
    """FLUX.1's resolution shift (diffusers' calculate_shift over the FLUX.2 scheduler config's numbers)."""
    slope = (MAX_MU - BASE_MU) / (MAX_SEQ_LEN - BASE_SEQ_LEN)
    return float(image_seq_len * slope + BASE_MU - slope * BASE_SEQ_LEN)


def shift_sigmas(sigmas: torch.Tensor, image_seq_len: int, *, mu_schedule: str = "empirical",
                 num_steps: int = DEFAULT_SHIFT_STEPS) -> torch.Tensor:
    """Move noise levels towards 1 the more image tokens there are: sigma' = e^mu / (e^mu + 1/sigma - 1).

    More tokens carry more redundant signal, so the same sigma destroys less of the image; the shift
    keeps the amount of destroyed structure comparable across resolutions. The formula is the
    scheduler's exponential time_shift. "empirical" takes mu from the FLUX.2 pipelines'
    compute_empirical_mu with `num_steps` (default 50, the pipelines' default num_inference_steps),
    so training visits noise levels with the density a default 50-step sampler does; that mu falls
    as the step count rises and ignores it above 4300 tokens. "linear" takes FLUX.1's mu (0.5 at 256
    tokens to 1.15 at 4096, the numbers in FLUX.2's scheduler config), reportedly what BFL trained
    FLUX.2 with; it is much weaker (e^mu = 3.16 against 7.6 at 4096 tokens). diffusers' training
    script applies no shift at all.
    """
    if mu_schedule == "empirical":
        mu = empirical_mu(image_seq_len, num_steps)
    elif mu_schedule == "linear":
        mu = linear_mu(image_seq_len)
    else:
        raise ValueError(f"unknown mu schedule {mu_schedule!r}: choose one of {', '.join(MU_SCHEDULES)}")
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))  # (B,)


# ---------------------------------------------------------------------------------------------- the step
def _per_sample(sigmas: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigmas.reshape(-1, *([1] * (like.ndim - 1)))  # (B, 1, 1, 1)


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - sigma) x0 + sigma noise, per sample: (B, 128, h, w), in float32 if sigmas are."""
    s = _per_sample(sigmas, x0)
    return (1.0 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """d x_t / d sigma = noise - x0, the velocity the model learns; float32 so bf16 caches lose nothing."""
    return noise.float() - x0.float()  # (B, 128, h, w)


def predict_velocity(transformer, x_t: torch.Tensor, prompt_embeds: torch.Tensor, sigmas: torch.Tensor, *,
                     img_ids: torch.Tensor, txt_ids: torch.Tensor, guidance: float | None,
                     references: torch.Tensor | None = None) -> torch.Tensor:
    """The transformer's velocity for a latent grid: (B, 128, h, w) in, (B, 128, h, w) out.

    `references` (B, n, 128, h', w'): clean reference latents, packed after the target's tokens (img_ids must
    hold their ids too, see reference_ids); the model attends to them and the output keeps the target's tokens.
    The timestep is sigma itself (the model multiplies by 1000). x_t is cast to prompt_embeds' dtype,
    the compute dtype, as the pipelines prepare latents in prompt_embeds.dtype. [dev] is guidance
    distilled and needs its guidance value (the model multiplies it by 1000 too); [klein] has none.
    """
    guidance_embeds = bool(getattr(getattr(transformer, "config", None), "guidance_embeds", False))
    if guidance_embeds != (guidance is not None):
        need = "a guidance value (FLUX.2 [dev] is guidance distilled)" if guidance_embeds else "guidance=None"
        raise ValueError(f"this transformer needs {need}, got guidance={guidance!r}")
    b, c, h, w = x_t.shape
    tokens = pack_latents(x_t.to(prompt_embeds.dtype))  # (B, h*w, 128)
    if references is not None and references.shape[1]:   # (B, n, 128, h, w) -> (B, n*h*w, 128), one after another
        refs = references.to(prompt_embeds.dtype)
        tokens = torch.cat([tokens, pack_latents(refs.transpose(1, 2).flatten(2, 3))], dim=1)
    guidance_t = None if guidance is None else torch.full([b], float(guidance), device=x_t.device)  # (B,)
    out = transformer(hidden_states=tokens, encoder_hidden_states=prompt_embeds,  # (B, L, joint_dim)
                      timestep=sigmas.to(x_t.device), guidance=guidance_t,
                      img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]  # (B, h*w, 128)
    return out[:, :h * w].permute(0, 2, 1).reshape(b, c, h, w)   # the target's tokens: the loss covers only them


def loss_weights(sigmas: torch.Tensor, weighting: str) -> torch.Tensor:
    """(B,) float32 per-sample loss weights, diffusers' compute_loss_weighting_for_sd3.

    "sigma_sqrt" is sigma^-2 (the name is SD3's): the velocity error scaled to the error in x0.
    "cosmap" is 2 / (pi (1 - 2 sigma + 2 sigma^2)), SD3's cosine-map density as a weight.
    """
    sigmas = sigmas.float()
    if weighting == "none":
        return torch.ones_like(sigmas)
    if weighting == "sigma_sqrt":
        return sigmas ** -2.0
    if weighting == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas ** 2))
    raise ValueError(f"unknown loss weighting {weighting!r}: choose one of {', '.join(LOSS_WEIGHTINGS)}")


def flow_matching_loss(pred: torch.Tensor, target: torch.Tensor, sigmas: torch.Tensor | None = None,
                       weighting: str = "none") -> torch.Tensor:
    """Scalar float32 mean over samples of each sample's mean weighted squared error."""
    if weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {weighting!r}: choose one of {', '.join(LOSS_WEIGHTINGS)}")
    error = (pred.float() - target.float()) ** 2  # (B, 128, h, w)
    if weighting != "none":
        if sigmas is None:
            raise ValueError(f"loss weighting {weighting!r} needs the batch's sigmas")
        error = _per_sample(loss_weights(sigmas, weighting).to(error.device), error) * error
    return error.reshape(error.shape[0], -1).mean(dim=1).mean()


def training_loss(transformer, x0: torch.Tensor, prompt_embeds: torch.Tensor, *, noise: torch.Tensor,
                  sigmas: torch.Tensor, img_ids: torch.Tensor, txt_ids: torch.Tensor, guidance: float | None,
                  weighting: str = "none", references: torch.Tensor | None = None) -> torch.Tensor:
    """One step's loss for a batch of one resolution: x0, noise (B, 128, h, w), sigmas (B,); an edit dataset's
    references (B, n, 128, h, w) stay clean (no noise) and are no part of the loss."""
    x_t = noisy_latents(x0, noise, sigmas)  # (B, 128, h, w)
    pred = predict_velocity(transformer, x_t, prompt_embeds, sigmas, img_ids=img_ids, txt_ids=txt_ids,
                            guidance=guidance, references=references)
    return flow_matching_loss(pred, velocity_target(x0, noise), sigmas, weighting)


def session_loss(s, x0, text, noise, sigmas, refs) -> torch.Tensor:
    """training_loss with a training session's (trainer.Session) position ids, guidance, loss weighting and
    autocast: what the step (trainer.micro_step) and the validation loss (validation.py) both compute."""
    t = s.config.train
    img_ids, txt_ids = s.ids.get(x0.shape[2], x0.shape[3], text.shape[1], s.device,
                                 references=0 if refs is None else refs.shape[1])
    with torch.autocast(s.device.type, dtype=s.autocast_dtype) if s.autocast_dtype else nullcontext():
        return training_loss(s.transformer, x0, text, noise=noise, sigmas=sigmas, img_ids=img_ids, txt_ids=txt_ids,
                             guidance=t.guidance if s.variant.guidance_embeds else None, weighting=t.loss_weighting,
                             references=refs)
