"""Sample images during training: the LoRA as it is now, through diffusers' own FLUX.2 pipelines.

The prompts arrive as embeddings (from the latent cache, or encoded once at setup), so no text encoder
stays loaded; the VAE is borrowed only for the decode and released by its owner afterwards. The
pipelines are built around the live transformer (LoRA applied), which is in eval mode only while
sampling. [klein] base models sample with classifier-free guidance against the empty caption; [dev]
takes guidance as an embedding. An edit LoRA's samples edit reference images (sample_prompts chooses them), fitted
to the sample's size and given to the pipeline as its `image` argument: it encodes them and numbers their tokens
as training did.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..cache import decoder_latents
from ..models import free_memory, shipped_config

log = logging.getLogger(__name__)

_SCHEDULER_CONFIG = {"klein": "flux2-klein-4b", "dev": "flux2-dev"}
DISTILLED_STEPS = 4   # what the step-distilled [klein] checkpoints are made for


def build_pipeline(transformer, vae, family: str, distilled: bool = False):
    """A diffusers FLUX.2 pipeline without text encoder or tokenizer: prompts come as embeddings. A distilled
    [klein] pipeline ignores the guidance scale (no CFG pass), as diffusers' own does."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Pipeline

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(shipped_config(_SCHEDULER_CONFIG[family], "scheduler"))
    if family == "klein":
        return Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None,
                                  transformer=transformer, is_distilled=distilled)
    return Flux2Pipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, transformer=transformer)


def sample_prompts(config, cache) -> tuple[list[str], list[torch.Tensor], list[tuple[Path, ...]]]:
    """(prompts, their embeddings, the reference images each edits): sample.prompts (encoded by the cache build),
    else the first captions. An edit dataset's samples edit the captions' own items' references, or for
    sample.prompts those of the first item that has any; a text-to-image dataset's tuples are empty."""
    root = Path(config.data.path)
    if config.sample.prompts:
        first = tuple(root / ref for ref in next((i.references for i in cache.items if i.references), ()))
        return (list(config.sample.prompts), [cache.prompt(p) for p in config.sample.prompts],
                [first] * len(config.sample.prompts))
    chosen = range(min(2, len(cache)))
    return ([cache.items[i].path for i in chosen], [cache.text(i) for i in chosen],
            [tuple(root / ref for ref in cache.items[i].references) for i in chosen])


def sample(s, callbacks) -> None:
    """Samples of a training session's LoRA as it is now, saved under the run folder and reported to `callbacks`
    (trainer.Session; every rank of a sharded base takes part, rank 0 saves)."""
    c = s.config.sample
    if not c.steps or not (s.ranks.main or s.sharded):  # sample.steps=0: off; other ranks help only a sharded base
        return
    callbacks.on_phase("sampling")
    size = c.resolution or s.config.data.resolution[-1]
    with s.encoders.vae() as vae:
        images = generate(s.transformer, vae, s.variant.family, s.sample_embeds, s.cache.text(None), size=size,
                          steps=c.steps, guidance=c.guidance, seed=c.seed, dtype=s.dtype, distilled=s.distilled,
                          references=s.sample_references)
    if not s.ranks.main:
        return
    paths = save_samples(images, s.run_dir / "samples", s.step)
    s.samples += paths
    callbacks.on_sample(s.step, paths)


def _reference_images(paths, size: int) -> list | None:
    """The PIL images fitted to the sample's size x size, as training fits references to their target's bucket (the
    pipeline would keep them at their own size, up to 1 MP); None (and a warning: a sample is not worth stopping
    the run for) when one is unreadable."""
    from ..cache import fit_image
    from ..data import load_image_rgb
    from ..errors import Flux2LoraError

    try:
        return [fit_image(load_image_rgb(path), (size, size)) for path in paths] or None
    except Flux2LoraError as error:
        log.warning("sampling without reference images: %s", error)
        return None


@torch.no_grad()
def sample_tokens(transformer, vae, family: str, prompt_embeds: list[torch.Tensor], negative: torch.Tensor, *,
                  size: int, steps: int, guidance: float, seed: int, dtype: torch.dtype,
                  distilled: bool = False, references: list | None = None) -> list[torch.Tensor]:
    """The final denoised latent (1, h*w, 128) per prompt embedding (L, D), normalised as the transformer sees it.

    Each prompt starts from the same seed's noise, so samples compare across training steps. These tokens are
    what ComfyUI's sampler would end with (Flux2Scheduler + euler, the same seed): the test against ComfyUI
    compares them before any decoding. [klein]'s pipeline returns its latents already de-normalised, so they are
    taken at the last step instead, exactly as the scheduler left them.
    """
    device = next(p.device for p in transformer.parameters())
    pipe = build_pipeline(transformer, vae, family, distilled)
    pipe.set_progress_bar_config(disable=True)
    was_training = transformer.training
    transformer.eval()
    tokens = []
    try:
        last = {}

        def keep_latents(_pipe, _step, _timestep, state):
            last.update(state)
            return state

        for n, embedding in enumerate(prompt_embeds):
            images = _reference_images(references[n], size) if references else None
            kwargs = {"prompt_embeds": embedding[None].to(device, dtype), "height": size, "width": size,
                      **({"image": images} if images else {}),
                      "num_inference_steps": steps, "guidance_scale": guidance, "output_type": "latent",
                      "generator": torch.Generator("cpu").manual_seed(seed), "callback_on_step_end": keep_latents,
                      "callback_on_step_end_tensor_inputs": ["latents"]}
            if family == "klein":
                kwargs["negative_prompt_embeds"] = negative[None].to(device, dtype)
            pipe(**kwargs)
            tokens.append(last.pop("latents"))  # (1, h*w, 128), after the last step
    finally:
        transformer.train(was_training)
        del pipe
        free_memory()
    return tokens


@torch.no_grad()
def generate(transformer, vae, family: str, prompt_embeds: list[torch.Tensor], negative: torch.Tensor, *,
             size: int, steps: int, guidance: float, seed: int, dtype: torch.dtype, distilled: bool = False,
             references: list | None = None):
    """One PIL image per prompt embedding (L, D): `sample_tokens`, decoded by the VAE. A step-distilled [klein]
    samples in DISTILLED_STEPS steps (at most `steps`) and without CFG, as it was distilled to. `references`: per
    prompt, the paths of the reference images it edits."""
    if distilled:
        steps = min(steps, DISTILLED_STEPS)
    latents = sample_tokens(transformer, vae, family, prompt_embeds, negative, size=size, steps=steps,
                            guidance=guidance, seed=seed, dtype=dtype, distilled=distilled, references=references)
    processor = build_pipeline(transformer, vae, family).image_processor  # the pipeline's own postprocessing
    images = []
    vae_param = next(vae.parameters())
    for tokens in latents:
        # Decoded here, in the VAE's own dtype: it may differ from the transformer's (an fp32 VAE beside bf16).
        latent = decoder_latents(vae, tokens.to(vae_param.device, vae_param.dtype), size // 16, size // 16)
        pixels = vae.decode(latent, return_dict=False)[0]
        images += processor.postprocess(pixels, output_type="pil")
    free_memory()
    return images


def save_samples(images, folder: Path, step: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = folder / f"step_{step:06d}_{i}.png"
        image.save(path)
        paths.append(path)
    log.info("samples at step %d: %s", step, ", ".join(p.name for p in paths))
    return paths
