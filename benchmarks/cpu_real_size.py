"""A real-size FLUX.2 training step on the CPU: nothing in the engine may work only at tiny size.

FLUX.2 [klein] 4B is built from the shipped config with random weights (meta-device init, no download) and
trained through the engine's own micro-step and optimizer step (as benchmarks/gpu_speed.py does on a GPU),
with gradient checkpointing, in fp32: these CPUs have no bf16 matrix units, so bf16 here would only be slower.
Prints each step's seconds and loss, and the process's peak RSS. The base is built in fp32 before any
quantization, so the peak RSS reported after quantizing includes that build (printed separately).

    python benchmarks/cpu_real_size.py                         # klein 4B, 128 px, 1 warm-up + 2 timed steps
    python benchmarks/cpu_real_size.py --resolution 256 --steps 1
    python benchmarks/cpu_real_size.py --quantization nf4       # the same step over an NF4 base
    python benchmarks/cpu_real_size.py --quantization q8_0      # over GGUF Q8_0 blocks, as a GGUF file loads
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_speed import MODELS, build_transformer, engine_session  # noqa: E402

from flux2_lora_core.models import detect_variant, shipped_config  # noqa: E402
from flux2_lora_core.training import trainer  # noqa: E402


def peak_rss_gib() -> float:
    """The high-water mark of resident memory since the last reset_peak (Linux), else since the start."""
    try:
        status = Path("/proc/self/status").read_text().splitlines()
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 2**20   # KiB
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def reset_peak() -> None:
    """Start the high-water mark again (Linux): the steps' peak, not the fp32 build's before quantizing."""
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def to_gguf_q8_0(model: torch.nn.Module) -> None:
    """The blocks' linears as a GGUF Q8_0 file would load them (gguf.py): 32-value blocks of an fp16 scale and 32
    int8 codes, in a QuantizedLinear that decodes them (ggml_quants.q8_0). Writing a 16 GB GGUF file to load it
    back would measure the disk, not the step."""
    from flux2_lora_core.models.quantized_linear import QuantizedLinear, _blocks_linear

    for name, module in list(model.named_modules()):
        if type(module) is not torch.nn.Linear or not _blocks_linear(name):
            continue
        blocks = module.weight.detach().reshape(-1, 32)                                  # (out * in / 32, 32)
        scale = (blocks.abs().amax(dim=1, keepdim=True) / 127).to(torch.float16)       # (n, 1)
        codes = (blocks / scale.float().clamp(min=1e-12)).round().clamp(-127, 127).to(torch.int8)
        raw = torch.cat([scale.view(torch.uint8), codes.view(torch.uint8)], dim=1)     # (n, 34): d, then codes
        quantized = QuantizedLinear(module.in_features, module.out_features, scheme="Q8_0",
                                    weight=raw.reshape(module.out_features, -1), weight_scale=torch.empty(0),
                                    bias=None, compute_dtype=torch.float32)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, quantized)
        del module, blocks, codes, raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", choices=list(MODELS), default="klein-4b")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    parser.add_argument("--quantization", choices=["none", "fp8", "int8", "nf4", "q8_0"], default="none",
                        help="quantize the blocks' linears as model.quantization does (their peak RSS is the point)")
    args = parser.parse_args()

    started = time.perf_counter()
    config = shipped_config(MODELS[args.variant], "transformer")
    transformer = build_transformer(config, torch.device("cpu"), torch.float32)
    count = sum(p.numel() for p in transformer.parameters())
    if args.quantization == "q8_0":
        to_gguf_q8_0(transformer)
        print(f"made GGUF Q8_0; peak RSS so far {peak_rss_gib():.1f} GiB", flush=True)
    elif args.quantization != "none":
        from flux2_lora_core.models.quantized_linear import quantize_transformer

        quantize_transformer(transformer, args.quantization, dtype=torch.float32)
        print(f"quantized to {args.quantization}; peak RSS so far {peak_rss_gib():.1f} GiB", flush=True)
    reset_peak()
    print(f"{args.variant}: {count / 1e9:.2f}B parameters built in fp32 and made {args.quantization} in "
          f"{time.perf_counter() - started:.0f} s; resident now {peak_rss_gib():.1f} GiB", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        s = engine_session(transformer, detect_variant(dict(transformer.config)), args.resolution, 1, args.rank,
                           args.checkpointing, False, Path(tmp))
        for step in range(args.warmup + args.steps):
            start = time.perf_counter()
            loss = trainer.micro_step(s, [0], args.resolution, 1.0)
            trainer.optimizer_step(s, want_norm=False)
            kind = "warm-up" if step < args.warmup else "timed"
            print(f"step {step + 1} ({kind}): {time.perf_counter() - start:.1f} s, loss {loss.item():.4f}, "
                  f"peak RSS {peak_rss_gib():.1f} GiB", flush=True)
    print(f"{args.variant}, {args.resolution} px, rank {args.rank}, checkpointing {args.checkpointing}, "
          f"quantization {args.quantization}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}: peak RSS {peak_rss_gib():.1f} GiB")


if __name__ == "__main__":
    main()
