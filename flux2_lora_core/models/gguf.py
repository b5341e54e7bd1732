"""GGUF transformer files (city96's ComfyUI-GGUF layout) trained over as they are, never widened.

Many ComfyUI users hold FLUX.2 only as GGUF (Q8_0 for quality, Q4_K/Q5_K to fit 12-16 GB cards). The header
is read with the `gguf` package (GGUF's reference reader: a memory map and numpy views, nothing executed);
the tensors are then read layer by layer like a safetensors file (streaming.py), so host RAM holds one layer.
A block-quantized weight is kept as the file's bytes in a QuantizedLinear whose forward decodes it
(ggml_quants.py); F16/BF16/F32 tensors (norms, biases, the layers a converter left unquantized) load as usual.

GGUF lists dimensions innermost first; here every shape is in PyTorch's order. The files carry BFL's key
names (as the safetensors they were converted from), and the BFL -> diffusers conversion splits fused qkv
rows and swaps the final modulation's halves. Rows of a GGUF weight are whole blocks, so those row
operations are exact on the raw bytes: the conversion is run on row-index probes in place of the quantized
weights, and each converted probe says which rows of which file tensor its weight is.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import torch

from ..errors import ModelError
from . import ggml_quants
from .files import TensorFile, check_size, read_header

log = logging.getLogger(__name__)

MAGIC = b"GGUF"
_PLAIN = ("F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64")  # GGML names equal to safetensors' names
_ROW_ID = 1 << 32  # probe values: source index * _ROW_ID + row, exact in float64 below 2**53
_ADVICE = "use a GGUF in Q8_0, Q6_K, Q5_K, Q5_0/1, Q4_K, Q4_0/1, Q3_K or Q2_K, or the .safetensors file"


def read_transformer_header(path: Path) -> TensorFile:
    """model.path's header, a GGUF file's or a safetensors file's."""
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) == MAGIC:
                return read_gguf_header(path)
    return read_header(path, key="model.path")


def _metadata(reader) -> dict[str, str]:
    """The header's string and scalar fields, as text (arrays, like a tokenizer's vocabulary, are left out)."""
    from gguf import GGUFValueType

    out = {}
    for name, field in reader.fields.items():
        if len(field.types) != 1 or field.types[0] == GGUFValueType.ARRAY:
            continue
        value = field.parts[field.data[0]]
        out[name] = bytes(value).decode("utf-8", "replace") if field.types[0] == GGUFValueType.STRING \
            else str(value.tolist()[0])
    return out


def _orig_shape(reader, name: str) -> tuple[int, ...] | None:
    """ComfyUI-GGUF's `comfy.gguf.orig_shape.<name>`: the shape of a tensor it stored flattened."""
    field = reader.fields.get(f"comfy.gguf.orig_shape.{name}")
    return None if field is None else tuple(int(field.parts[i][0]) for i in field.data)


