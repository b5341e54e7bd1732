"""Real-size FLUX.2 training steps: the engine's step against diffusers' own training loop, same inputs.

FLUX.2 transformers are built from the configs the package ships (klein 4B, klein 9B, [dev]) with random
weights directly on the device (meta-device init, no download). Each setting runs warm-up steps, then
timed steps through the engine's own micro-step and optimizer step (trainer.micro_step / optimizer_step,
reading cached-like latents and embeddings from host memory as the latent cache hands them over), and
the same through a transcription of the inner loop of diffusers'
examples/dreambooth/train_dreambooth_lora_flux2_klein.py (its peft config, its timestep sampling, its
AdamW defaults, accelerate's bf16 autocast, latents and prompt embeddings already on the device as its
--cache_latents keeps them, no compile).

Printed per setting: median s/step, images/s, peak memory (torch.cuda.max_memory_allocated over the timed
steps) and model-FLOPs utilisation: forward 2*N*T plus backward 2*N*T for the input gradients (a frozen base
needs no weight-gradient matmul; the LoRA's own are negligible) plus attention, 4*T^2*d per block forward and
twice that backward; T = image + text tokens, recomputation from checkpointing not counted.

    python benchmarks/gpu_speed.py                              # every model that fits, on the GPU
    python benchmarks/gpu_speed.py --variants klein-4b --resolutions 1024 --steps 10
    python benchmarks/gpu_speed.py --tiny                       # tiny configs on the CPU: a smoke test
    python benchmarks/gpu_speed.py --variants klein-4b --resolutions 1024 --references 1 --no-baseline
                                                                # an edit LoRA's step: 1 reference per target
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers_loop import LATENT_CHANNELS, TEXT_TOKENS, ScriptLoop  # noqa: E402

from flux2_lora_core.config import load_config  # noqa: E402
from flux2_lora_core.models import shipped_config  # noqa: E402
from flux2_lora_core.models.quantized_linear import quantize_transformer  # noqa: E402
from flux2_lora_core.models.tiny_models import tiny_transformer_config  # noqa: E402
from flux2_lora_core.training import trainer  # noqa: E402
from flux2_lora_core.training.memory_plan import tokens as sequence_length  # noqa: E402
from flux2_lora_core.training.model_setup import prepare_model  # noqa: E402
from flux2_lora_core.training.flow_matching import PositionIds  # noqa: E402
from flux2_lora_core.training.lora import add_lora, trainable_parameters  # noqa: E402
from flux2_lora_core.training.metrics import MetricsLog  # noqa: E402
from flux2_lora_core.training.optimization import make_optimizer  # noqa: E402

MODELS = {"klein-4b": "flux2-klein-4b", "klein-9b": "flux2-klein-9b", "dev": "flux2-dev"}
PIXELS_PER_TOKEN = 16      # VAE /8, then 2x2 patches
# Dense bf16 tensor-core peaks from the vendors' datasheets (no sparsity), looked up by device name.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "B200": 2250e12, "GB200": 2500e12, "A100": 312e12,
             "A800": 312e12, "L40S": 362e12, "L40": 181e12, "RTX 6000 Ada": 364e12, "RTX 5090": 419e12,
             "RTX 4090": 165e12, "RTX 3090": 71e12, "A6000": 155e12, "A10": 125e12, "L4": 121e12}


# ---------------------------------------------------------------------------------------------- the model
def build_transformer(config: dict, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A FLUX.2 transformer with random weights made where it will run: nothing is built twice or on the host."""
    from diffusers import Flux2Transformer2DModel

    with torch.device("meta"):
        model = Flux2Transformer2DModel.from_config(config)
    model = model.to(dtype).to_empty(device=device)
    generator = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, p.shape[-1] ** -0.5, generator=generator)   # unit-variance outputs, no blow-up
            elif "norm" in name:
                p.fill_(1.0)
            else:
                p.zero_()
    if any(True for _ in model.buffers()):
        raise RuntimeError("the transformer has buffers, which to_empty leaves uninitialised: initialise them")
    model.requires_grad_(False)
    return model


