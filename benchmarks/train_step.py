"""Trainer overhead: steady-state training steps against a bare forward/backward/optimizer loop.

Both run in the same process on the same transformer, LoRA, optimizer and tensors: the trainer's loop
(reading the latent cache, drawing noise and timesteps, position ids, metrics, callbacks) against a
loop that only calls the model on tensors already in memory. Blocks of each alternate, so machine
noise hits both alike; the ratio of the totals is the trainer's overhead (aim: <= 1.10).

    python benchmarks/train_step.py                       # tiny klein model on the CPU, 128 px
    python benchmarks/train_step.py --resolution 256 --blocks 6 --block-steps 10
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flux2_lora_core.config import load_config  # noqa: E402
from flux2_lora_core.data import write_demo_dataset  # noqa: E402
from flux2_lora_core.models import write_tiny_model  # noqa: E402
from flux2_lora_core.training import Callbacks, trainer  # noqa: E402
from flux2_lora_core.training.flow_matching import image_ids, predict_velocity, text_ids  # noqa: E402
from flux2_lora_core.training.lora import trainable_parameters  # noqa: E402


def bare_loop(s, steps: int, x0, text, noise, sigmas, img_ids, txt_ids, guidance):
    params = trainable_parameters(s.transformer)
    for _ in range(steps):
        with torch.autocast(s.device.type, dtype=s.autocast_dtype, enabled=s.autocast_dtype is not None):
            x_t = (1 - sigmas[:, None, None, None]) * x0 + sigmas[:, None, None, None] * noise
            pred = predict_velocity(s.transformer, x_t, text, sigmas, img_ids=img_ids, txt_ids=txt_ids,
                                    guidance=guidance)
            loss = torch.nn.functional.mse_loss(pred.float(), (noise - x0).float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        s.optimizer.step()
        s.optimizer.zero_grad(set_to_none=True)
    if s.device.type == "cuda":
        torch.cuda.synchronize()


def trainer_block(s, steps: int, callbacks) -> None:
    s.config = s.config.replace({"train.steps": s.step + steps})
    trainer.train_loop(s, callbacks)
    if s.device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--block-steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--prefetch-batches", type=int, default=2, help="train.prefetch_batches (0: off)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_tiny_model(root / "model", variant="klein")
        write_demo_dataset(root / "data", count=4, size=max(256, args.resolution))
        overrides = [f"model.path={root / 'model'}", f"data.path={root / 'data'}", f"data.resolution={args.resolution}",
                     f"cache.dir={root / 'cache'}", f"output.dir={root / 'out'}", f"lora.rank={args.rank}",
                     f"lora.alpha={args.rank}", f"train.batch_size={args.batch_size}", "data.buckets=false",
                     "train.steps=1000000", "train.log_every=10", f"train.gradient_checkpointing="
                     f"{str(args.gradient_checkpointing).lower()}", f"train.prefetch_batches={args.prefetch_batches}"]
        s = trainer.setup(load_config(None, overrides), Callbacks())
        callbacks = Callbacks()
        trainer_block(s, args.warmup, callbacks)

        resolution = args.resolution
        indices = s.streams[resolution].next()
        x0, text, _ = trainer.micro_batch(s, indices, resolution)
        g = torch.Generator("cpu").manual_seed(0)
        noise = torch.randn(x0.shape, generator=g).to(s.device, s.dtype)
        sigmas = torch.rand(x0.shape[0], generator=g).to(s.device)
        h, w = x0.shape[-2:]
        img, txt = image_ids(h, w, s.device), text_ids(text.shape[1], s.device)
        guidance = s.config.train.guidance if s.variant.guidance_embeds else None
        bare_loop(s, args.warmup, x0, text, noise, sigmas, img, txt, guidance)

        timings = {"trainer": [], "bare": []}
        for _ in range(args.blocks):
            start = time.perf_counter()
            trainer_block(s, args.block_steps, callbacks)
            timings["trainer"].append((time.perf_counter() - start) / args.block_steps)
            start = time.perf_counter()
            bare_loop(s, args.block_steps, x0, text, noise, sigmas, img, txt, guidance)
            timings["bare"].append((time.perf_counter() - start) / args.block_steps)
        trainer.cleanup(s, release_model=True)

    print(f"tiny FLUX.2 [klein], {resolution} px ({h * w} image + {text.shape[1]} text tokens), batch "
          f"{args.batch_size}, rank {args.rank}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}")
    for name, values in timings.items():
        print(f"  {name:8s} s/step: median {statistics.median(values):.4f}  mean {statistics.mean(values):.4f}  "
              f"blocks {' '.join(f'{v:.4f}' for v in values)}")
    ratio = sum(timings["trainer"]) / sum(timings["bare"])
    print(f"  trainer / bare (totals over {args.blocks} x {args.block_steps} steps each): {ratio:.3f}")


if __name__ == "__main__":
    main()
