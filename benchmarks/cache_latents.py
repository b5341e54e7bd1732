"""How fast does `build_latent_cache` encode a dataset, and what does a cached image cost on disk?
(A benchmark, not a test.)

Writes N photo-like JPEGs (random sizes in --min-side..--max-side) with captions, then builds the
cache twice: the first build encodes everything, the second must reuse everything (its time is
the per-run overhead of hashing and checking). Reports items/s for both.

Models: the tiny FLUX.2 pipeline (default), or with --real-vae a real-size AutoencoderKLFlux2 (the
shipped config, random weights: speed does not depend on the values) next to the tiny text encoder,
on the best device here (CUDA in bf16 when available).

Also prints, computed from the real model configs, the on-disk size of one cached 1024 px image and
of one caption embedding per variant.

    python benchmarks/cache_latents.py [--count 200] [--resolution 512] [--real-vae] [--batch-size 4]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not
sys.path.insert(0, str(Path(__file__).resolve().parent))

from flux2_lora_core.cache import CacheSettings, build_latent_cache  # noqa: E402
from flux2_lora_core.cache.encoding import MAX_SEQUENCE_LENGTH  # noqa: E402
from flux2_lora_core.cache.frozen_encoders import LoadedEncoders  # noqa: E402
from flux2_lora_core.data import load_dataset  # noqa: E402
from flux2_lora_core.models import build_tiny_pipeline, shipped_config  # noqa: E402
from validate_dataset import write_pair  # noqa: E402  (the same photo-like generator)

TEXT_HIDDEN = {"flux2-klein-4b": 2560, "flux2-klein-9b": 4096, "flux2-dev": 5120}


def report_sizes(resolution: int = 1024) -> None:
    vae = shipped_config("flux2-vae")
    channels = 4 * vae["latent_channels"]  # after the 2x2 patchify
    side = resolution // 16
    latent = channels * side * side * 2  # bf16
    print(f"on disk per {resolution} px square image: latent ({channels}, {side}, {side}) bf16 = {latent / 2**20:.2f} MiB"
          f" ({2 * latent / 2**20:.2f} MiB with flips)")
    for name, hidden in TEXT_HIDDEN.items():
        dim = shipped_config(name, "transformer")["joint_attention_dim"]
        assert dim == 3 * hidden
        print(f"  caption embedding, {name}: ({MAX_SEQUENCE_LENGTH}, {dim}) bf16 = "
              f"{MAX_SEQUENCE_LENGTH * dim * 2 / 2**20:.2f} MiB"
              + (" (ComfyUI conditioning stores only the prompt's tokens, ~190 + caption)" if name == "flux2-dev" else ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--min-side", type=int, default=512)
    parser.add_argument("--max-side", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--real-vae", action="store_true", help="a real-size random-weight VAE instead of the tiny one")
    parser.add_argument("--family", choices=["klein", "dev"], default="klein")
    args = parser.parse_args()

    report_sizes()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    pipe = build_tiny_pipeline(args.family)
    vae = pipe.vae
    if args.real_vae:
        from diffusers import AutoencoderKLFlux2

        torch.manual_seed(0)
        vae = AutoencoderKLFlux2.from_config(shipped_config("flux2-vae")).eval()
        print(f"real-size VAE: {sum(p.numel() for p in vae.parameters()) / 1e6:.1f} M parameters")
    vae.to(device, dtype)
    pipe.text_encoder.to(device, dtype)
    encoders = LoadedEncoders(vae, pipe.text_encoder, pipe.tokenizer, args.family)

    work = Path(tempfile.mkdtemp(prefix="flux2-cache-bench-"))
    try:
        data = work / "data"
        data.mkdir()
        for i in range(args.count):
            write_pair(data, i, seed=0)
        dataset = load_dataset(data)
        settings = CacheSettings(resolutions=(args.resolution,))
        print(f"{args.count} images, {args.resolution} px buckets, batch {args.batch_size}, {device} {dtype}, "
              f"{torch.get_num_threads()} CPU threads")
        for label in ("first build (encodes)", "second build (reuses)"):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            cache = build_latent_cache(dataset, encoders, settings, cache_dir=work / "cache", batch_size=args.batch_size)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            s = cache.summary
            print(f"{label}: {seconds:.2f} s, {args.count / seconds:.1f} items/s "
                  f"(latents encoded {s.images_encoded}, reused {s.images_reused}; captions encoded "
                  f"{s.captions_encoded}, reused {s.captions_reused}; {s.bytes_on_disk / 2**20:.1f} MiB)")
        if device.type == "cuda":
            print(f"peak CUDA memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