def linear_parameters(model) -> int:
    """N of the FLOP count: the weights every token passes through (the base's linears, no LoRA)."""
    return sum(m.weight.numel() for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and "lora_" not in name)


def step_flops(config: dict, n_linear: int, resolution: int, batch: int, references: int = 0) -> float:
    tokens = sequence_length(resolution, TEXT_TOKENS, 1 + references)
    d_model = config["num_attention_heads"] * config["attention_head_dim"]
    blocks = config["num_layers"] + config["num_single_layers"]
    return batch * (4 * n_linear * tokens + 3 * 4 * tokens ** 2 * d_model * blocks)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in sorted(PEAK_BF16.items(), key=lambda kv: -len(kv[0])) if k in name), None)


# diffusers' attention backends that need nothing downloaded (its *_hub ones fetch kernels at run time)
ATTENTION = ("native", "_native_cudnn", "_native_flash", "_native_efficient", "flash", "_flash_3", "flex", "sage")


# ---------------------------------------------------------------------------------------------- the engine
class HostCache:
    """Cached-like inputs in host memory, handed over as LatentCache.latent / .text / .references hand over theirs."""

    def __init__(self, resolution: int, joint_dim: int, dtype: torch.dtype, seed: int = 0, references: int = 0):
        g = torch.Generator().manual_seed(seed)
        side = resolution // PIXELS_PER_TOKEN
        self._latent = torch.randn(LATENT_CHANNELS, side, side, generator=g).to(dtype)
        self._text = torch.randn(TEXT_TOKENS, joint_dim, generator=g).to(dtype)
        self._refs = torch.randn(references, LATENT_CHANNELS, side, side, generator=g).to(dtype) if references else None

    def references(self, index, resolution, *, flipped=False):
        return None if self._refs is None else self._refs.flip(-1) if flipped else self._refs

    def latent(self, index, resolution, *, flipped=False):
        return self._latent.flip(-1) if flipped else self._latent

    def text(self, index):
        return self._text

    def close(self):
        pass


def engine_session(transformer, variant, resolution, batch, rank, checkpointing, compile_blocks, out: Path,
                   swapped: int = 0, references: int = 0):
    overrides = [f"model.path={out}", f"data.path={out}", f"output.dir={out}", f"lora.rank={rank}",
                 f"lora.alpha={rank}", f"train.batch_size={batch}", "train.optimizer=adamw", "train.steps=1000000",
                 f"train.gradient_checkpointing={str(checkpointing).lower()}", f"train.compile={str(compile_blocks).lower()}",
                 f"data.resolution={resolution}", f"model.blocks_to_swap={swapped}"]
    config = load_config(None, overrides)
    t = config.train
    targets = add_lora(transformer, rank=rank, alpha=rank, dropout=0.0, targets=config.lora.targets, seed=t.seed)
    autocast_dtype, scaler = prepare_model(config, transformer, transformer.device, transformer.dtype, references)
    from diffusers.optimization import get_scheduler

    optimizer = make_optimizer(trainable_parameters(transformer), t)
    scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=t.steps)
    cache = HostCache(resolution, transformer.config.joint_attention_dim, transformer.dtype, references=references)
    return trainer.Session(config, out, cache, None, transformer, variant, targets, optimizer, scheduler, scaler,
                           autocast_dtype, transformer.device, transformer.dtype, {},
                           torch.Generator("cpu").manual_seed(t.seed), PositionIds(), MetricsLog(None), [], [], "")


def engine_step(s, resolution: int, batch: int) -> None:
    trainer.micro_step(s, list(range(batch)), resolution, 1.0)
    trainer.optimizer_step(s, want_norm=False)


