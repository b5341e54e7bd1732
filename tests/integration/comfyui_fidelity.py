"""ComfyUI's side of test_fidelity.py: what ComfyUI's own code makes of the engine's files.

Usage: python comfyui_fidelity.py COMFYUI_DIR REQUEST.json OUT_DIR

It runs in a process of its own, started the way the launcher starts ComfyUI's main.py (the torchvision /
torchaudio shims, the checkout first on sys.path, `--cpu`), so ComfyUI's modules import exactly as in ComfyUI
(its top-level `nodes` among them, which this repository's nodes/ package would shadow) and nothing of ComfyUI
leaks into the pytest process. For each variant of the request it goes through ComfyUI's nodes and loaders and
writes OUT_DIR/<variant>.safetensors and OUT_DIR/results.json:

- UNETLoader the transformer, LoraLoaderModelOnly the engine's LoRA (ComfyUI's log captured: every "lora key not
  loaded" / "NOT LOADED" line is reported), the patched weights once ComfyUI has loaded the model;
- the denoiser: Flux2.extra_conds(cross_attn=...) and apply_model at each requested sigma;
- CLIPTextEncode of the prompt (token ids too), VAEEncode of an image read by LoadImage;
- for an edit variant ("reference" in the job): LoadImage + VAEEncode of the reference image, and ComfyUI's
  ReferenceLatent node on the positive and negative conditioning, so the denoiser and the sample see it as in
  ComfyUI's FLUX.2 edit workflows (FLUX.2's default "index" method: time coordinate 10 per reference);
- a sample: EmptyFlux2LatentImage, RandomNoise, Flux2Scheduler, KSamplerSelect "euler", CFGGuider ([klein]) or
  FluxGuidance + BasicGuider ([dev]), SamplerCustomAdvanced: the official FLUX.2 graph.

ComfyUI's text-encoder and VAE loaders size models from real widths and cannot load the tiny ones, so those two are
built the way comfy/sd.py builds them for real files, with the overrides ComfyUI itself accepts, and nothing else:
- text encoders: `comfy.sd.CLIP(ClipTarget(KleinTokenizer, klein_te(...)) | ClipTarget(Flux2Tokenizer,
  flux2_te(...)), model_options={"<name>_model_config": the file's sizes})`. Two sizes ComfyUI fixes in code are
  set on the tiny scale: the config classes' head_dim (a class attribute in comfy/text_encoders/llama.py, not a
  config field) and, for [klein], the id of <|endoftext|> (ComfyUI pads with and masks from Qwen's real 151643;
  the tiny vocabulary has it at 256), given through ComfyUI's own `<name>_tokenizer_class` / `<name>_class` hooks
  as subclasses that change only that id and the tokenizer folder. [dev]'s tokenizer comes from the file's
  `tekken_model`, as in ComfyUI; v0.29's `load_mistral_tokenizer` calls transformers' old MistralConverter
  signature and fails on transformers >= 5.2x, and only then the same conversion runs through the current API.
- the VAE: `comfy.sd.VAE(sd, config=...)` with the tiny channel counts, then the latent channels and downscale
  that ComfyUI's own FLUX.2 detection sets (x4 channels, x2 downscale for the latent BatchNorm).
Every such deviation is also written to results.json ("overrides"), so the test can show what was changed.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


class LogCapture(logging.Handler):
    """Every warning ComfyUI logs while a block runs."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def start_like_comfyui(comfyui_dir: str) -> None:
    spec = importlib.util.spec_from_file_location("comfyui_launcher", HERE / "comfyui_launcher.py")
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    launcher.shim_torchvision()
    launcher.shim_torchaudio()
    sys.path[0] = comfyui_dir      # ComfyUI's own modules first, as when main.py runs from its checkout
    sys.path.append(str(REPO))     # the engine, for the one check that runs it inside ComfyUI
    sys.argv = [os.path.join(comfyui_dir, "main.py"), "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.utils

    comfy.utils.set_progress_bar_enabled(False)  # no tqdm bars in the test's output


# ---------------------------------------------------------------------------------------------- text encoders
def _config_of(path: str) -> dict:
    """The tiny text encoder's transformers config, from the file's header (see tiny_models._metadata)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        config = json.loads(f.metadata()["flux2_lora.config"])
    return config.get("text_config", config)  # Mistral3: the language model's part


def _sizes(config: dict) -> dict:
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "rms_norm_eps")
    sizes = {k: config[k] for k in keys}
    sizes["rope_theta"] = (config.get("rope_parameters") or {}).get("rope_theta", config.get("rope_theta"))
    return sizes


def klein_clip(job: dict, overrides: list[str]):
    import comfy.sd
    import comfy.utils
    from comfy import sd1_clip
    from comfy.supported_models_base import ClipTarget
    from comfy.text_encoders import flux, llama
    from comfy.text_encoders.hunyuan_video import llama_detect
    from transformers import AutoTokenizer

    config = _config_of(job["text_encoder"])
    tokenizer_dir = job["tokenizer"]
    pad = AutoTokenizer.from_pretrained(tokenizer_dir).convert_tokens_to_ids("<|endoftext|>")
    llama.Qwen3_4BConfig.head_dim = config["head_dim"]
    overrides += [f"Qwen3_4BConfig.head_dim = {config['head_dim']} (real: 128)",
                  f"<|endoftext|> id {pad} (real: 151643)",
                  "tokenizer: the tiny model's folder (ComfyUI's qwen25_tokenizer has the real vocabulary)"]

    class TinyQwen3Tokenizer(flux.Qwen3Tokenizer):
        """flux.Qwen3Tokenizer's settings, with the tiny vocabulary's folder and pad id."""

        def __init__(self, embedding_directory=None, tokenizer_data=None):
            sd1_clip.SDTokenizer.__init__(
                self, tokenizer_dir, pad_with_end=False, embedding_directory=embedding_directory,
                embedding_size=config["hidden_size"], embedding_key="qwen3_4b", tokenizer_class=flux.Qwen2Tokenizer,
                has_start_token=False, has_end_token=False, pad_to_max_length=False, max_length=99999999,
                min_length=512, pad_token=pad, tokenizer_data=tokenizer_data or {})

    class TinyQwen3_4BModel(flux.Qwen3_4BModel):
        """flux.Qwen3_4BModel with the tiny vocabulary's pad id (it marks where the prompt ends)."""

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.special_tokens = {"pad": pad}

    sd = comfy.utils.load_torch_file(job["text_encoder"], safe_load=True)
    target = ClipTarget(flux.KleinTokenizer, flux.klein_te(**llama_detect(sd), model_type="qwen3_4b"))
    return comfy.sd.CLIP(target, state_dict=[sd], tokenizer_data={"qwen3_4b_tokenizer_class": TinyQwen3Tokenizer},
                         model_options={"qwen3_4b_model_config": _sizes(config), "qwen3_4b_class": TinyQwen3_4BModel})


def _current_mistral_tokenizer(data):
    """flux.load_mistral_tokenizer's result through transformers' current MistralConverter(vocab_file=...)."""
    from transformers.integrations.mistral import MistralConverter

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "tekken.json"
        path.write_bytes(data.numpy().tobytes())
        return {"tokenizer_object": MistralConverter(vocab_file=str(path)).converted(), "legacy": False}


def dev_clip(job: dict, overrides: list[str]):
    import comfy.sd
    import comfy.utils
    from comfy.supported_models_base import ClipTarget
    from comfy.text_encoders import flux, llama
    from comfy.text_encoders.hunyuan_video import llama_detect

    config = _config_of(job["text_encoder"])
    llama.Mistral3Small24BConfig.head_dim = config["head_dim"]
    overrides.append(f"Mistral3Small24BConfig.head_dim = {config['head_dim']} (real: 128)")
    sd = comfy.utils.load_torch_file(job["text_encoder"], safe_load=True)
    try:
        flux.load_mistral_tokenizer(sd["tekken_model"])
    except TypeError as exc:  # v0.29 with transformers >= 5.2x
        overrides.append(f"flux.load_mistral_tokenizer: TypeError ({str(exc)[:60]}); the same tekken_model "
                         "converted by transformers' current MistralConverter(vocab_file=...)")
        flux.load_mistral_tokenizer = _current_mistral_tokenizer
    # As load_text_encoder_state_dicts does for a Mistral file (not pruned: the tiny file has all its layers).
    target = ClipTarget(flux.Flux2Tokenizer, flux.flux2_te(**llama_detect(sd)))
    return comfy.sd.CLIP(target, state_dict=[sd], tokenizer_data={"tekken_model": sd.get("tekken_model")},
                         model_options={"mistral3_24b_model_config": _sizes(config)})


def token_ids(clip, text: str) -> list[int]:
    (batch,) = next(iter(clip.tokenize(text).values()))
    return [int(token) for token, _ in batch]


# ---------------------------------------------------------------------------------------------- VAE
def tiny_vae(path: str, overrides: list[str]):
    import comfy.sd
    import comfy.utils
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        config = json.loads(f.metadata()["flux2_lora.config"])
    channels = config["block_out_channels"]
    ddconfig = {"double_z": True, "z_channels": config["latent_channels"], "resolution": 256, "in_channels": 3,
                "out_ch": 3, "ch": channels[0], "ch_mult": [c // channels[0] for c in channels],
                "num_res_blocks": config["layers_per_block"], "attn_resolutions": [], "dropout": 0.0,
                "batch_norm_latent": True}
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(path), config={"params": {"embed_dim": ddconfig["z_channels"],
                                                                               "ddconfig": ddconfig}})
    vae.latent_channels, vae.downscale_ratio, vae.upscale_ratio = 4 * ddconfig["z_channels"], 16, 16
    overrides.append(f"VAE from a config: ch {ddconfig['ch']}, ch_mult {ddconfig['ch_mult']} (real: 128, [1, 2, 4, 4])")
    return vae


# ---------------------------------------------------------------------------------------------- one variant
def run_variant(job: dict) -> tuple[dict, dict]:
    import comfy.model_management as mm
    import folder_paths
    import nodes
    import torch
    from comfy_extras import nodes_custom_sampler as custom
    from comfy_extras import nodes_flux
    from safetensors.torch import load_file

    tensors, info, overrides = {}, {}, []
    for kind, part in (("diffusion_models", "transformer"), ("loras", "lora")):
        folder_paths.add_model_folder_path(kind, str(Path(job[part]).parent))
        found = folder_paths.get_full_path_or_raise(kind, Path(job[part]).name)
        if Path(found).resolve() != Path(job[part]).resolve():  # an earlier variant's file of the same name
            raise SystemExit(f"{job[part]}: ComfyUI finds {found} under that name; give each variant's file its own")
    (model,) = nodes.UNETLoader().load_unet(Path(job["transformer"]).name, "default")
    info["model_dtype"] = str(model.model.get_dtype())

    capture = LogCapture()
    logging.getLogger().addHandler(capture)
    try:
        (patched,) = nodes.LoraLoaderModelOnly().load_lora_model_only(model, Path(job["lora"]).name, 1.0)
    finally:
        logging.getLogger().removeHandler(capture)
    info["lora_warnings"] = [m for m in capture.messages if "lora key not loaded" in m or "NOT LOADED" in m]
    info["lora_patched_layers"] = len(patched.patches)
    mm.load_models_gpu([patched], force_full_load=True)  # ComfyUI patches the weights as it loads the model
    for key, value in patched.model.diffusion_model.state_dict().items():
        tensors[f"patched/{key}"] = value.detach().clone()

    capture = LogCapture()
    logging.getLogger().addHandler(capture)
    try:
        clip = (klein_clip if job.get("family", job["variant"]) == "klein" else dev_clip)(job, overrides)
        vae = tiny_vae(job["vae"], overrides)
    finally:
        logging.getLogger().removeHandler(capture)
    info["load_warnings"] = [m for m in capture.messages if "missing" in m.lower()]

    (positive,) = nodes.CLIPTextEncode().encode(clip, job["prompt"])
    (negative,) = nodes.CLIPTextEncode().encode(clip, "")
    tensors["text/prompt"], tensors["text/empty"] = positive[0][0], negative[0][0]
    info["token_ids"] = {"prompt": token_ids(clip, job["prompt"]), "empty": token_ids(clip, "")}

    folder_paths.set_input_directory(str(Path(job["image"]).parent))
    edit = {}
    if job.get("reference"):   # an edit LoRA: LoadImage -> VAEEncode -> ReferenceLatent, on both conditionings
        from comfy_extras.nodes_edit_model import ReferenceLatent

        image, _ = nodes.LoadImage().load_image(Path(job["reference"]).name)
        (reference,) = nodes.VAEEncode().encode(vae, image)
        tensors["vae/reference"] = reference["samples"]
        positive = ReferenceLatent.execute(conditioning=positive, latent=reference)[0]
        negative = ReferenceLatent.execute(conditioning=negative, latent=reference)[0]
        edit = {"reference_latents": positive[0][1]["reference_latents"]}   # what the sampler hands extra_conds
        info["reference_latents"] = len(edit["reference_latents"])
    inputs = load_file(job["inputs"])
    guidance = job["guidance"]
    for sigma in job["sigmas"]:
        x = inputs[f"x_t/{sigma}"]
        conds = patched.model.extra_conds(cross_attn=positive[0][0], noise=x, device=x.device, **edit,
                                          **({"guidance": guidance} if guidance is not None else {}))
        with torch.no_grad():
            denoised = patched.model.apply_model(x, torch.tensor([sigma]), **{k: c.cond for k, c in conds.items()})
        tensors[f"denoised/{sigma}"] = denoised
        tensors[f"c_crossattn/{sigma}"] = conds["c_crossattn"].cond

    image, _ = nodes.LoadImage().load_image(Path(job["image"]).name)
    (latent,) = nodes.VAEEncode().encode(vae, image)
    tensors["vae/latent"] = latent["samples"]

    s = job["sample"]
    empty = nodes_flux.EmptyFlux2LatentImage.execute(width=s["size"], height=s["size"])[0]
    sigmas = nodes_flux.Flux2Scheduler.execute(steps=s["steps"], width=s["size"], height=s["size"])[0]
    sampler = custom.KSamplerSelect.execute(sampler_name="euler")[0]
    if guidance is None:
        guider = custom.CFGGuider.execute(model=patched, positive=positive, negative=negative, cfg=s["cfg"])[0]
    else:
        conditioning = nodes_flux.FluxGuidance.execute(conditioning=positive, guidance=guidance)[0]
        guider = custom.BasicGuider.execute(model=patched, conditioning=conditioning)[0]
    noise = custom.RandomNoise.execute(noise_seed=s["seed"])[0]
    out = custom.SamplerCustomAdvanced.execute(noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
                                               latent_image=empty)[0]
    tensors["sample/latent"], tensors["sample/sigmas"] = out["samples"], sigmas
    info["overrides"] = [f"text encoder sizes from the file ({_sizes(_config_of(job['text_encoder']))['hidden_size']} "
                         "hidden) through <name>_model_config", *overrides]
    return {k: v.detach().float().contiguous().clone() for k, v in tensors.items()}, info


def bundled_tokenizer(job: dict) -> dict:
    """The engine, running inside this ComfyUI, finds ComfyUI's own Qwen tokenizer for a lone [klein] file; the
    token ids it makes with it, next to ComfyUI's own KleinTokenizer's (the real qwen25_tokenizer, unmodified)."""
    from comfy.text_encoders import flux

    from flux2_lora_core.cache.encoding import tokenize_prompts
    from flux2_lora_core.models import load_tokenizer, locate_tokenizer

    text_encoder = Path(job["text_encoder"])
    found = locate_tokenizer(text_encoder)
    tokenizer = load_tokenizer(None, text_encoder)
    engine = tokenize_prompts(tokenizer, [job["prompt"]], family="klein", mode="comfyui")
    (comfyui,) = flux.KleinTokenizer().tokenize_with_weights(job["prompt"])["qwen3_4b"]
    return {"found": str(found), "engine_ids": engine.input_ids[0].tolist(),
            "comfyui_ids": [int(token) for token, _ in comfyui]}


def main(argv: list[str]) -> None:
    if len(argv) != 4:
        raise SystemExit(__doc__)
    comfyui_dir, request, out = argv[1], json.loads(Path(argv[2]).read_text()), Path(argv[3])
    start_like_comfyui(comfyui_dir)
    from safetensors.torch import save_file

    results = {}
    for variant, job in request["variants"].items():
        tensors, results[variant] = run_variant({**job, "variant": variant})
        save_file(tensors, str(out / f"{variant}.safetensors"))
    if "bundled_tokenizer" in request:
        results["bundled_tokenizer"] = bundled_tokenizer(request["bundled_tokenizer"])
    (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv)
