"""flow_matching.py: the training step equals diffusers' FLUX.2 training scripts' step, on tiny real models.

The reference is a transcription of examples/dreambooth/train_dreambooth_lora_flux2_klein.py (diffusers
main @ 58eb52c0); its [dev] twin, train_dreambooth_lora_flux2.py, differs only in using Flux2Pipeline's
helpers and always passing guidance. Every other reference value comes from diffusers' own functions.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Pipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from flux2_lora_core.cache.encoding import encode_images
from flux2_lora_core.models.tiny_models import VARIANTS, build_tiny_pipeline
from flux2_lora_core.training import flow_matching as fm

SCRIPT = "examples/dreambooth/train_dreambooth_lora_flux2_klein.py"
DEV_GUIDANCE = 3.5  # the scripts' --guidance_scale default
# the scripts' --weighting_scheme choices -> (our sigma sampling method, our loss weighting)
SCHEMES = {"none": ("uniform", "none"), "sigma_sqrt": ("uniform", "sigma_sqrt"), "cosmap": ("uniform", "cosmap"),
           "logit_normal": ("logit_normal", "none"), "mode": ("mode", "none")}


@pytest.fixture(scope="module")
def pipes():
    return {variant: build_tiny_pipeline(variant, seed=0) for variant in VARIANTS}


def script_noise_levels(noise_scheduler_copy, model_input, weighting_scheme: str, generator: torch.Generator):
    """(noise, u, timesteps, sigmas): the lines every FLUX.2 training script of diffusers shares (quoted), from
    the noise draw to the sigmas, with its get_sigmas helper less its device moves."""
    def get_sigmas(timesteps, n_dim=4, dtype=torch.float32):
        sigmas = noise_scheduler_copy.sigmas.to(dtype=dtype)
        schedule_timesteps = noise_scheduler_copy.timesteps
        step_indices = [(schedule_timesteps == t).nonzero().item() for t in timesteps]
        sigma = sigmas[step_indices].flatten()
        while len(sigma.shape) < n_dim:
            sigma = sigma.unsqueeze(-1)
        return sigma

    # noise = torch.randn_like(model_input)
    noise = torch.randn(model_input.shape, generator=generator, dtype=model_input.dtype)
    bsz = model_input.shape[0]
    # u = compute_density_for_timestep_sampling(weighting_scheme=args.weighting_scheme, batch_size=bsz,
    #     logit_mean=args.logit_mean, logit_std=args.logit_std, mode_scale=args.mode_scale)  (defaults 0, 1, 1.29)
    u = compute_density_for_timestep_sampling(weighting_scheme=weighting_scheme, batch_size=bsz, logit_mean=0.0,
                                              logit_std=1.0, mode_scale=1.29, generator=generator)
    # indices = (u * noise_scheduler_copy.config.num_train_timesteps).long()
    # timesteps = noise_scheduler_copy.timesteps[indices].to(device=model_input.device)
    indices = (u * noise_scheduler_copy.config.num_train_timesteps).long()
    timesteps = noise_scheduler_copy.timesteps[indices]
    # sigmas = get_sigmas(timesteps, n_dim=model_input.ndim, dtype=model_input.dtype)
    return noise, u, timesteps, get_sigmas(timesteps, n_dim=model_input.ndim, dtype=model_input.dtype)


def script_step(pipe, pixel_values, prompt_embeds, *, weighting_scheme: str, generator: torch.Generator) -> dict:
    """The script's step, its own lines (quoted from SCRIPT), on the tiny pipeline's models.

    Departures, none of which touches the math: the script's `torch.randn_like` and sampling draw from a
    seeded generator here, `accelerator` / `unwrap_model` / device moves are dropped, and prior
    preservation and caption dropout (off by default) are left out.
    """
    Pipe = type(pipe)  # Flux2KleinPipeline in SCRIPT; Flux2Pipeline in train_dreambooth_lora_flux2.py
    vae, transformer = pipe.vae, pipe.transformer
    # noise_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(..., subfolder="scheduler")
    # noise_scheduler_copy = copy.deepcopy(noise_scheduler)
    noise_scheduler_copy = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    # latents_bn_mean = vae.bn.running_mean.view(1, -1, 1, 1).to(accelerator.device)
    # latents_bn_std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(...)
    latents_bn_mean = vae.bn.running_mean.view(1, -1, 1, 1)
    latents_bn_std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    # text_ids = Flux2KleinPipeline._prepare_text_ids(prompt_embeds)
    text_ids = Pipe._prepare_text_ids(prompt_embeds)

    # model_input = vae.encode(pixel_values).latent_dist.mode()
    # model_input = Flux2KleinPipeline._patchify_latents(model_input)
    # model_input = (model_input - latents_bn_mean) / latents_bn_std
    with torch.no_grad():
        model_input = vae.encode(pixel_values).latent_dist.mode()
    model_input = Pipe._patchify_latents(model_input)
    model_input = (model_input - latents_bn_mean) / latents_bn_std
    # model_input_ids = Flux2KleinPipeline._prepare_latent_ids(model_input).to(device=model_input.device)
    model_input_ids = Pipe._prepare_latent_ids(model_input)
    noise, u, timesteps, sigmas = script_noise_levels(noise_scheduler_copy, model_input, weighting_scheme, generator)
    # noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
    noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
    # packed_noisy_model_input = Flux2KleinPipeline._pack_latents(noisy_model_input)
    packed_noisy_model_input = Pipe._pack_latents(noisy_model_input)
    # if unwrap_model(transformer).config.guidance_embeds:
    #     guidance = torch.full([1], args.guidance_scale, device=accelerator.device)
    #     guidance = guidance.expand(model_input.shape[0])
    # else:
    #     guidance = None
    if transformer.config.guidance_embeds:
        guidance = torch.full([1], DEV_GUIDANCE)
        guidance = guidance.expand(model_input.shape[0])
    else:
        guidance = None
    # model_pred = transformer(hidden_states=packed_noisy_model_input, timestep=timesteps / 1000, guidance=guidance,
    #     encoder_hidden_states=prompt_embeds, txt_ids=text_ids, img_ids=model_input_ids, return_dict=False)[0]
    # model_pred = model_pred[:, : packed_noisy_model_input.size(1) :]
    # model_pred = Flux2KleinPipeline._unpack_latents_with_ids(model_pred, model_input_ids)
    with torch.no_grad():
        model_pred = transformer(hidden_states=packed_noisy_model_input, timestep=timesteps / 1000, guidance=guidance,
                                 encoder_hidden_states=prompt_embeds, txt_ids=text_ids, img_ids=model_input_ids,
                                 return_dict=False)[0]
    model_pred = model_pred[:, : packed_noisy_model_input.size(1) :]
    model_pred = Pipe._unpack_latents_with_ids(model_pred, model_input_ids)
    # weighting = compute_loss_weighting_for_sd3(weighting_scheme=args.weighting_scheme, sigmas=sigmas)
    # target = noise - model_input
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=weighting_scheme, sigmas=sigmas)
    target = noise - model_input
    # loss = torch.mean(
    #     (weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(target.shape[0], -1), 1)
    # loss = loss.mean()
    loss = torch.mean((weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(target.shape[0], -1), 1)
    loss = loss.mean()
    return {"model_input": model_input, "noise": noise, "sigmas": sigmas.flatten(), "noisy": noisy_model_input,
            "model_pred": model_pred, "target": target, "loss": loss, "guidance": guidance, "u": u}


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("variant", VARIANTS)
def test_step_equals_the_diffusers_training_script(pipes, variant, scheme):
    pipe = pipes[variant]
    gen = torch.Generator().manual_seed(1234)
    pixels = torch.rand(3, 3, 32, 48, generator=gen) * 2 - 1  # (B, 3, H, W) -> latent grid 2 x 3, not square
    prompt_embeds = torch.randn(3, 12, pipe.transformer.config.joint_attention_dim, generator=gen)  # (B, L, D)
    # The engine encodes channels-last (ComfyUI's layout, see encoding.encode_images): the script gets the same
    # memory layout, so what is compared is the step, not how the convolution kernels round.
    ref = script_step(pipe, pixels.contiguous(memory_format=torch.channels_last), prompt_embeds,
                      weighting_scheme=scheme, generator=gen)
    weighting = SCHEMES[scheme][1]
    guidance = DEV_GUIDANCE if variant == "dev" else None
    assert (ref["guidance"] is None) == (guidance is None)

    x0 = encode_images(pipe.vae, pixels)  # what the latent cache holds, (B, 128, 2, 3)
    torch.testing.assert_close(x0, ref["model_input"], rtol=0, atol=1e-6)
    img_ids, txt_ids = fm.PositionIds().get(2, 3, 12, "cpu")
    # The script's sigmas come off its scheduler's 1/1000 grid, reversed: sigma = 1 - floor(1000 u) / 1000.
    torch.testing.assert_close(ref["sigmas"], 1 - torch.floor(1000 * ref["u"]) / 1000, rtol=0, atol=1e-6)
    sigmas = ref["sigmas"]
    x_t = fm.noisy_latents(x0, ref["noise"], sigmas)
    torch.testing.assert_close(x_t, ref["noisy"], rtol=0, atol=1e-6)
    torch.testing.assert_close(fm.velocity_target(x0, ref["noise"]), ref["target"], rtol=0, atol=1e-6)
    with torch.no_grad():
        pred = fm.predict_velocity(pipe.transformer, x_t, prompt_embeds, sigmas, img_ids=img_ids, txt_ids=txt_ids,
                                   guidance=guidance)
        loss = fm.training_loss(pipe.transformer, x0, prompt_embeds, noise=ref["noise"], sigmas=sigmas,
                                img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, weighting=weighting)
    assert pred.shape == ref["model_pred"].shape == (3, 128, 2, 3)
    torch.testing.assert_close(pred, ref["model_pred"], rtol=1e-6, atol=1e-6)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    torch.testing.assert_close(loss, ref["loss"], rtol=1e-6, atol=1e-6)


def test_step_is_sensitive_to_what_it_is_given(pipes):
    """The comparison above can fail: guidance, timestep and token order all change the prediction."""
    pipe = pipes["dev"]
    gen = torch.Generator().manual_seed(5)
    x_t = torch.randn(2, 128, 3, 5, generator=gen)
    embeds = torch.randn(2, 7, pipe.transformer.config.joint_attention_dim, generator=gen)
    sigmas = torch.tensor([0.3, 0.8])
    ids = {"img_ids": fm.image_ids(3, 5), "txt_ids": fm.text_ids(7)}
    with torch.no_grad():
        base = fm.predict_velocity(pipe.transformer, x_t, embeds, sigmas, guidance=3.5, **ids)
        other_guidance = fm.predict_velocity(pipe.transformer, x_t, embeds, sigmas, guidance=4.0, **ids)
        other_sigma = fm.predict_velocity(pipe.transformer, x_t, embeds, sigmas * 0.9, guidance=3.5, **ids)
        swapped = fm.predict_velocity(pipe.transformer, x_t, embeds, sigmas, guidance=3.5,
                                      img_ids=fm.image_ids(3, 5)[:, [0, 2, 1, 3]], txt_ids=ids["txt_ids"])
    for changed in (other_guidance, other_sigma, swapped):
        assert (changed - base).abs().max() > 1e-4


def test_guidance_must_match_the_variant(pipes):
    x_t = torch.zeros(1, 128, 2, 2)
    for variant, wrong in (("dev", None), ("klein", 3.5)):
        transformer = pipes[variant].transformer
        embeds = torch.zeros(1, 4, transformer.config.joint_attention_dim)
        with pytest.raises(ValueError, match="guidance"):
            fm.predict_velocity(transformer, x_t, embeds, torch.tensor([0.5]), img_ids=fm.image_ids(2, 2),
                                txt_ids=fm.text_ids(4), guidance=wrong)


# ---------------------------------------------------------------------------------------------- position ids
@pytest.mark.parametrize("Pipe", [Flux2Pipeline, Flux2KleinPipeline])
def test_ids_equal_the_pipelines_helpers(Pipe):
    latent_ids = Pipe._prepare_latent_ids(torch.zeros(2, 128, 3, 5))  # (B, h*w, 4)
    prompt_ids = Pipe._prepare_text_ids(torch.zeros(2, 9, 16))  # (B, L, 4)
    for i in range(2):
        assert torch.equal(fm.image_ids(3, 5), latent_ids[i]) and fm.image_ids(3, 5).dtype == latent_ids.dtype
        assert torch.equal(fm.text_ids(9), prompt_ids[i]) and fm.text_ids(9).dtype == prompt_ids.dtype
    assert fm.image_ids(3, 5)[6].tolist() == [0, 1, 1, 0]  # row-major: token 6 is row 1, column 1


def test_position_ids_cache_hits_and_evicts():
    cache = fm.PositionIds(maxsize=2)
    a = cache.get(4, 6, 12, "cpu")
    assert cache.get(4, 6, 12, torch.device("cpu"))[0] is a[0] and cache.get(4, 6, 12, "cpu")[1] is a[1]
    b = cache.get(6, 4, 12, "cpu")
    assert not torch.equal(a[0], b[0])
    cache.get(4, 6, 12, "cpu")  # a is now the most recently used
    cache.get(8, 8, 12, "cpu")  # evicts b
    assert len(cache) == 2
    assert cache.get(4, 6, 12, "cpu")[0] is a[0]
    assert cache.get(6, 4, 12, "cpu")[0] is not b[0]
    for size in range(20):
        cache.get(size + 1, 2, 3, "cpu")
        assert len(cache) <= 2
    assert len(fm.PositionIds()) == 0 and fm.PositionIds().maxsize == 8
    with pytest.raises(ValueError, match="maxsize"):
        fm.PositionIds(maxsize=0)


# ---------------------------------------------------------------------------------------------- noise levels
@pytest.mark.parametrize("method", fm.SIGMA_METHODS)
def test_sample_sigmas_deterministic_and_inside_the_interval(method):
    def draw(seed):
        return fm.sample_sigmas(4096, method=method, generator=torch.Generator().manual_seed(seed))

    first = draw(0)
    assert first.shape == (4096,) and first.dtype == torch.float32
    assert torch.equal(first, draw(0)) and not torch.equal(first, draw(1))
    assert bool(((first > 0) & (first < 1)).all())


@pytest.mark.parametrize("scheme", ["none", "logit_normal", "mode"])
def test_sample_sigmas_draws_diffusers_u(scheme):
    """Same generator, same numbers as compute_density_for_timestep_sampling (the script's u)."""
    method = SCHEMES[scheme][0]
    ours = fm.sample_sigmas(64, method=method, generator=torch.Generator().manual_seed(3), logit_mean=0.4,
                            logit_std=1.3)
    u = compute_density_for_timestep_sampling(scheme, 64, logit_mean=0.4, logit_std=1.3, mode_scale=1.29,
                                              generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours, u.clamp(fm.SIGMA_EPS, 1 - fm.SIGMA_EPS), rtol=0, atol=1e-6)


def test_sample_sigmas_statistics():
    gen = torch.Generator().manual_seed(0)
    logit = fm.sample_sigmas(10_000, method="logit_normal", generator=gen, logit_mean=0.5, logit_std=0.8)
    assert abs(logit.median().item() - 1 / (1 + math.exp(-0.5))) < 0.01
    z = torch.logit(logit.double())
    assert abs(z.mean().item() - 0.5) < 0.03 and abs(z.std().item() - 0.8) < 0.03
    centred = fm.sample_sigmas(10_000, method="logit_normal", generator=gen)
    assert abs(centred.mean().item() - 0.5) < 0.01
    uniform = fm.sample_sigmas(10_000, method="uniform", generator=gen)
    assert abs(uniform.mean().item() - 0.5) < 0.01 and abs(uniform.var().item() - 1 / 12) < 0.005


def test_sample_sigmas_rejects_unknown_method():
    with pytest.raises(ValueError, match="'cosine'.*uniform, logit_normal, mode"):
        fm.sample_sigmas(2, method="cosine", generator=torch.Generator())


@pytest.mark.parametrize("steps", [4, 28, 50, 200])
@pytest.mark.parametrize("seq_len", [256, 1024, 4096, 6000])
def test_shift_equals_the_pipelines_schedule(pipes, seq_len, steps):
    """What Flux2Pipeline.__call__ does: sigmas linspace(1, 1/N, N), mu = compute_empirical_mu, scheduler."""
    assert fm.empirical_mu(seq_len, steps) == pytest.approx(compute_empirical_mu(seq_len, steps), abs=1e-12)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipes["klein"].scheduler.config)
    grid = np.linspace(1.0, 1 / steps, steps)
    scheduler.set_timesteps(sigmas=grid, mu=compute_empirical_mu(seq_len, steps))
    ours = fm.shift_sigmas(torch.tensor(grid, dtype=torch.float32), seq_len, num_steps=steps)
    torch.testing.assert_close(ours, scheduler.sigmas[:-1], rtol=0, atol=1e-6)
    mu = fm.linear_mu(seq_len)
    config = scheduler.config
    assert mu == pytest.approx(calculate_shift(seq_len, config.base_image_seq_len, config.max_image_seq_len,
                                               config.base_shift, config.max_shift), abs=1e-12)
    t = torch.linspace(0.01, 0.99, 50)
    torch.testing.assert_close(fm.shift_sigmas(t, seq_len, mu_schedule="linear"), scheduler.time_shift(mu, 1.0, t),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("schedule", fm.MU_SCHEDULES)
def test_shift_moves_towards_noise_with_resolution(schedule):
    s = torch.linspace(1e-4, 1 - 1e-4, 1001)
    small, large = (fm.shift_sigmas(s, n, mu_schedule=schedule) for n in (256, 4096))
    assert small.shape == s.shape and small.dtype == torch.float32
    for shifted in (small, large):
        assert bool((shifted.diff() > 0).all()) and bool((shifted >= s).all())
        assert bool(((shifted > 0) & (shifted < 1)).all())
    assert bool((large[1:-1] > small[1:-1]).all())
    assert abs(fm.shift_sigmas(torch.tensor([0.5]), 4096, mu_schedule=schedule).item()
               - 1 / (1 + math.exp(-(fm.empirical_mu(4096, 50) if schedule == "empirical" else 1.15)))) < 1e-6
    with pytest.raises(ValueError, match="'cubic'"):
        fm.shift_sigmas(s, 256, mu_schedule="cubic")


# ---------------------------------------------------------------------------------------------- loss
def test_loss_weightings_equal_diffusers():
    sigmas = torch.tensor([0.05, 0.3, 0.5, 0.9])
    for weighting in fm.LOSS_WEIGHTINGS:
        torch.testing.assert_close(fm.loss_weights(sigmas, weighting),
                                   compute_loss_weighting_for_sd3(weighting, sigmas).float())
    with pytest.raises(ValueError, match="'mode'"):
        fm.loss_weights(sigmas, "mode")


def test_flow_matching_loss():
    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 128, 2, 3, generator=gen)  # two (B, 128, h, w)
    sigmas = torch.tensor([0.1, 0.4, 0.6, 0.95])
    plain = fm.flow_matching_loss(pred, target)
    torch.testing.assert_close(plain, torch.nn.functional.mse_loss(pred, target))
    per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3))  # (B,)
    torch.testing.assert_close(fm.flow_matching_loss(pred, target, sigmas, "sigma_sqrt"),
                               (per_sample / sigmas ** 2).mean())
    cosmap = 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas ** 2))
    torch.testing.assert_close(fm.flow_matching_loss(pred, target, sigmas, "cosmap"), (per_sample * cosmap).mean())
    half = fm.flow_matching_loss(pred.bfloat16(), target.bfloat16())
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, torch.nn.functional.mse_loss(pred.bfloat16().float(), target.bfloat16().float()))
    with pytest.raises(ValueError, match="'logit_normal'.*none, sigma_sqrt, cosmap"):
        fm.flow_matching_loss(pred, target, sigmas, "logit_normal")
    with pytest.raises(ValueError, match="sigmas"):
        fm.flow_matching_loss(pred, target, None, "cosmap")