# ---------------------------------------------------------------------------------------------- timing
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, device, warmup: int, steps: int) -> tuple[list[float], int | None]:
    """(per-step seconds, peak bytes over the timed steps). Each step ends in a synchronisation, so a
    step's time is its own; the engine's loop adds no synchronisation of its own beyond what it does."""
    for _ in range(warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return times, torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def profile(step, device, steps: int = 2, top: int = 15) -> str:
    """The top kernels (or CPU ops) of a few steps by self time: where a step's time goes."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=70)


def release_adapter(transformer) -> None:
    trainer.hand_back(transformer)
    for module in transformer.modules():
        module._compiled_call_impl = None   # Module.compile() is undone by hand: the next setting runs eager
    for p in transformer.parameters():
        p.grad = None
    gc.collect()
    if transformer.device.type == "cuda":
        torch.cuda.empty_cache()


def run_setting(name, transformer, variant, config, scheduler_config, loop, resolution, batch, rank, checkpointing,
                compile_blocks, warmup, steps, out: Path, profile_it: bool = False, quantization: str = "none",
                swapped: int = 0, references: int = 0) -> dict:
    device = transformer.device
    row = {"model": name, "loop": loop, "resolution": resolution, "batch": batch, "rank": rank,
           "checkpointing": checkpointing or bool(swapped), "compile": compile_blocks, "quantization": quantization,
           "blocks_to_swap": swapped, "references": references}
    started = time.perf_counter()
    try:
        if loop == "engine":
            s = engine_session(transformer, variant, resolution, batch, rank, checkpointing, compile_blocks, out,
                               swapped, references)
            times, peak = timed(lambda: engine_step(s, resolution, batch), device, warmup, steps)
            if profile_it:
                print(f"# profile: {row}\n" + profile(lambda: engine_step(s, resolution, batch), device), flush=True)
            del s
        else:
            script = ScriptLoop(transformer, resolution, batch, rank, checkpointing, scheduler_config)
            times, peak = timed(script.step, device, warmup, steps)
            del script
    except torch.OutOfMemoryError as exc:
        row.update(error=f"out of memory: {str(exc).splitlines()[0][:120]}")
        times, peak = None, None
    finally:
        release_adapter(transformer)
    row["wall_s"] = round(time.perf_counter() - started, 1)
    if times:
        median = statistics.median(times)
        flops = step_flops(config, linear_parameters(transformer), resolution, batch, references)
        peak_rate = peak_flops(device)
        row.update(s_per_step=median, images_per_s=batch / median, peak_gib=peak / 2**30 if peak else None,
                   tflops=flops / median / 1e12, mfu=flops / median / peak_rate if peak_rate else None,
                   steps=len(times), min_s=min(times), max_s=max(times))
    return row


def table(rows: list[dict]) -> str:
    lines = ["| model | loop | px | ckpt | compile | s/step | img/s | peak GiB | TFLOP/s | MFU | vs diffusers |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    base = {(r["model"], r["resolution"], r["checkpointing"]): r.get("s_per_step") for r in rows
            if r["loop"] == "diffusers"}
    for r in rows:
        setting = " ".join([*([r["attention"]] if r.get("attention", "default") != "default" else []),
                            *([r["quantization"]] if r.get("quantization", "none") != "none" else []),
                            *([f"swap {r['blocks_to_swap']}"] if r.get("blocks_to_swap") else []),
                            *([f"{r['references']} ref"] if r.get("references") else [])])
        r = {**r, "shown": f"{r['model']} {setting}".strip()}
        if "error" in r:
            lines.append(f"| {r['shown']} | {r['loop']} | {r['resolution']} | {r['checkpointing']} | {r['compile']} "
                         f"| {r['error']} | | | | | |")
            continue
        b = base.get((r["model"], r["resolution"], r["checkpointing"]))
        ratio = f"{b / r['s_per_step']:.2f}x" if b and r["loop"] == "engine" else ""
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "n/a"
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") else "n/a"
        lines.append(f"| {r['shown']} | {r['loop']} | {r['resolution']} | {r['checkpointing']} | {r['compile']} | "
                     f"{r['s_per_step']:.4f} | {r['images_per_s']:.2f} | {peak} | {r['tflops']:.0f} | {mfu} | {ratio} |")
    return "\n".join(lines)


def settings(args) -> list[tuple]:
    """(resolution, checkpointing, compile, loop) in the order they run: the cheap and telling ones first."""
    out = []
    for resolution in args.resolutions:
        for ckpt in args.checkpointing:
            if not args.only_compiled:
                out.append((resolution, ckpt, False, "engine"))
            if args.baseline and not args.only_compiled:
                out.append((resolution, ckpt, False, "diffusers"))
            if args.compile:
                out.append((resolution, ckpt, True, "engine"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default="klein-4b,klein-9b,dev")
    parser.add_argument("--resolutions", default="512,1024", type=lambda s: [int(v) for v in s.split(",")])
    parser.add_argument("--checkpointing", default="off,on",
                        type=lambda s: [{"on": True, "off": False}[v] for v in s.split(",")])
    parser.add_argument("--compile", action="store_true", help="also time the engine with regional compile")
    parser.add_argument("--only-compiled", action="store_true", help="time only the compiled engine")
    parser.add_argument("--no-baseline", dest="baseline", action="store_false")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--budget-s", type=float, default=420, help="skip what would start after this many seconds")
    parser.add_argument("--profile", action="store_true", help="print the top kernels of the engine's step "
                        "at the highest resolution, without checkpointing or compile")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--tiny", action="store_true", help="tiny configs on the CPU (a smoke test)")
    parser.add_argument("--quantization", choices=["none", "fp8", "int8", "nf4"], default="none",
                        help="the frozen base's model.quantization (its peak memory is the point)")
    parser.add_argument("--attention", choices=ATTENTION, help="diffusers' attention backend (default: its own, "
                        "torch SDPA); what issue 15 asks to measure before the engine picks one")
    parser.add_argument("--blocks-to-swap", type=int, default=0, help="model.blocks_to_swap (engine only; turns "
                        "checkpointing on)")
    parser.add_argument("--references", type=int, default=0, help="reference images per target: an edit LoRA's "
                        "step, each adding the target's tokens (engine only)")
    args = parser.parse_args()

    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        props = torch.cuda.get_device_properties(device)
        print(f"# {props.name}, {props.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, "
              f"bf16 peak {peak_flops(device) or 0:.3g} FLOP/s", flush=True)
    else:
        print(f"# CPU ({torch.get_num_threads()} threads), torch {torch.__version__}: tiny configs", flush=True)
    from flux2_lora_core.models import detect_variant

    started, rows = time.perf_counter(), []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants.split(","):
            shipped = MODELS[name]
            config = (tiny_transformer_config("dev" if name == "dev" else "klein") if args.tiny
                      else shipped_config(shipped, "transformer"))
            scheduler_config = shipped_config(shipped, "scheduler")
            if time.perf_counter() - started > args.budget_s:
                print(f"# {name}: skipped, over the {args.budget_s:.0f} s budget", flush=True)
                continue
            try:
                built = time.perf_counter()
                transformer = build_transformer(config, device, dtype)
                print(f"# {name}: {sum(p.numel() for p in transformer.parameters()) / 1e9:.2f}B parameters built in "
                      f"{time.perf_counter() - built:.1f} s", flush=True)
            except torch.OutOfMemoryError:
                print(f"# {name}: does not fit this device", flush=True)
                continue
            if args.quantization != "none":
                quantize_transformer(transformer, args.quantization, dtype=dtype)
            if args.attention:
                transformer.set_attention_backend(args.attention)
            variant = detect_variant(dict(transformer.config))
            for resolution, ckpt, compiled, loop in settings(args):
                if loop == "diffusers" and (args.blocks_to_swap or args.references):
                    continue   # diffusers' loop here is text-to-image, without block swap
                if time.perf_counter() - started > args.budget_s:
                    print(f"# {name} {resolution} px {loop}: skipped, over the budget", flush=True)
                    continue
                row = run_setting(name, transformer, variant, config, scheduler_config, loop, resolution, args.batch_size,
                                  args.rank, ckpt, compiled, args.warmup, args.steps, Path(tmp),
                                  profile_it=args.profile and loop == "engine" and not ckpt and not compiled
                                  and resolution == max(args.resolutions), quantization=args.quantization,
                                  swapped=args.blocks_to_swap, references=args.references)
                row["attention"] = args.attention or "default"
                rows.append(row)
                print(json.dumps(row), flush=True)
            del transformer
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(table(rows), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
