"""tokenizer.py: the offline Qwen3 / Mistral3 stand-ins render, pad and round-trip like the real ones."""

from __future__ import annotations

import pytest
import torch
from tokenizers import pre_tokenizers
from transformers import AutoTokenizer

from flux2_lora_core.errors import ConfigError
from flux2_lora_core.models.tiny_models import build_tiny_pipeline
from flux2_lora_core.models.tokenizer import STYLES, build_tokenizer, byte_symbols

# The exact text each real template produces for FLUX.2's messages.
QWEN3_KLEIN_PROMPT = "<|im_start|>user\na red fox<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
SYSTEM = "You are an AI that reasons about image descriptions."
MISTRAL3_DEV_PROMPT = f"<s>[SYSTEM_PROMPT]{SYSTEM}[/SYSTEM_PROMPT][INST]a red fox[/INST]"
HARD_TEXT = "héllo wörld 🦊 ñ\t\n  spaces  中文 \x00\x7f end"


def test_byte_symbols_are_the_byte_level_alphabet():
    symbols = byte_symbols()
    assert len(symbols) == len(set(symbols)) == 256
    assert set(symbols) == set(pre_tokenizers.ByteLevel.alphabet())
    assert symbols[ord("a")] == "a" and symbols[ord(" ")] == "Ġ"  # GPT-2's mapping: space -> Ġ


@pytest.mark.parametrize("style", STYLES)
def test_save_load_round_trip(tmp_path, style):
    tok = build_tokenizer(style)
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == tok.get_vocab()
    assert loaded.chat_template == tok.chat_template
    assert (loaded.padding_side, loaded.pad_token, loaded.bos_token, loaded.eos_token) == \
           (tok.padding_side, tok.pad_token, tok.bos_token, tok.eos_token)
    ids = tok(HARD_TEXT)["input_ids"]
    assert loaded(HARD_TEXT)["input_ids"] == ids
    assert len(ids) == len(HARD_TEXT.encode("utf-8"))  # one token per byte: no merges
    assert loaded.decode(ids) == HARD_TEXT


@pytest.mark.parametrize("style, specials", [
    ("qwen3", ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]),
    ("mistral3", ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]),
])
def test_special_tokens_are_single_tokens(style, specials):
    tok = build_tokenizer(style)
    for special in specials:
        ids = tok(f"a{special}b")["input_ids"]
        assert len(ids) == 3 and tok.convert_ids_to_tokens(ids[1]) == special, special


def test_mistral3_ids_match_tekken_for_the_tokens_comfyui_uses():
    tok = build_tokenizer("mistral3")
    assert tok.convert_tokens_to_ids(["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[IMG]", "<pad>",
                                      "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]) == [0, 1, 2, 3, 4, 10, 11, 17, 18]


def test_qwen3_template_renders_like_the_real_one():
    tok = build_tokenizer("qwen3")
    messages = [{"role": "user", "content": "a red fox"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert text == QWEN3_KLEIN_PROMPT
    # Thinking left on, the real template opens the assistant turn and lets the model think.
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        "<|im_start|>user\na red fox<|im_end|>\n<|im_start|>assistant\n"


def test_mistral3_template_renders_list_and_string_content_alike():
    tok = build_tokenizer("mistral3")
    as_blocks = [{"role": "system", "content": [{"type": "text", "text": SYSTEM}]},
                 {"role": "user", "content": [{"type": "text", "text": "a red fox"}]}]
    as_strings = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "a red fox"}]
    assert tok.apply_chat_template(as_blocks, tokenize=False) == MISTRAL3_DEV_PROMPT
    assert tok.apply_chat_template(as_strings, tokenize=False) == MISTRAL3_DEV_PROMPT
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<s>[INST]hi[/INST]"


@pytest.mark.parametrize("style, side", [("qwen3", "right"), ("mistral3", "left")])
def test_padding_side(style, side):
    tok = build_tokenizer(style)
    batch = tok(["ab", "abcd"], padding="max_length", max_length=6, return_tensors="pt")
    mask, ids = batch["attention_mask"][0], batch["input_ids"][0]
    expected = torch.tensor([1, 1, 0, 0, 0, 0] if side == "right" else [0, 0, 0, 0, 1, 1])
    assert torch.equal(mask, expected)
    assert set(ids[mask == 0].tolist()) == {tok.pad_token_id}


def test_unknown_style_is_a_config_error():
    with pytest.raises(ConfigError, match="'gemma'.*qwen3, mistral3"):
        build_tokenizer("gemma")


@pytest.mark.parametrize("variant", ["klein", "dev"])
def test_pipeline_encode_prompt_feeds_the_template_tokens(variant):
    """The pipelines' own encode_prompt tokenizes through these tokenizers: capture what reaches the encoder.

    256 tokens: one token per byte, dev's system message alone takes ~170.
    """
    pipe = build_tiny_pipeline(variant)
    seen = {}
    hook = pipe.text_encoder.register_forward_pre_hook(lambda m, args, kwargs: seen.update(kwargs), with_kwargs=True)
    try:
        embeds, text_ids = pipe.encode_prompt(prompt=["a red fox", "x"], max_sequence_length=256)
    finally:
        hook.remove()
    rendered = QWEN3_KLEIN_PROMPT if variant == "klein" else \
        f"<s>[SYSTEM_PROMPT]{pipe.system_message}[/SYSTEM_PROMPT][INST]a red fox[/INST]"  # diffusers' system message
    expected = pipe.tokenizer(rendered, padding="max_length", max_length=256, return_tensors="pt")
    assert torch.equal(seen["input_ids"][0], expected["input_ids"][0])
    assert torch.equal(seen["attention_mask"][0], expected["attention_mask"][0])
    hidden = pipe.text_encoder.config.get_text_config().hidden_size
    assert embeds.shape == (2, 256, 3 * hidden) and text_ids.shape == (2, 256, 4)
