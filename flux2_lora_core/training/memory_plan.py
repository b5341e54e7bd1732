"""How much memory a LoRA training step needs, per setting, before anything is loaded: `flux2-lora plan`.

The peak of a step is three parts, each computed from the transformer config (no weights are read):
- weights: the frozen base, `parameter_count(config)`: the blocks' linears at the quantization's bytes per
  parameter (bf16 2, fp8 1, int8 1, nf4 0.5625 with its per-block scales), the rest (embedders, modulation,
  output layers) in bf16, as quantized_linear.py leaves them;
- LoRA + optimizer: the LoRA parameters (rank x (in + out) per targeted Linear) x 16 bytes for AdamW
  (fp32 weight, fp32 gradient, two fp32 moments), 10 for AdamW8bit, 12 for SGD with momentum;
- activations: what autograd keeps for backward. Every block sees all B x S tokens, S = (px / 16)^2 image
  tokens + the text tokens (512), at the hidden size D, so a block keeps `k` tensors of B x S x D
  compute-dtype elements. Counting the tensors a FLUX.2 block saves (norm inputs and outputs, the LoRA
  inputs, the q/k norm inputs, q/k/v and the attention output of flash attention, the SwiGLU halves and
  product, the gated residuals) gives k ~ 23 for a double and a single block alike.
  Without checkpointing: k x blocks. With it: each block's input (k_saved per block) plus one block recomputed
  in backward with its gradients (k_recompute), independent of the block count.

The three constants were FITTED (least squares on the relative error) to the peak memory of the engine's
step measured on an NVIDIA H200 (benchmarks/results/2026-11-29-nvidia-h200.md: bf16 base, batch 1, rank 16,
512 text tokens, AdamW; klein-4B, klein-9B, [dev], 512 / 1024 px, checkpointing on and off); they predict
every measured row within 15% (tests/core/training/test_memory_plan.py). Quantized bases are not measured on a
GPU yet: their rows count the blocks' linears at the quantization's bytes and the rest at bf16 (as loaded), the
same activations, and the decoding of the widest Linear while it computes (QUANTIZED_TRANSIENT).
`torch.cuda.max_memory_allocated` leaves out the CUDA context (~0.5-1 GiB): "fits" keeps `HEADROOM_GIB` free.
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 2 ** 30
# Bytes per base parameter, scales included (nf4: 4 bits + an fp32 absmax per 64 weights, as quantized_linear.py
# stores it; the per-row fp8/int8 scales are negligible).
QUANTIZATIONS = {"none": 2.0, "fp8": 1.0, "int8": 1.0, "nf4": 0.5 + 4 / 64}
# Bytes per LoRA parameter: fp32 weight + fp32 gradient + the optimizer's state.
OPTIMIZER_BYTES = {"adamw": 16, "adamw8bit": 10, "sgd": 12}
ACTIVATIONS_PER_BLOCK = 23.8    # k without checkpointing (counted: ~23; fitted to the H200 peaks)
SAVED_PER_BLOCK = 0.83          # k_saved with checkpointing: each block's input (counted: 1)
RECOMPUTE = 47.0                # k_recompute: one block recomputed in backward (~23), its gradients and transients
HEADROOM_GIB = 1.0              # the CUDA context and the allocator's slack, outside max_memory_allocated
TEXT_TOKENS = 512               # the engine pads or truncates every prompt to 512 tokens
# Text encoders by hidden size (joint_attention_dim / 3): parameter counts from their model cards (Qwen3-4B
# 4.02 B, Qwen3-8B 8.19 B, Mistral-Small-3.x-24B 24.0 B); the configs are not shipped with the package.
TEXT_ENCODERS = {2560: ("Qwen3-4B", 4.02e9, 36, 151936), 4096: ("Qwen3-8B", 8.19e9, 36, 151936),
                 5120: ("Mistral Small 3.x 24B", 24.0e9, 40, 131072)}   # (name, parameters, layers, vocabulary)
# Bytes per text-encoder parameter under model.text_encoder_quantization (nf4 with its fp32 absmax per 64).
TEXT_QUANTIZATIONS = {"bf16": 2.0, "fp8/int8": 1.0, "nf4": 0.5 + 4 / 64}
# Bytes per weight of the widest Linear while it is decoded, besides the decoded copy (dtype bytes): fp8 / int8 go
# through one fp32 temporary (quantized_linear.dequantize); nf4 through bitsandbytes' kernel, straight to dtype.
QUANTIZED_TRANSIENT = {"none": None, "fp8": 4, "int8": 4, "nf4": 0}
SWAP_WINDOW = 2                 # swapped blocks on the device at once: the running one and the next (block_swap.AHEAD + 1)
# Speed order of the settings: measured on the H200 for checkpointing (off is 1.4-2x faster); assumed for the
# quantizations (a bf16 matmul is the fastest path; fp8/int8 dequantize, nf4 the most).
SPEED_ORDER = ("none", "fp8", "int8", "nf4")
SHIPPED_MODELS = ("flux2-klein-4b", "flux2-klein-9b", "flux2-dev")


def _sizes(config: dict) -> tuple[int, int, int, int, int]:
    """(D, MLP hidden, head size, double blocks, single blocks) of a Flux2Transformer2DModel config."""
    head = int(config["attention_head_dim"])
    hidden = int(config["num_attention_heads"]) * head
    return hidden, int(hidden * float(config["mlp_ratio"])), head, int(config["num_layers"]), \
        int(config["num_single_layers"])


def parameter_count(config: dict) -> int:
    """The transformer's parameters, as diffusers' Flux2Transformer2DModel builds them (no biases anywhere)."""
    d, m, head, double, single = _sizes(config)
    blocks = (double * (8 * d * d + 2 * (d * 2 * m + m * d) + 4 * head)     # 8 attention projections, 2 SwiGLU FFs
              + single * (d * (3 * d + 2 * m) + (d + m) * d + 2 * head))  # fused qkv+mlp-in, fused out
    embed = (int(config["in_channels"]) + int(config["joint_attention_dim"])) * d
    time = (int(config.get("timestep_guidance_channels", 256)) * d + d * d) * (2 if config["guidance_embeds"] else 1)
    modulation = 2 * d * 6 * d + d * 3 * d + d * 2 * d                      # double img/txt, single, norm_out
    return blocks + embed + time + modulation + d * int(config.get("out_channels") or config["in_channels"])


def lora_parameter_count(config: dict, rank: int, targets: str = "attention_mlp") -> int:
    """LoRA parameters of lora.py's presets: rank x (in + out) per targeted Linear (other targets: attention_mlp)."""
    d, m, _, double, single = _sizes(config)
    double_layers = 8 * 2 * d + (0 if targets == "attention" else 2 * ((d + 2 * m) + (m + d)))
    single_layers = (d + 3 * d + 2 * m) + (d + m + d)
    return rank * (double * double_layers + single * single_layers)


