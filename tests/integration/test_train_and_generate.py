"""The point of the pack, through a real ComfyUI's API: a LoRA trained and used for generation in the same graph.

Train's LORA_MODEL goes into the stock "Load LoRA Model" on the UNETLoader's model, and ComfyUI's own FLUX.2
sampling nodes draw an image with it. The tiny FLUX.2 [klein] is written under the standard file names
(flux-2-klein-base-4b.safetensors, flux2-vae.safetensors, qwen_3_4b.safetensors, with its tiny tokenizer's
files beside the text encoder), so the graph names the files a user has. ComfyUI's stock CLIPLoader and VAELoader
cannot size the tiny text encoder and VAE: the test-only tiny_loaders nodes stand in for exactly those two.
"""

from __future__ import annotations

import json

import pytest

from flux2_lora_core.data.demo_data import write_demo_dataset
from flux2_lora_core.models.tiny_models import COMFYUI_FILES, write_tiny_model

pytestmark = pytest.mark.integration

STANDARD = {"transformer": "diffusion_models/flux-2-klein-base-4b.safetensors",
            "vae": "vae/flux2-vae.safetensors", "text_encoder": "text_encoders/qwen_3_4b.safetensors"}


@pytest.fixture(scope="module")
def standard_klein(comfyui, tmp_path_factory):
    """The tiny [klein] in the server's models/ under the standard names, and a dataset in input/."""
    written = tmp_path_factory.mktemp("standard") / "klein"
    write_tiny_model(written, variant="klein", fmt="comfyui")
    models = comfyui.base / "models"
    for part, name in STANDARD.items():
        (models / name).parent.mkdir(parents=True, exist_ok=True)
        (written / COMFYUI_FILES["klein"][part]).rename(models / name)
    for file in (written / "tokenizer").iterdir():  # beside the text encoder, where the engine looks first
        file.rename(models / "text_encoders" / file.name)
    write_demo_dataset(comfyui.input_dir / "my_dataset", count=2, size=256)


def train_and_generate(steps: int = 2, size: int = 64) -> dict:
    """The train-and-generate graph in API format (the template's, with the tiny loaders swapped in)."""
    return {
        "1": {"class_type": "Flux2LoraLoadDataset",
              "inputs": {"folder": "my_dataset", "caption_extensions": "txt", "trigger_word": "", "repeats": 1,
                         "recursive": True}},
        "2": {"class_type": "Flux2LoraLoadTrainingModel",
              "inputs": {"path": "flux-2-klein-base-4b.safetensors", "vae": "flux2-vae.safetensors",
                         "text_encoder": "qwen_3_4b.safetensors", "tokenizer": "", "variant": "auto", "dtype": "fp32",
                         "text_conditioning": "comfyui"}},
        "3": {"class_type": "Flux2LoraCacheLatents",
              "inputs": {"dataset": ["1", 0], "model": ["2", 0], "resolution": str(size), "buckets": True,
                         "max_aspect": 4.0, "flip": False, "cache_dir": ""}},
        "4": {"class_type": "Flux2LoraConfigureLora",
              "inputs": {"rank": 4, "alpha": 4.0, "targets": "attention_mlp", "optimizer": "adamw", "lr": 1e-3,
                         "lr_scheduler": "constant", "warmup_steps": 0, "steps": steps, "batch_size": 1,
                         "gradient_accumulation": 1, "timestep_sampling": "logit_normal", "caption_dropout": 0.0,
                         "gradient_checkpointing": False, "seed": 1, "sample_every": 0, "sample_prompts": "",
                         "checkpoint_every": 0}},
        "5": {"class_type": "Flux2LoraTrain", "inputs": {"cache": ["3", 0], "lora_config": ["4", 0], "name": "gen"}},
        "6": {"class_type": "UNETLoader",
              "inputs": {"unet_name": "flux-2-klein-base-4b.safetensors", "weight_dtype": "default"}},
        "7": {"class_type": "LoraModelLoader", "inputs": {"model": ["6", 0], "lora": ["5", 0], "strength_model": 1.0,
                                                   "bypass": False}},
        "8": {"class_type": "TinyFlux2CLIPLoader", "inputs": {"clip_name": "qwen_3_4b.safetensors",
                                                              "tokenizer": "text_encoders"}},
        "9": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["8", 0], "text": "a photo of a ring"}},
        "10": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["8", 0], "text": ""}},
        "11": {"class_type": "TinyFlux2VAELoader", "inputs": {"vae_name": "flux2-vae.safetensors"}},
        "12": {"class_type": "EmptyFlux2LatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "13": {"class_type": "Flux2Scheduler", "inputs": {"steps": 2, "width": size, "height": size}},
        "14": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "15": {"class_type": "RandomNoise", "inputs": {"noise_seed": 7}},
        "16": {"class_type": "CFGGuider", "inputs": {"model": ["7", 0], "positive": ["9", 0], "negative": ["10", 0],
                                                     "cfg": 4.0}},
        "17": {"class_type": "SamplerCustomAdvanced",
               "inputs": {"noise": ["15", 0], "guider": ["16", 0], "sampler": ["14", 0], "sigmas": ["13", 0],
                          "latent_image": ["12", 0]}},
        "18": {"class_type": "VAEDecode", "inputs": {"samples": ["17", 0], "vae": ["11", 0]}},
        "19": {"class_type": "SaveImage", "inputs": {"images": ["18", 0], "filename_prefix": "flux2_lora_gen"}},
    }


def test_a_lora_trained_in_the_graph_generates_an_image_in_the_same_graph(comfyui, standard_klein):
    entry = comfyui.run(train_and_generate())
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], indent=1)[-6000:]
    (image,) = entry["outputs"]["19"]["images"]
    saved = comfyui.base / "output" / image["subfolder"] / image["filename"]
    assert saved.is_file() and saved.stat().st_size > 0
