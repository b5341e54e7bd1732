"""Where models run and in which precision: the one place that decides, plus freeing and OOM recovery.

Dtype choices scattered over loaders drift apart (a VAE in fp16 next to a transformer in bf16, a
"bf16" request silently becoming fp32 on an old GPU), so every loader takes the dtype chosen here.
"""

from __future__ import annotations

import gc
import logging
import sys

import torch

from ..errors import ConfigError, ModelError

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}
_ALIGNMENT = 64  # bytes: what torch's CPU allocator guarantees
_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def choose_device(requested: str = "auto") -> torch.device:
    """"auto": the CUDA (or ROCm) GPU if there is one, else Apple's MPS, else the CPU."""
    requested = str(requested or "auto").strip().lower()
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError):
        raise ConfigError([("model.device", f"{requested!r} is not a device: use auto, cpu, cuda, cuda:N or mps")]) \
            from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index or 0) >= count:
            raise ConfigError([("model.device", f"{requested!r} is not available: this machine has {count} CUDA "
                                                f"device(s); use auto or cpu")])
    elif device.type == "mps" and not _mps_available():
        raise ConfigError([("model.device", f"{requested!r} is not available on this machine; use auto or cpu")])
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError([("model.device", f"{requested!r} is not supported: use auto, cpu, cuda, cuda:N or mps")])
    return device


def _supports(device: torch.device, dtype: torch.dtype) -> bool:
    if device.type == "cuda":
        return dtype != torch.bfloat16 or torch.cuda.is_bf16_supported()
    if device.type == "mps" and dtype == torch.bfloat16:
        try:  # needs macOS 14+; the probe is the only reliable test
            return bool((torch.ones(2, 2, dtype=dtype, device=device) @ torch.ones(2, 2, dtype=dtype, device=device)
                         ).sum().item() == 8)
        except (RuntimeError, TypeError):
            return False
    return True


def choose_dtype(requested: str | torch.dtype = "auto", device: torch.device | str | None = None) -> torch.dtype:
    """The compute dtype on `device` (default: the auto device).

    "auto" is bf16 where the device supports it (fp16's range overflows in FLUX.2's activations far more
    often), fp16 on GPUs without bf16, and fp32 on the CPU, where half precision is slow and gains nothing.
    fp8 is not a compute dtype: load an fp8 file and its weights stay fp8 in memory.
    """
    device = choose_device("auto") if device is None else torch.device(device)
    if isinstance(requested, torch.dtype):
        dtype = requested
    elif str(requested).strip().lower() in ("", "auto"):
        if device.type == "cpu":
            return torch.float32
        return torch.bfloat16 if _supports(device, torch.bfloat16) else torch.float16
    else:
        name = str(requested).strip().lower()
        if name not in DTYPES:
            hint = " (fp8 is a file format: give an fp8 transformer file and it stays fp8)" if "8" in name else ""
            raise ConfigError([("model.dtype", f"{requested!r} is not a compute dtype: choose auto, bf16, fp16 or "
                                               f"fp32{hint}")])
        dtype = DTYPES[name]
    if dtype not in DTYPES.values():
        raise ConfigError([("model.dtype", f"{dtype} is not a compute dtype: choose auto, bf16, fp16 or fp32")])
    if not _supports(device, dtype):
        raise ConfigError([("model.dtype", f"{requested!r} is not supported on {device} (no bf16 support); use "
                                           f"fp16 or auto")])
    return dtype


def align_cpu_tensors(module: torch.nn.Module) -> None:
    """Copy CPU parameters and buffers that sit at misaligned addresses into fresh, aligned memory.

    Weights read from a safetensors file can land at any byte offset, and CPU kernels then take another
    summation order: a single file and its diffusers twin would differ in the last bit of every output,
    and so would two runs whose files differ only in header length.
    """
    with torch.no_grad():
        for sub in module.modules():
            for table in (sub._parameters, sub._buffers):
                for name, tensor in table.items():
                    if tensor is not None and tensor.device.type == "cpu" and tensor.data_ptr() % _ALIGNMENT:
                        if isinstance(tensor, torch.nn.Parameter):
                            tensor.data = tensor.data.clone()
                        else:
                            table[name] = tensor.clone()


def free_memory() -> None:
    """Return cached blocks to the driver once Python holds no references to them."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if _mps_available():
        torch.mps.empty_cache()


def release(*modules) -> None:
    """Free the memory of models loaded only for a while (the VAE and text encoder, for caching).

    The caller may still hold references, so the tensors themselves are replaced by storage-free meta
    tensors: the module is unusable afterwards, and its memory is returned whoever holds it.
    """
    for module in modules:
        if module is None:
            continue
        torch.nn.Module.to(module, "meta")  # nn.Module's own .to: diffusers refuses .to() on quantized models
    free_memory()


def with_oom_retry(load, *, what: str, path=""):
    """`load()`, retried once after freeing memory if it runs out of it (a previous model's blocks may only
    just have been released); a second failure is a ModelError that says what to do."""
    for attempt in (1, 2):
        try:
            return load()
        except _OOM as exc:
            if attempt == 2:
                raise ModelError(f"{path}: out of memory loading {what} ({str(exc).splitlines()[0][:200]}). "
                                 f"Free GPU memory (close other programs and ComfyUI workflows), choose a smaller "
                                 f"model.dtype (bf16/fp16) or an fp8 file, or a smaller variant ([klein] 4B)") from None
            log.warning("out of memory loading %s from %s; freeing memory and trying once more", what, path)
        free_memory()  # outside the except block: the failed attempt's frames and tensors are gone by now


def peak_memory_mb(device: torch.device) -> float | None:
    """Peak memory so far: the accelerator's allocations, or on the CPU the process's peak resident size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10   # bytes on macOS, KiB on Linux


def frozen(model: torch.nn.Module) -> torch.nn.Module:
    """A loaded model as the trainer uses the parts it does not train: aligned, in eval mode, without gradients."""
    align_cpu_tensors(model)
    model.eval()
    model.requires_grad_(False)
    return model
