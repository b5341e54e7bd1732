"""flow_matching.py with reference images: an edit LoRA's step equals diffusers' image-to-image training script's.

The reference is a transcription of examples/dreambooth/train_dreambooth_lora_flux2_img2img.py (diffusers main @
0392cd88): the target's noisy latent and the condition image's clean latent are packed one after the other, the
condition's ids come from Flux2Pipeline._prepare_image_ids (time coordinate 10), and the prediction is cut back to
the target's tokens before the loss. The script loads Flux2Pipeline's helpers and a [dev] transformer; [klein]'s
pipeline has the very same static helpers, so the step runs on both tiny models.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Pipeline
from diffusers.training_utils import compute_loss_weighting_for_sd3

from flux2_lora_core.cache.encoding import encode_images
from flux2_lora_core.models.tiny_models import VARIANTS, build_tiny_pipeline
from flux2_lora_core.training import flow_matching as fm

from .test_flow_matching import script_noise_levels

GUIDANCE = 3.5  # the script's --guidance_scale default


@pytest.fixture(scope="module")
def pipes():
    return {variant: build_tiny_pipeline(variant, seed=0) for variant in VARIANTS}


def script_step(pipe, pixel_values, cond_pixel_values, prompt_embeds, *, weighting_scheme: str,
                generator: torch.Generator) -> dict:
    """The script's step, its own lines quoted, on the tiny models. Departures that leave the math alone: seeded
    draws instead of `torch.randn_like` / the global generator, no accelerator or device moves, and the
    transformer's guidance only where it has a guidance embedding ([klein] has none)."""
    vae, transformer = pipe.vae, pipe.transformer
    noise_scheduler_copy = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    latents_bn_mean = vae.bn.running_mean.view(1, -1, 1, 1)
    latents_bn_std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    text_ids = Flux2Pipeline._prepare_text_ids(prompt_embeds)

    # model_input = vae.encode(pixel_values).latent_dist.mode()
    # cond_model_input = vae.encode(cond_pixel_values).latent_dist.mode()
    with torch.no_grad():
        model_input = vae.encode(pixel_values).latent_dist.mode()
        cond_model_input = vae.encode(cond_pixel_values).latent_dist.mode()
    # model_input = Flux2Pipeline._patchify_latents(model_input)
    # model_input = (model_input - latents_bn_mean) / latents_bn_std
    # cond_model_input = Flux2Pipeline._patchify_latents(cond_model_input)
    # cond_model_input = (cond_model_input - latents_bn_mean) / latents_bn_std
    model_input = Flux2Pipeline._patchify_latents(model_input)
    model_input = (model_input - latents_bn_mean) / latents_bn_std
    cond_model_input = Flux2Pipeline._patchify_latents(cond_model_input)
    cond_model_input = (cond_model_input - latents_bn_mean) / latents_bn_std
    # model_input_ids = Flux2Pipeline._prepare_latent_ids(model_input).to(device=model_input.device)
    # cond_model_input_ids = Flux2Pipeline._prepare_image_ids([cond_model_input[0:1]]).to(...)
    # cond_model_input_ids = cond_model_input_ids.expand(cond_model_input.shape[0], -1, -1)
    model_input_ids = Flux2Pipeline._prepare_latent_ids(model_input)
    cond_model_input_ids = Flux2Pipeline._prepare_image_ids([cond_model_input[0:1]])
    cond_model_input_ids = cond_model_input_ids.expand(cond_model_input.shape[0], -1, -1)
    # noise ... sigmas = get_sigmas(...): the lines the text-to-image scripts have too
    noise, _, timesteps, sigmas = script_noise_levels(noise_scheduler_copy, model_input, weighting_scheme, generator)
    noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
    # packed_noisy_model_input = Flux2Pipeline._pack_latents(noisy_model_input)
    # packed_cond_model_input = Flux2Pipeline._pack_latents(cond_model_input)
    # orig_input_shape = packed_noisy_model_input.shape
    # orig_input_ids_shape = model_input_ids.shape
    packed_noisy_model_input = Flux2Pipeline._pack_latents(noisy_model_input)
    packed_cond_model_input = Flux2Pipeline._pack_latents(cond_model_input)
    orig_input_shape = packed_noisy_model_input.shape
    orig_input_ids_shape = model_input_ids.shape
    # packed_noisy_model_input = torch.cat([packed_noisy_model_input, packed_cond_model_input], dim=1)
    # model_input_ids = torch.cat([model_input_ids, cond_model_input_ids], dim=1)
    packed_noisy_model_input = torch.cat([packed_noisy_model_input, packed_cond_model_input], dim=1)
    model_input_ids = torch.cat([model_input_ids, cond_model_input_ids], dim=1)
    # guidance = torch.full([1], args.guidance_scale, device=accelerator.device)
    # guidance = guidance.expand(model_input.shape[0])
    guidance = torch.full([1], GUIDANCE).expand(model_input.shape[0]) if transformer.config.guidance_embeds else None
    # model_pred = transformer(hidden_states=packed_noisy_model_input, timestep=timesteps / 1000, guidance=guidance,
    #     encoder_hidden_states=prompt_embeds, txt_ids=text_ids, img_ids=model_input_ids, return_dict=False)[0]
    # model_pred = model_pred[:, : orig_input_shape[1], :]
    # model_input_ids = model_input_ids[:, : orig_input_ids_shape[1], :]
    # model_pred = Flux2Pipeline._unpack_latents_with_ids(model_pred, model_input_ids)
    with torch.no_grad():
        model_pred = transformer(hidden_states=packed_noisy_model_input, timestep=timesteps / 1000, guidance=guidance,
                                 encoder_hidden_states=prompt_embeds, txt_ids=text_ids, img_ids=model_input_ids,
                                 return_dict=False)[0]
    model_pred = model_pred[:, : orig_input_shape[1], :]
    model_input_ids = model_input_ids[:, : orig_input_ids_shape[1], :]
    model_pred = Flux2Pipeline._unpack_latents_with_ids(model_pred, model_input_ids)
    # weighting = compute_loss_weighting_for_sd3(weighting_scheme=args.weighting_scheme, sigmas=sigmas)
    # target = noise - model_input
    # loss = torch.mean((weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(target.shape[0], -1), 1)
    # loss = loss.mean()
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=weighting_scheme, sigmas=sigmas)
    target = noise - model_input
    loss = torch.mean((weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(target.shape[0], -1), 1)
    return {"model_input": model_input, "cond": cond_model_input, "noise": noise, "sigmas": sigmas.flatten(),
            "model_pred": model_pred, "loss": loss.mean(), "guidance": guidance, "cond_ids": cond_model_input_ids}


@pytest.mark.parametrize("scheme,weighting", [("none", "none"), ("sigma_sqrt", "sigma_sqrt")])
@pytest.mark.parametrize("variant", VARIANTS)
def test_edit_step_equals_the_diffusers_img2img_training_script(pipes, variant, scheme, weighting):
    pipe = pipes[variant]
    gen = torch.Generator().manual_seed(4321)
    pixels = torch.rand(2, 3, 32, 48, generator=gen) * 2 - 1            # targets, latent grid 2 x 3
    cond = torch.rand(2, 3, 32, 48, generator=gen) * 2 - 1              # their references, at the target's size
    embeds = torch.randn(2, 12, pipe.transformer.config.joint_attention_dim, generator=gen)
    layout = torch.channels_last          # the engine encodes channels-last, see test_flow_matching.py
    ref = script_step(pipe, pixels.contiguous(memory_format=layout), cond.contiguous(memory_format=layout), embeds,
                      weighting_scheme=scheme, generator=gen)

    x0, references = encode_images(pipe.vae, pixels), encode_images(pipe.vae, cond)[:, None]  # (B, 1, 128, 2, 3)
    torch.testing.assert_close(references[:, 0], ref["cond"], rtol=0, atol=1e-6)
    img_ids, txt_ids = fm.PositionIds().get(2, 3, 12, "cpu", references=1)
    assert torch.equal(img_ids[6:], ref["cond_ids"][0]) and img_ids[6:, 0].unique().tolist() == [10]
    guidance = GUIDANCE if variant == "dev" else None
    with torch.no_grad():
        pred = fm.predict_velocity(pipe.transformer, fm.noisy_latents(x0, ref["noise"], ref["sigmas"]), embeds,
                                   ref["sigmas"], img_ids=img_ids, txt_ids=txt_ids, guidance=guidance,
                                   references=references)
        loss = fm.training_loss(pipe.transformer, x0, embeds, noise=ref["noise"], sigmas=ref["sigmas"],
                                img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, weighting=weighting,
                                references=references)
        plain = fm.training_loss(pipe.transformer, x0, embeds, noise=ref["noise"], sigmas=ref["sigmas"],
                                 img_ids=img_ids[:6], txt_ids=txt_ids, guidance=guidance, weighting=weighting)
    assert pred.shape == ref["model_pred"].shape == (2, 128, 2, 3)     # the target's tokens only
    torch.testing.assert_close(pred, ref["model_pred"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss, ref["loss"], rtol=1e-6, atol=1e-6)
    STEP_DIFF[variant, scheme] = max((pred - ref["model_pred"]).abs().max().item(),
                                     (loss - ref["loss"]).abs().item())
    assert abs(plain.item() - loss.item()) > 1e-6                       # the reference does reach the prediction


STEP_DIFF: dict = {}


@pytest.fixture(scope="module", autouse=True)
def report(request):
    """The equality figures, for the closing note: pytest -s shows them."""
    yield
    if STEP_DIFF:
        print("\nimg2img step vs diffusers' script, max abs diff (prediction, loss):",
              ", ".join(f"{v}/{s}: {d:.2e}" for (v, s), d in sorted(STEP_DIFF.items())))


def test_reference_ids_equal_the_pipelines_helper_for_several_references():
    grids = [torch.zeros(1, 128, 3, 5), torch.zeros(1, 128, 3, 5), torch.zeros(1, 128, 3, 5)]
    for Pipe in (Flux2Pipeline, Flux2KleinPipeline):
        expected = Pipe._prepare_image_ids(grids)[0]                     # (3*15, 4), T = 10, 20, 30
        assert torch.equal(fm.reference_ids(3, 3, 5), expected) and fm.reference_ids(3, 3, 5).dtype == expected.dtype
    assert fm.reference_ids(0, 3, 5).shape == (0, 4)


def test_references_of_a_batch_are_each_samples_own(pipes):
    """Each sample attends to its own reference: swapping the batch's references changes both predictions."""
    pipe = pipes["klein"]
    gen = torch.Generator().manual_seed(3)
    x_t, refs = torch.randn(2, 128, 2, 2, generator=gen), torch.randn(2, 1, 128, 2, 2, generator=gen)
    embeds = torch.randn(2, 5, pipe.transformer.config.joint_attention_dim, generator=gen)
    img_ids, txt_ids = fm.PositionIds().get(2, 2, 5, "cpu", references=1)
    kwargs = {"img_ids": img_ids, "txt_ids": txt_ids, "guidance": None}
    with torch.no_grad():
        both = fm.predict_velocity(pipe.transformer, x_t, embeds, torch.tensor([0.5, 0.5]), references=refs, **kwargs)
        swapped = fm.predict_velocity(pipe.transformer, x_t, embeds, torch.tensor([0.5, 0.5]),
                                      references=refs.flip(0), **kwargs)
        alone = fm.predict_velocity(pipe.transformer, x_t[:1], embeds[:1], torch.tensor([0.5]), references=refs[:1],
                                    **kwargs)
    torch.testing.assert_close(both[:1], alone, rtol=1e-5, atol=1e-5)
    assert (both - swapped).abs().amax(dim=(1, 2, 3)).min() > 1e-5
