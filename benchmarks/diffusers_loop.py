"""The baseline of benchmarks/gpu_speed.py: the inner loop of diffusers'
examples/dreambooth/train_dreambooth_lora_flux2_klein.py, transcribed, on cached-like inputs already on the device.

Kept apart so the benchmark's own module holds only the engine side and the timing.
"""

from __future__ import annotations

import torch

TEXT_TOKENS = 512          # the cache's prompt length in "diffusers" conditioning (FLUX2_FACTS.md)
LATENT_CHANNELS = 128      # 32 VAE channels x 2x2 patch


class ScriptLoop:
    """The inner loop of diffusers' train_dreambooth_lora_flux2_klein.py with --cache_latents, one instance
    prompt and its defaults (weighting_scheme none, AdamW lr 1e-4, betas 0.9/0.999, weight decay 1e-4, eps 1e-8,
    max_grad_norm 1, bf16 via accelerate's autocast, LoRA weights in the base's dtype as add_adapter makes them).
    Its target list is the script's, with the single blocks read from the config instead of its range(24)."""

    def __init__(self, transformer, resolution: int, batch: int, rank: int, checkpointing: bool, scheduler_config):
        from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
        from peft import LoraConfig

        self.Pipe, self.transformer, self.batch = Flux2KleinPipeline, transformer, batch
        device, dtype = transformer.device, transformer.dtype
        self.device = device
        self.noise_scheduler_copy = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        if checkpointing:
            transformer.enable_gradient_checkpointing()
        target_modules = ["to_k", "to_q", "to_v", "to_out.0"] + [
            "to_qkv_mlp_proj", *[f"single_transformer_blocks.{i}.attn.to_out"
                                 for i in range(transformer.config.num_single_layers)]]
        transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, init_lora_weights="gaussian",
                                           target_modules=target_modules))
        transformer.train()
        self.params = list(filter(lambda p: p.requires_grad, transformer.parameters()))
        self.optimizer = torch.optim.AdamW([{"params": self.params, "lr": 1e-4}], betas=(0.9, 0.999),
                                           weight_decay=1e-4, eps=1e-8)
        g = torch.Generator().manual_seed(0)
        side = resolution // 8   # the script caches the VAE's raw latents: (1, 32, H/8, W/8)
        self.latents_cache = [torch.randn(1, LATENT_CHANNELS // 4, side, side, generator=g).to(device, dtype)
                              for _ in range(batch)]
        self.latents_bn_mean = torch.randn(1, LATENT_CHANNELS, 1, 1, generator=g).to(device) * 0.1
        self.latents_bn_std = torch.rand(1, LATENT_CHANNELS, 1, 1, generator=g).to(device) + 0.5
        joint = transformer.config.joint_attention_dim
        self.static_prompt_embeds = torch.randn(1, TEXT_TOKENS, joint, generator=g).to(device, dtype)
        self.static_text_ids = self.Pipe._prepare_text_ids(self.static_prompt_embeds).to(device)

    def get_sigmas(self, timesteps, n_dim=4, dtype=torch.float32):
        sigmas = self.noise_scheduler_copy.sigmas.to(device=self.device, dtype=dtype)
        schedule_timesteps = self.noise_scheduler_copy.timesteps.to(self.device)
        timesteps = timesteps.to(self.device)
        step_indices = [(schedule_timesteps == t).nonzero().item() for t in timesteps]
        sigma = sigmas[step_indices].flatten()
        while len(sigma.shape) < n_dim:
            sigma = sigma.unsqueeze(-1)
        return sigma

    def step(self) -> None:
        from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

        Pipe, transformer = self.Pipe, self.transformer
        prompt_embeds = self.static_prompt_embeds.repeat_interleave(self.batch, dim=0)
        text_ids = self.static_text_ids.repeat_interleave(self.batch, dim=0)
        model_input = torch.cat(self.latents_cache, dim=0)
        model_input = Pipe._patchify_latents(model_input)
        model_input = (model_input - self.latents_bn_mean) / self.latents_bn_std
        model_input_ids = Pipe._prepare_latent_ids(model_input).to(device=model_input.device)
        noise = torch.randn_like(model_input)
        bsz = model_input.shape[0]
        u = compute_density_for_timestep_sampling(weighting_scheme="none", batch_size=bsz, logit_mean=0.0,
                                                  logit_std=1.0, mode_scale=1.29)
        indices = (u * self.noise_scheduler_copy.config.num_train_timesteps).long()
        timesteps = self.noise_scheduler_copy.timesteps[indices].to(device=model_input.device)
        sigmas = self.get_sigmas(timesteps, n_dim=model_input.ndim, dtype=model_input.dtype)
        noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
        packed_noisy_model_input = Pipe._pack_latents(noisy_model_input)
        if transformer.config.guidance_embeds:
            guidance = torch.full([1], 3.5, device=self.device).expand(model_input.shape[0])   # the dev script's
        else:
            guidance = None
        with torch.autocast(self.device.type, dtype=torch.bfloat16):   # accelerate's mixed_precision="bf16"
            model_pred = transformer(hidden_states=packed_noisy_model_input, timestep=timesteps / 1000,
                                     guidance=guidance, encoder_hidden_states=prompt_embeds, txt_ids=text_ids,
                                     img_ids=model_input_ids, return_dict=False)[0]
        model_pred = model_pred[:, : packed_noisy_model_input.size(1):]
        model_pred = Pipe._unpack_latents_with_ids(model_pred, model_input_ids)
        weighting = compute_loss_weighting_for_sd3(weighting_scheme="none", sigmas=sigmas)
        target = noise - model_input
        loss = torch.mean((weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(target.shape[0], -1),
                          1).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad()
