"""Mistral's tekken.json: the tokenizer that ComfyUI's FLUX.2 [dev] text-encoder files carry inside them.

ComfyUI's `mistral_3_small_flux2_*.safetensors` hold, next to the weights, a uint8 tensor named `tekken_model`:
the bytes of Mistral's tekken.json (special tokens by rank, then byte-level BPE tokens by rank; a token's id is its
rank after the special tokens). Reading the tokenizer from there means a [dev] user never has to find a tokenizer
folder that matches their text encoder. The tiny [dev] test model writes its tokenizer the same way, so the tests
go through the path real files take.

Reading goes through transformers' own converter (`transformers.integrations.mistral.convert_tekken_tokenizer`);
ComfyUI v0.29's `load_mistral_tokenizer` calls an older `MistralConverter` signature that current transformers
rejects, so nothing here borrows it. A tekken.json has no chat template and no padding side, so both are set to
what the [dev] pipelines expect (tokenizer.py's Mistral-Small layout, left padding).
"""

from __future__ import annotations

import base64
import json
import tempfile
from pathlib import Path

import torch

from ..errors import ModelError
from .tokenizer import MISTRAL3_CHAT_TEMPLATE, MISTRAL3_SPECIAL_TOKENS

KEY = "tekken_model"  # the entry of ComfyUI's [dev] text-encoder files that holds tekken.json
# Mistral's Tekken pre-tokenizer split (from Mistral-Small-3.x's tekken.json).
PATTERN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
           r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}|"
           r" ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def tiny_tekken_json() -> bytes:
    """The tiny [dev] tokenizer (tokenizer.py: 19 special tokens in Tekken order, then the 256 bytes, no merges)
    as a tekken.json, laid out like Mistral's own: the same ids, so either reader gives the same tokens."""
    special = [{"rank": rank, "token_str": token, "is_control": True}
               for rank, token in enumerate(MISTRAL3_SPECIAL_TOKENS)]
    vocab = [{"rank": byte, "token_bytes": base64.b64encode(bytes([byte])).decode("ascii"),
              "token_str": chr(byte) if byte < 0x80 else None}  # a lone byte >= 0x80 is no UTF-8 text
             for byte in range(256)]
    config = {"pattern": PATTERN, "default_vocab_size": len(special) + len(vocab),
              "default_num_special_tokens": len(special), "version": "v7"}
    return json.dumps({"config": config, "vocab": vocab, "special_tokens": special}, ensure_ascii=False).encode()


def as_tensor(data: bytes) -> torch.Tensor:
    """tekken.json bytes as ComfyUI stores them: a 1-D uint8 tensor."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def tokenizer_from_tekken(data: bytes | torch.Tensor, *, where) -> object:
    """A transformers fast tokenizer from tekken.json bytes (or ComfyUI's uint8 tensor of them), with the
    Mistral-Small chat template and left padding. `where` names the source in errors."""
    if torch.is_tensor(data):
        data = data.detach().cpu().contiguous().numpy().tobytes()
    try:
        from transformers.integrations.mistral import convert_tekken_tokenizer
    except ImportError:
        raise ModelError(f"{where}: reading the tokenizer inside this file needs a transformers with "
                         f"transformers.integrations.mistral.convert_tekken_tokenizer (5.2x or newer): upgrade "
                         f"transformers, or set model.tokenizer to a tokenizer folder of this text encoder") from None
    with tempfile.TemporaryDirectory() as folder:  # the converter reads a file path only
        path = Path(folder) / "tekken.json"
        path.write_bytes(data)
        try:
            tokenizer = convert_tekken_tokenizer(str(path), chat_template=MISTRAL3_CHAT_TEMPLATE)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, ImportError) as exc:
            raise ModelError(f"{where}: its {KEY!r} entry is not a readable tekken.json ({type(exc).__name__}: "
                             f"{str(exc)[:200]}); set model.tokenizer to a tokenizer folder of this text encoder"
                             ) from None
    tokenizer.padding_side = "left"  # as ComfyUI's Mistral3Tokenizer (pad_left) and Mistral's LlamaTokenizer
    tokenizer.init_kwargs.pop("vocab_file", None)  # the temporary file is gone
    return tokenizer
