"""GGML's block quantizations (the weights of GGUF files) decoded in PyTorch, on whatever device holds them.

ComfyUI users keep FLUX.2 as GGUF files (city96's ComfyUI-GGUF), Q8_0 down to Q2_K. Training over one must not
widen the file: the weight stays as the file's bytes, one row of blocks per output row, and each forward
decodes a layer at a time (quantized_linear.QuantizedLinear). The `gguf` package decodes in numpy on the CPU,
far too slow to run per step on a GPU; these are the same formulas (ported from gguf-py's quants.py, which is
the format's reference in Python and the tests' oracle) written as tensor ops, so they run where the weight is.

Every function takes the blocks as a (n_blocks, type_size) uint8 tensor and returns (n_blocks, block_size)
float32. A row of a (out, in) weight is `in / block_size` consecutive blocks, so rows can be split and
reordered on the raw bytes (the BFL -> diffusers conversion's qkv split and scale/shift swap) exactly.
"""

from __future__ import annotations

import torch

QK_K = 256  # values per K-quant super-block


def _f16(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The fp16 stored at byte `at` of each block, as (n, 1) float32."""
    return blocks[:, at:at + 2].contiguous().view(torch.float16).float()


def _shifts(*bits: int, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(bits, dtype=like.dtype, device=like.device)


def _nibbles(qs: torch.Tensor, width: int) -> torch.Tensor:
    """Low nibbles of each `width`-byte run, then its high nibbles: (n, k*width) bytes -> (n, 2k, width) codes."""
    n = qs.shape[0]
    return ((qs.reshape(n, -1, 1, width) >> _shifts(0, 4, like=qs).reshape(1, 1, 2, 1)) & 0x0F).reshape(n, -1, width)


def _bits(packed: torch.Tensor, count: int, width: int) -> torch.Tensor:
    """`count` fields of 8/count bits from each byte of each `width`-byte run, lowest first: (n, runs*count, width)."""
    n, step = packed.shape[0], 8 // count
    shifts = _shifts(*range(0, 8, step), like=packed).reshape(1, 1, count, 1)
    return ((packed.reshape(n, -1, 1, width) >> shifts) & ((1 << step) - 1)).reshape(n, -1, width)


def q8_0(b: torch.Tensor) -> torch.Tensor:
    return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b, 0)  # (n, 32)


def q4_0(b: torch.Tensor) -> torch.Tensor:
    return (_nibbles(b[:, 2:], 16).reshape(b.shape[0], 32).float() - 8) * _f16(b, 0)


def q4_1(b: torch.Tensor) -> torch.Tensor:
    return _nibbles(b[:, 4:], 16).reshape(b.shape[0], 32).float() * _f16(b, 0) + _f16(b, 2)


def _q5_high(qh: torch.Tensor) -> torch.Tensor:
    """The 32 fifth bits of a Q5 block, from its little-endian uint32 (read as int32: only bit tests follow)."""
    word = qh.contiguous().view(torch.int32)  # (n, 1)
    return ((word >> torch.arange(32, dtype=torch.int32, device=qh.device)) & 1).to(torch.uint8)  # (n, 32)


def q5_0(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 6:], 16).reshape(b.shape[0], 32) | (_q5_high(b[:, 2:6]) << 4)
    return (q.float() - 16) * _f16(b, 0)


def q5_1(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 8:], 16).reshape(b.shape[0], 32) | (_q5_high(b[:, 4:8]) << 4)
    return q.float() * _f16(b, 0) + _f16(b, 2)


def q2_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    dl = (_f16(b, 80) * (scales & 0x0F).float()).reshape(n, 16, 1)
    ml = (_f16(b, 82) * (scales >> 4).float()).reshape(n, 16, 1)
    q = _bits(qs, 4, 32).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, QK_K)


def q3_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    hmask, qs, scales = b[:, :32], b[:, 32:96], b[:, 96:108]
    low = ((scales[:, :8].reshape(n, 1, 8) >> _shifts(0, 4, like=b).reshape(1, 2, 1)) & 0x0F).reshape(n, 16)
    high = ((scales[:, 8:].reshape(n, 1, 4) >> _shifts(0, 2, 4, 6, like=b).reshape(1, 4, 1)) & 0x03).reshape(n, 16)
    sc = (low | (high << 4)).float() - 32
    dl = (_f16(b, 108) * sc).reshape(n, 16, 1)
    ql = _bits(qs, 4, 32).reshape(n, 16, 16)
    qh = _bits(hmask, 8, 32).reshape(n, 16, 16) ^ 1  # the offset is 4 when the mask bit is clear
    return (dl * (ql.float() - 4 * qh.float())).reshape(n, QK_K)


def _k_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's eight 6-bit scales and mins, packed in 12 bytes: (n, 8) each."""
    n = scales.shape[0]
    d, m, md = scales.reshape(n, 3, 4).unbind(1)
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mins = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mins


def q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    sc, mins = _k_scales(b[:, 4:16])
    d = (_f16(b, 0) * sc.float()).reshape(n, 8, 1)
    dm = (_f16(b, 2) * mins.float()).reshape(n, 8, 1)
    return (d * _nibbles(b[:, 16:], 32).float() - dm).reshape(n, QK_K)


def q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    sc, mins = _k_scales(b[:, 4:16])
    d = (_f16(b, 0) * sc.float()).reshape(n, 8, 1)
    dm = (_f16(b, 2) * mins.float()).reshape(n, 8, 1)
    q = _nibbles(b[:, 48:], 32) | (_bits(b[:, 16:48], 8, 32) << 4)  # (n, 8, 32)
    return (d * q.float() - dm).reshape(n, QK_K)


def q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql, qh = _nibbles(b[:, :128], 64).reshape(n, 8, 32), _bits(b[:, 128:192], 4, 32)  # (n, 8, 32) each
    d = (_f16(b, 208) * b[:, 192:208].contiguous().view(torch.int8).float()).reshape(n, 16, 1)
    q = (ql | (qh << 4)).float().reshape(n, 16, 16) - 32
    return (d * q).reshape(n, QK_K)


# name -> (values per block, bytes per block, decoder); the names are GGMLQuantizationType's.
TYPES = {
    "Q8_0": (32, 34, q8_0), "Q4_0": (32, 18, q4_0), "Q4_1": (32, 20, q4_1), "Q5_0": (32, 22, q5_0),
    "Q5_1": (32, 24, q5_1), "Q2_K": (QK_K, 84, q2_k), "Q3_K": (QK_K, 110, q3_k), "Q4_K": (QK_K, 144, q4_k),
    "Q5_K": (QK_K, 176, q5_k), "Q6_K": (QK_K, 210, q6_k),
}


def row_bytes(qtype: str, columns: int) -> int:
    block, size, _ = TYPES[qtype]
    return columns // block * size


def dequantize(raw: torch.Tensor, qtype: str, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """The (out, in) weight in `dtype` from its GGUF bytes, (out, in / block * type_size) uint8."""
    block, size, decode = TYPES[qtype]
    return decode(raw.reshape(-1, size)).reshape(shape).to(dtype)
