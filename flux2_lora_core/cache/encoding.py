"""What the frozen encoders make of images and captions: FLUX.2's exact latent and prompt recipes.

The LoRA learns against these tensors, so they must be the ones the model sees at inference: the
latents as diffusers' pipelines encode a reference image (VAE mode, 2x2 patchify, BatchNorm
statistics), and the prompt embeddings as the program the LoRA will be used in builds them. Those
differ for [dev]: diffusers pads the *tokens* to 512 and runs the pads through Mistral, while ComfyUI
encodes the bare prompt and pads the *embeddings* with zeros in front (FLUX2_FACTS.md). So prompt
encoding has a mode, "comfyui" or "diffusers", recorded with every cache and LoRA.

Everything here is a pure function of its inputs; the latent cache calls it once per item.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..data import fit_to_bucket
from ..errors import ConfigError
from ..models import FAMILIES, TEXT_LAYERS

TEXT_CONDITIONING = ("comfyui", "diffusers")
MAX_SEQUENCE_LENGTH = 512  # prompt length both programs pad (or truncate, diffusers) to
# ComfyUI's [dev] prompt (comfy/text_encoders/flux.py); its system message equals diffusers' SYSTEM_MESSAGE.
COMFYUI_DEV_TEMPLATE = ("[SYSTEM_PROMPT]You are an AI that reasons about image descriptions. You give structured "
                        "responses focusing on object relationships, object\nattribution and actions without "
                        "speculation.[/SYSTEM_PROMPT][INST]{}[/INST]")
# ComfyUI's [klein] prompt: what Qwen3's chat template renders with enable_thinking=False. Using the
# literal string means any Qwen2/Qwen3 tokenizer works, with or without a chat template (ComfyUI's
# bundled comfy/text_encoders/qwen25_tokenizer has none).
COMFYUI_KLEIN_TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def check_mode(family: str, mode: str) -> None:
    problems = []
    if family not in FAMILIES:
        problems.append(("model.variant", f"unknown FLUX.2 family {family!r}: expected one of {', '.join(FAMILIES)}"))
    if mode not in TEXT_CONDITIONING:
        problems.append(("model.text_conditioning",
                         f"{mode!r} is not a prompt encoding: choose one of {', '.join(TEXT_CONDITIONING)}"))
    if problems:
        raise ConfigError(problems)


# ---------------------------------------------------------------------------------------------- images
def fit_image(image: Image.Image, bucket: tuple[int, int]) -> Image.Image:
    """An image resized to cover `bucket` (width, height) and centre-cropped to it. Lanczos when shrinking (what
    photo tools do; training images are nearly always larger than the bucket), bicubic when enlarging."""
    fit = fit_to_bucket(image.width, image.height, bucket)
    shrinking = fit.scaled[0] <= image.width
    resized = image if fit.scaled == image.size else image.resize(
        fit.scaled, Image.Resampling.LANCZOS if shrinking else Image.Resampling.BICUBIC)
    return resized.crop(fit.box)


def image_to_pixels(image: Image.Image, bucket: tuple[int, int], *, flip: bool = False) -> torch.Tensor:
    """An RGB image fitted to `bucket` (fit_image) as (3, H, W) in [-1, 1]. The flip, when asked for, comes after
    the crop so both orientations show the same pixels."""
    cropped = fit_image(image, bucket)
    if flip:
        cropped = cropped.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(cropped, dtype=np.uint8)  # (H, W, 3)
    # A plain contiguous (3, H, W); encode_images gives the batch the layout the VAE runs in (channels-last).
    return torch.from_numpy(array.transpose(2, 0, 1).copy()).float().div_(127.5).sub_(1.0)


def patchify_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 4C, H/2, W/2): each 2x2 patch's channels side by side, as the pipelines do."""
    b, c, h, w = latents.shape
    latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return latents.reshape(b, c * 4, h // 2, w // 2)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h*w, C), row-major: the transformer's image token sequence."""
    b, c, h, w = latents.shape
    return latents.reshape(b, c, h * w).permute(0, 2, 1)


def decoder_latents(vae, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of encode_images' last steps: (B, h*w, 128) normalised tokens -> (B, 32, 2h, 2w) for vae.decode."""
    b = tokens.shape[0]
    latents = tokens.permute(0, 2, 1).reshape(b, 128, h, w)
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents)
    latents = latents * std + mean
    return latents.view(b, 32, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, 32, 2 * h, 2 * w)


@torch.no_grad()
def encode_images(vae, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> normalised latents (B, 128, H/16, W/16), in the VAE's dtype.

    The distribution's mode, not a sample: the cached latent must be the same every run, and the
    pipelines encode reference images the same way.

    The pixels go in channels-last, the memory layout ComfyUI's VAEEncode hands its encoder (an (B, H, W, 3)
    image moved to (B, 3, H, W)): convolution kernels are chosen by layout and round differently. Measured on the
    CPU against ComfyUI's encode of the same image (tiny random VAE): contiguous 4.5e-6 at 64 px, 1.5e-5 at 256,
    5.4e-5 at 512, growing with size; channels-last 5e-7 to 1e-6 at all three. Both are correct encodings; this
    one is the latent ComfyUI would make of the image.
    """
    param = next(vae.parameters())
    pixels = pixels.to(param.device, param.dtype).contiguous(memory_format=torch.channels_last)
    latents = vae.encode(pixels).latent_dist.mode()  # (B, 32, H/8, W/8)
    latents = patchify_latents(latents)  # (B, 128, H/16, W/16)
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents)
    return (latents - mean) / std


# ---------------------------------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class PromptBatch:
    """Token ids for a batch of prompts, and how many output rows each prompt keeps."""

    input_ids: torch.Tensor       # (B, L) long
    attention_mask: torch.Tensor  # (B, L) long, 0 on padding
    keep: tuple[int, ...]         # rows of each prompt's embedding that are its conditioning


def _right_pad(rows: list[list[int]], pad_id: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, :len(row)] = 1
    return ids, mask


def tokenize_prompts(tokenizer, prompts: list[str], *, family: str, mode: str) -> PromptBatch:
    """Tokens exactly as the chosen program builds them for one prompt each (see the module docstring).

    Batching never changes a prompt's rows: padding added to even out a batch goes on the right,
    behind a zero attention mask, where a causal text encoder cannot see it.
    """
    check_mode(family, mode)
    if family == "dev" and mode == "diffusers":  # Flux2Pipeline._get_mistral_3_small_prompt_embeds
        from diffusers.pipelines.flux2.pipeline_flux2 import format_input
        from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

        inputs = tokenizer.apply_chat_template(
            format_input(prompts=list(prompts), system_message=SYSTEM_MESSAGE), add_generation_prompt=False,
            tokenize=True, return_dict=True, return_tensors="pt", padding="max_length", truncation=True,
            max_length=MAX_SEQUENCE_LENGTH)
        return PromptBatch(inputs["input_ids"], inputs["attention_mask"], (MAX_SEQUENCE_LENGTH,) * len(prompts))
    if family == "dev":  # ComfyUI: <s> + the template, no padding, no truncation
        rows = [[tokenizer.bos_token_id, *tokenizer(COMFYUI_DEV_TEMPLATE.format(p), add_special_tokens=False)["input_ids"]]
                for p in prompts]
        keep = tuple(len(row) for row in rows)
    else:  # klein, both programs: the chat template, padded on the right to 512 with <|endoftext|> (encoded)
        rows = []
        for prompt in prompts:
            if mode == "diffusers":  # Flux2KleinPipeline._get_qwen3_prompt_embeds
                text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                     add_generation_prompt=True, enable_thinking=False)
            else:
                text = COMFYUI_KLEIN_TEMPLATE.format(prompt)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if mode == "diffusers":
                ids = ids[:MAX_SEQUENCE_LENGTH]  # diffusers truncates; ComfyUI keeps every token
            rows.append(ids)
        keep = tuple(max(MAX_SEQUENCE_LENGTH, len(row)) for row in rows)
    ids, mask = _right_pad(rows, tokenizer.pad_token_id, max(keep))
    return PromptBatch(ids, mask, keep)


@torch.no_grad()
def encode_prompts(text_encoder, tokenizer, prompts: list[str], *, family: str, mode: str) -> list[torch.Tensor]:
    """One (L, 3 * hidden) embedding per prompt, as stored in the cache (see `model_ready_embedding`).

    The hidden states of three intermediate layers, side by side per token: (B, 3, L, D) -> (B, L, 3D).

    A prompt longer than MAX_SEQUENCE_LENGTH tokens (kept whole in "comfyui" conditioning) runs alone: batched, it
    would pad every other prompt to its length, attention costs grow with the square of the length, and a padding
    mask of batch x length x length is read by every layer (one 4,000-token caption with three short ones, tiny
    [klein] model, one CPU thread: 9.0 CPU-seconds as one padded batch, 0.6 grouped). Each group is cut to its own
    longest prompt; padding sits on the right, where a causal text encoder cannot see it, so the rows kept are the
    same in any grouping.
    """
    batch = tokenize_prompts(tokenizer, prompts, family=family, mode=mode)
    device = next(text_encoder.parameters()).device
    short = [i for i, keep in enumerate(batch.keep) if keep <= MAX_SEQUENCE_LENGTH]
    groups = ([short] if short else []) + [[i] for i, keep in enumerate(batch.keep) if keep > MAX_SEQUENCE_LENGTH]
    out: list[torch.Tensor | None] = [None] * len(prompts)
    for group in groups:
        width = max(batch.keep[i] for i in group)
        output = text_encoder(input_ids=batch.input_ids[group, :width].to(device),
                              attention_mask=batch.attention_mask[group, :width].to(device),
                              output_hidden_states=True, use_cache=False)
        stacked = torch.stack([output.hidden_states[k] for k in TEXT_LAYERS[family]], dim=1)  # (b, 3, L, D)
        b, n, length, dim = stacked.shape
        embeds = stacked.permute(0, 2, 1, 3).reshape(b, length, n * dim)  # (b, L, 3D)
        for row, i in enumerate(group):
            out[i] = embeds[row, :batch.keep[i]].clone()
    return out


def model_ready_embedding(embedding: torch.Tensor, *, family: str, mode: str) -> torch.Tensor:
    """The stored (L, D) embedding as the transformer receives it.

    Only ComfyUI's [dev] conditioning differs from what is stored: ComfyUI pads short prompts to 512
    rows with zero vectors placed before the prompt (comfy/model_base.py Flux2.extra_conds). Storing
    the bare prompt keeps a [dev] cache entry ~8x smaller.
    """
    if family == "dev" and mode == "comfyui" and embedding.shape[0] < MAX_SEQUENCE_LENGTH:
        return torch.nn.functional.pad(embedding, (0, 0, MAX_SEQUENCE_LENGTH - embedding.shape[0], 0))
    return embedding