def block_parameters(config: dict) -> list[int]:
    """Each block's parameters in forward order (double blocks, then single), as parameter_count counts them."""
    d, m, head, double, single = _sizes(config)
    return [8 * d * d + 2 * (d * 2 * m + m * d) + 4 * head] * double + [d * (3 * d + 2 * m) + (d + m) * d + 2 * head] * single


def swap_saving(config: dict, swapped: int, bytes_per: float) -> float:
    """GiB of weights `model.blocks_to_swap=swapped` takes off the device: the last `swapped` blocks of the forward
    order, less the SWAP_WINDOW largest of them that are on the device at a time (block_swap.py)."""
    moved = block_parameters(config)[len(block_parameters(config)) - swapped:] if swapped else []
    kept = sum(sorted(moved, reverse=True)[:SWAP_WINDOW])
    return max(0, sum(moved) - kept) * bytes_per / GiB


def tokens(resolution: int, text_tokens: int = TEXT_TOKENS, images: int = 1) -> int:
    """Sequence length of a square `resolution` image: 16 px per latent token, plus the prompt's tokens. An edit
    LoRA's step carries its reference images' tokens too: `images` = 1 + references."""
    return images * (resolution // 16) ** 2 + text_tokens


def activation_bytes(config: dict, resolution: int, *, batch_size: int = 1, checkpointing: bool,
                     text_tokens: int = TEXT_TOKENS, dtype_bytes: int = 2, images: int = 1) -> float:
    """What a step keeps for backward (see the module doc); dtype_bytes: 2 for bf16 autocast, 4 for fp32."""
    d, _, _, double, single = _sizes(config)
    unit = batch_size * tokens(resolution, text_tokens, images) * d * dtype_bytes     # one (B, S, D) tensor
    blocks = double + single
    return unit * (SAVED_PER_BLOCK * blocks + RECOMPUTE if checkpointing else ACTIVATIONS_PER_BLOCK * blocks)


@dataclass(frozen=True)
class Estimate:
    """One setting's predicted peak, in GiB."""

    quantization: str
    checkpointing: bool
    weights: float
    lora: float
    activations: float
    swapped: int = 0                   # model.blocks_to_swap (its weights are already left out of `weights`)

    @property
    def total(self) -> float:
        return self.weights + self.lora + self.activations

    def fits(self, vram_gib: float) -> bool:
        return self.total + HEADROOM_GIB <= vram_gib


@dataclass(frozen=True)
class Plan:
    name: str
    resolution: int
    batch_size: int
    rank: int
    vram_gib: float | None
    rows: tuple[Estimate, ...]             # fastest first (SPEED_ORDER), then block swap where a GPU size is given
    text_encoder: str
    text_encoder_gib: float                # its peak while caching: bf16 weights + the hidden states of a prompt
    text_encoder_settings: tuple[tuple[str, float], ...] = ()   # (setting, peak GiB) of the other ways to cache
    references: int = 0                    # an edit LoRA's reference images per target

    @property
    def best(self) -> Estimate | None:
        """The fastest setting that fits (None without a memory size or when none fits)."""
        if self.vram_gib is None:
            return None
        return next((row for row in self.rows if row.fits(self.vram_gib)), None)

    def estimate(self, quantization: str, checkpointing: bool, swapped: int = 0) -> Estimate:
        return next(r for r in self.rows
                    if (r.quantization, r.checkpointing, r.swapped) == (quantization, checkpointing, swapped))


def plan_memory(config: dict, resolution: int, *, name: str = "custom", batch_size: int = 1, rank: int = 16,
                vram_gib: float | None = None, optimizer: str = "adamw", targets: str = "attention_mlp",
                quantizations: tuple[str, ...] = SPEED_ORDER, text_tokens: int = TEXT_TOKENS,
                dtype_bytes: int = 2, references: int = 0) -> Plan:
    """Every (quantization, checkpointing) setting's predicted peak for a transformer config, fastest first; given a
    GPU size, then per quantization whose checkpointed row does not fit it, the fewest model.blocks_to_swap that
    make it fit (block swap needs checkpointing; its copies cost time, so it comes last). `references`: an edit
    LoRA's reference images per target, each adding the target's tokens."""
    d, m, _, _, _ = _sizes(config)
    params = parameter_count(config)
    lora = lora_parameter_count(config, rank, targets) * OPTIMIZER_BYTES.get(optimizer, 16) / GiB
    widest = d * (3 * d + 2 * m)                    # the widest Linear (single blocks' fused qkv + mlp-in)
    blocks = sum(block_parameters(config))
    rows = []
    for checkpointing in (False, True):
        activations = activation_bytes(config, resolution, batch_size=batch_size, checkpointing=checkpointing,
                                       text_tokens=text_tokens, dtype_bytes=dtype_bytes, images=1 + references) / GiB
        for q in quantizations:
            bytes_per = QUANTIZATIONS[q] if dtype_bytes == 2 or q != "none" else dtype_bytes
            weights = blocks * bytes_per + (params - blocks) * (2 if dtype_bytes == 2 else dtype_bytes)
            decoding = 0 if q == "none" else widest * (QUANTIZED_TRANSIENT[q] + dtype_bytes)
            rows.append(Estimate(q, checkpointing, weights / GiB, lora, activations + decoding / GiB))
    swaps = []   # (GiB copied in per step, row): the fewer bytes wait on the host-to-GPU link, the faster
    for row in [r for r in rows if r.checkpointing and vram_gib is not None and not r.fits(vram_gib)]:
        bytes_per = QUANTIZATIONS[row.quantization] if dtype_bytes == 2 or row.quantization != "none" else dtype_bytes
        for swapped in range(SWAP_WINDOW + 1, len(block_parameters(config)) + 1):
            swap = Estimate(row.quantization, True, row.weights - swap_saving(config, swapped, bytes_per), row.lora,
                            row.activations, swapped)
            if swap.fits(vram_gib):
                swaps.append((sum(block_parameters(config)[-swapped:]) * bytes_per, swap))
                break
    rows += [row for _, row in sorted(swaps, key=lambda pair: pair[0])]
    hidden = int(config["joint_attention_dim"]) // 3
    encoder, count, layers, vocab = TEXT_ENCODERS.get(hidden, (f"text encoder of hidden size {hidden}", 0.0, 0, 0))
    states = text_tokens * hidden * 2 * (layers + 8)   # bf16: every layer's hidden states + a layer's transients
    settings = [(f"model.text_encoder_quantization={q}" if q != "bf16" else "bf16", (count * b + states) / GiB)
                for q, b in TEXT_QUANTIZATIONS.items()]
    if layers:   # layer offload: the embedding (and norm) on the device, two decoder layers at a time
        settings.append(("cache.text_encoder_offload=layers (bf16)",
                         (vocab * hidden * 2 + 2 * (count - vocab * hidden) / layers * 2 + states) / GiB))
    return Plan(name, resolution, batch_size, rank, vram_gib, tuple(rows), encoder, (count * 2 + states) / GiB,
                tuple(settings[1:]), references)


def plan_for_variant(variant: str, resolution: int, **options) -> Plan:
    """`plan_memory` for a shipped model name ("flux2-dev", "flux2-klein-4b", "flux2-klein-9b")."""
    from ..models import shipped_config

    return plan_memory(shipped_config(variant, "transformer"), resolution, name=variant, **options)


def format_plan(plan: Plan) -> str:
    """The table `flux2-lora plan` prints and Configure LoRA shows."""
    vram = plan.vram_gib
    refs = f", {plan.references} reference image{'s' * (plan.references > 1)} per target" if plan.references else ""
    lines = [f"{plan.name} at {plan.resolution} px{refs}, batch {plan.batch_size}, rank {plan.rank}: predicted peak GiB "
             "of a training step" + (f" on {vram:g} GiB (fits: total + {HEADROOM_GIB:g} GiB headroom)" if vram else ""),
             f"{'quantization':<13}{'checkpointing':<15}{'swap':>5}{'weights':>8}{'LoRA+opt':>10}{'activations':>13}"
             f"{'total':>8}  fits"]
    for r in plan.rows:
        fits = "" if vram is None else "yes" if r.fits(vram) else "no"
        lines.append(f"{r.quantization:<13}{'on' if r.checkpointing else 'off':<15}{r.swapped or '':>5}"
                     f"{r.weights:>8.1f}{r.lora:>10.2f}{r.activations:>13.1f}{r.total:>8.1f}  {fits}")
    if vram is None:
        lines.append("swap: model.blocks_to_swap; give --vram to see how many blocks each setting needs swapped")

    def fits(gib: float) -> str:
        return "" if vram is None else " (fits)" if gib + HEADROOM_GIB <= vram else " (does NOT fit)"

    lines.append(f"text encoder while caching ({plan.text_encoder}; freed before training), peak GiB:")
    lines += [f"  {name:<44}{gib:>6.1f}{fits(gib)}"
              for name, gib in (("bf16", plan.text_encoder_gib), *plan.text_encoder_settings)]
    best = plan.best
    if vram is not None:
        swap = f" model.blocks_to_swap={best.swapped}" if best and best.swapped else ""
        lines.append(f"fastest that fits: quantization={best.quantization} gradient_checkpointing="
                     f"{'on' if best.checkpointing else 'off'}{swap} ({best.total:.1f} GiB)" if best else
                     f"nothing fits in {vram:g} GiB: lower the resolution or the batch size")
    lines.append("speed order: checkpointing off before on (measured: on costs 1.4-2x); bf16, fp8, int8, nf4, then "
                 "block swap, fewest bytes copied first (assumed, not measured: each swapped block is copied in twice a step)")
    return "\n".join(lines)


def settings_summary(*, rank: int, batch_size: int, optimizer: str, checkpointing: str) -> str:
    """Configure LoRA's note: each shipped model's predicted peak (bf16 base) with gradient checkpointing off and
    on, at 512 and 1024 px, so the note shows where checkpointing is needed."""
    chosen = {"auto": "auto (on where a step would not fit without it)", "true": "on", "false": "off"}
    lines = [f"predicted peak memory of a training step, GiB (bf16 base, rank {rank}, batch {batch_size}, "
             f"{optimizer}), gradient_checkpointing off / on; this node has it {chosen.get(checkpointing, checkpointing)}:"]
    for name in SHIPPED_MODELS:
        plans = [plan_for_variant(name, px, batch_size=batch_size, rank=rank, optimizer=optimizer,
                                  quantizations=("none",)) for px in (512, 1024)]
        off, on = ([p.estimate("none", c).total for p in plans] for c in (False, True))
        lines.append(f"  {name}: {off[0]:.1f} / {on[0]:.1f} at 512 px, {off[1]:.1f} / {on[1]:.1f} at 1024 px")
    lines.append(f"plus ~{HEADROOM_GIB:g} GiB for the GPU's context. `flux2-lora plan --variant dev --resolution 1024 "
                 "--vram 24` adds fp8/int8/nf4 bases and names the fastest setting that fits.")
    return "\n".join(lines)


def free_memory_gib(device) -> float | None:
    """What a step can still take on `device`: CUDA's free memory, the host's MemAvailable on the CPU; None where it
    cannot be read."""
    import torch

    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / GiB
    if device.type == "cpu":
        try:
            with open("/proc/meminfo", encoding="ascii") as f:
                return next(int(line.split()[1]) * 1024 / GiB for line in f if line.startswith("MemAvailable:"))
        except (OSError, StopIteration, ValueError):
            return None
    return None


def resolve_checkpointing(setting: str, transformer_config: dict, *, resolution: int, batch_size: int, rank: int,
                          optimizer: str, targets: str, dtype_bytes: int, free_gib: float | None,
                          images: int = 1) -> tuple[bool, str]:
    """train.gradient_checkpointing as (on, why). "auto" (the default of the CLI and the nodes alike) turns it on
    when what a step adds to the loaded weights without it (LoRA + optimizer state + activations, as plan_memory
    predicts them) would not fit in `free_gib` with HEADROOM_GIB to spare: checkpointing costs 1.4-2x the step time,
    so it is on only where memory needs it; unknown free memory (MPS) keeps it on."""
    if setting != "auto":
        return setting == "true", f"train.gradient_checkpointing={setting}"
    needed = (activation_bytes(transformer_config, resolution, batch_size=batch_size, checkpointing=False,
                               dtype_bytes=dtype_bytes, images=images)
              + lora_parameter_count(transformer_config, rank, targets) * OPTIMIZER_BYTES.get(optimizer, 16)) / GiB
    if free_gib is None:
        return True, "train.gradient_checkpointing=auto: on (this device's free memory cannot be read)"
    on = needed + HEADROOM_GIB > free_gib
    return on, (f"train.gradient_checkpointing=auto: {'on' if on else 'off'} (a step without it adds ~{needed:.1f} "
                f"GiB to the loaded weights; {free_gib:.1f} GiB free)")