def read_gguf_header(path: Path) -> TensorFile:
    """The file's tensors (PyTorch-order shapes, GGML type names, absolute byte ranges) from its header alone."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ModelError(f"{path}: reading GGUF files needs the gguf package (a dependency of this pack and of "
                         f"ComfyUI-GGUF): pip install gguf") from None

    try:
        reader = GGUFReader(path)
    except (ValueError, KeyError, IndexError, OverflowError, OSError) as exc:
        raise ModelError(f"{path}: a damaged or truncated GGUF file ({exc}); download or copy it again") from None
    shapes, dtypes, offsets, raw_shapes = {}, {}, {}, {}
    for t in reader.tensors:
        name, qtype = t.name, t.tensor_type.name
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if qtype in ggml_quants.TYPES:
            block = ggml_quants.TYPES[qtype][0]
            if len(shape) != 2 or shape[1] % block:
                raise ModelError(f"{path}: {name!r} is {qtype} with shape {shape}, not a matrix of whole {block}-value "
                                 f"rows; the file is damaged or of a layout this loader does not read: {_ADVICE}")
            raw_shapes[name] = (shape[0], ggml_quants.row_bytes(qtype, shape[1]))
        elif qtype in _PLAIN:
            shape = _orig_shape(reader, name) or shape
        else:
            raise ModelError(f"{path}: {name!r} is stored as {qtype}, which is not read for training here; {_ADVICE}")
        shapes[name], dtypes[name] = shape, qtype
        offsets[name] = (t.data_offset, t.data_offset + t.n_bytes)
    return check_size(TensorFile(path, shapes, dtypes, _metadata(reader), offsets, raw_shapes), path.stat().st_size)


def _probe(index: int, rows: int) -> torch.Tensor:
    return (torch.arange(rows, dtype=torch.float64) + index * _ROW_ID)[:, None]  # (rows, 1)


def _converted_rows(state: dict, sources: list[str], raw: dict[str, torch.Tensor]) -> dict[str, tuple]:
    """Pop the converted probes out of `state`: {diffusers key: (raw rows, file key)}."""
    out = {}
    for key in [k for k, v in state.items() if v.dtype == torch.float64]:
        ids = state.pop(key)[:, 0].long()
        source = sources[int(ids[0]) // _ROW_ID]
        if not bool((ids // _ROW_ID == ids[0] // _ROW_ID).all()):
            raise ModelError(f"{key}: the conversion mixed rows of two quantized tensors, which their bytes cannot "
                             f"express; {_ADVICE}")
        rows = ids % _ROW_ID
        out[key] = (raw[source].index_select(0, rows), source)
    return out


def fill_gguf_transformer(model, file: TensorFile, prefix: str, *, dtype: torch.dtype, device: torch.device,
                          where: str, convert, on_group=None):
    """Load a GGUF file's groups into a meta-built Flux2Transformer2DModel: block-quantized Linears become
    QuantizedLinear over the file's bytes (on `device`), the rest is cast to `dtype`. As fill_transformer."""
    from .quantized_linear import QuantizedLinear
    from .streaming import check_complete, read_groups

    expected = set(model.state_dict())
    loaded: set[str] = set()
    unexpected: list[str] = []
    kept: Counter = Counter()
    for tensors, _ in read_groups(file, prefix):
        sources = [k for k in tensors if prefix + k in file.raw_shapes]
        raw = {k: tensors.pop(k) for k in sources}
        state = {k: v.float() if v.dtype == torch.float64 else v for k, v in tensors.items()}
        state.update((k, _probe(i, raw[k].shape[0])) for i, k in enumerate(sources))
        state = convert(state) if convert else state
        for key, (rows, source) in _converted_rows(state, sources, raw).items():
            layer, qtype = key.removesuffix(".weight"), file.dtypes[prefix + source]
            shape = (rows.shape[0], file.shapes[prefix + source][1])
            try:
                module = model.get_submodule(layer)
            except AttributeError:
                module = None
            if not isinstance(module, torch.nn.Linear) or key not in expected:  # not a Linear: its values, decoded
                state[key] = ggml_quants.dequantize(rows, qtype, shape, torch.float32)
                continue
            bias = state.pop(layer + ".bias", None)
            new = QuantizedLinear(shape[1], shape[0], scheme=qtype, weight=rows.to(device),
                                  weight_scale=torch.empty(0, device=device), compute_dtype=dtype,
                                  bias=None if bias is None else bias.to(device, dtype))
            parent, _, child = layer.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
            loaded.update([key] + ([layer + ".bias"] if bias is not None else []))
            kept[qtype] += 1
        extra = [k for k in state if k not in expected]
        state = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
                 for k, v in state.items() if k in expected}
        model.load_state_dict(state, strict=False, assign=True)
        loaded.update(state)
        unexpected += extra
        if on_group is not None:
            on_group({k.rpartition(".")[0] for k in state})
    check_complete(model, loaded, unexpected, where)
    log.info("%s: GGUF layers kept quantized: %s", where, ", ".join(f"{n} {q}" for q, n in sorted(kept.items())))
    torch.nn.Module.to(model, dtype)  # floating tensors only: the GGUF bytes stay uint8
    return model.eval()
