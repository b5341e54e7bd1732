"""tekken.py: the tokenizer ComfyUI's [dev] text-encoder files carry, written for the tiny model and read back.

The tiny [dev] tokenizer (tokenizer.py) and its tekken.json must be the same tokenizer: same ids for any text and
for every special token, same chat-template rendering, same padding side, through transformers' own reader.
"""

from __future__ import annotations

import base64
import json

import pytest
import torch

from flux2_lora_core.cache.encoding import tokenize_prompts
from flux2_lora_core.errors import ModelError
from flux2_lora_core.models.tekken import KEY, as_tensor, tiny_tekken_json, tokenizer_from_tekken
from flux2_lora_core.models.tokenizer import MISTRAL3_SPECIAL_TOKENS, build_tokenizer

HARD_TEXT = "héllo wörld 🦊 ñ\t\n  spaces  中文 \x00\x7f end [INST]x[/INST]<s></s><pad>"


@pytest.fixture(scope="module")
def tokenizers():
    return build_tokenizer("mistral3"), tokenizer_from_tekken(as_tensor(tiny_tekken_json()), where="tiny")


def test_tekken_json_has_mistrals_layout():
    tekken = json.loads(tiny_tekken_json())
    assert set(tekken) == {"config", "vocab", "special_tokens"}
    config = tekken["config"]
    assert set(config) == {"pattern", "default_vocab_size", "default_num_special_tokens", "version"}
    assert config["default_num_special_tokens"] == len(MISTRAL3_SPECIAL_TOKENS) == 19
    assert config["default_vocab_size"] == 19 + 256
    assert [s["token_str"] for s in tekken["special_tokens"]] == list(MISTRAL3_SPECIAL_TOKENS)
    assert all(set(s) == {"rank", "token_str", "is_control"} and s["is_control"] for s in tekken["special_tokens"])
    assert [base64.b64decode(v["token_bytes"]) for v in tekken["vocab"]] == [bytes([b]) for b in range(256)]
    assert [v["rank"] for v in tekken["vocab"]] == list(range(256))
    assert tekken["vocab"][ord("a")]["token_str"] == "a" and tekken["vocab"][0xE4]["token_str"] is None


def test_as_tensor_is_comfyuis_uint8_bytes():
    data = tiny_tekken_json()
    tensor = as_tensor(data)
    assert tensor.dtype == torch.uint8 and tensor.ndim == 1 and tensor.numpy().tobytes() == data


def test_read_back_it_is_the_tiny_tokenizer(tokenizers):
    tiny, read = tokenizers
    assert read.get_vocab() == tiny.get_vocab() and len(read) == len(tiny) == 275
    for name in ("bos", "eos", "pad", "unk"):
        assert getattr(read, f"{name}_token_id") == getattr(tiny, f"{name}_token_id"), name
    assert (read.bos_token_id, read.pad_token_id) == (1, 11)  # the ids ComfyUI's Mistral3Tokenizer hard-codes
    ids = tiny(HARD_TEXT, add_special_tokens=False)["input_ids"]
    assert read(HARD_TEXT, add_special_tokens=False)["input_ids"] == ids
    assert read.decode(ids) == tiny.decode(ids) == HARD_TEXT
    assert read.padding_side == tiny.padding_side == "left"
    assert read.chat_template == tiny.chat_template


@pytest.mark.parametrize("mode", ["comfyui", "diffusers"])
def test_prompts_tokenize_alike_in_both_encodings(tokenizers, mode):
    tiny, read = tokenizers
    prompts = ["a red fox", "zxq, two cats on a sofa, watercolour 🦊"]
    a = tokenize_prompts(tiny, prompts, family="dev", mode=mode)
    b = tokenize_prompts(read, prompts, family="dev", mode=mode)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.attention_mask, b.attention_mask)
    assert a.keep == b.keep


@pytest.mark.parametrize("damage, words", [
    (b"not json at all", ["not a readable tekken.json"]),
    (json.dumps({"config": {"pattern": "x"}, "vocab": []}).encode(), ["not a readable tekken.json"]),
])
def test_a_damaged_tekken_is_a_model_error_naming_the_fix(damage, words):
    with pytest.raises(ModelError) as info:
        tokenizer_from_tekken(as_tensor(damage), where="mistral.safetensors")
    message = str(info.value)
    assert "mistral.safetensors" in message and KEY in message and "model.tokenizer" in message
    assert all(word in message for word in words), message
