"""Captions past 512 tokens on the tiny models: "comfyui" conditioning encodes them whole (as ComfyUI encodes long
prompts), "diffusers" cuts them at 512, validation says which, and a long one never inflates a batch."""

from __future__ import annotations

import pytest
import torch

from flux2_lora_core.cache.encoding import (COMFYUI_DEV_TEMPLATE, COMFYUI_KLEIN_TEMPLATE, MAX_SEQUENCE_LENGTH,
                                            encode_prompts, tokenize_prompts)
from flux2_lora_core.data.validation import validate_dataset
from flux2_lora_core.models.tiny_models import build_tiny_pipeline

CAPTION_TOKENS = 1000  # between 512 and data.max_caption_tokens; one token per byte with the tiny tokenizers
CAPTION = ("a ring on a teal background, photographed from above. " * 40)[:CAPTION_TOKENS]


@pytest.fixture(scope="module")
def pipes():
    return {family: build_tiny_pipeline(family) for family in ("klein", "dev")}


def template_tokens(tokenizer, family: str) -> int:
    """What ComfyUI's prompt template adds around a caption (comfy/text_encoders/flux.py)."""
    if family == "dev":
        return 1 + len(tokenizer(COMFYUI_DEV_TEMPLATE.format(""), add_special_tokens=False)["input_ids"])  # + <s>
    return len(tokenizer(COMFYUI_KLEIN_TEMPLATE.format(""), add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("family", ["klein", "dev"])
def test_comfyui_conditioning_encodes_a_long_caption_whole(pipes, family):
    pipe = pipes[family]
    assert len(pipe.tokenizer(CAPTION, add_special_tokens=False)["input_ids"]) == CAPTION_TOKENS
    (embedding,) = encode_prompts(pipe.text_encoder, pipe.tokenizer, [CAPTION], family=family, mode="comfyui")
    assert embedding.shape[0] == CAPTION_TOKENS + template_tokens(pipe.tokenizer, family) > MAX_SEQUENCE_LENGTH


@pytest.mark.parametrize("family", ["klein", "dev"])
def test_diffusers_conditioning_cuts_a_long_caption_at_512_tokens(pipes, family):
    pipe = pipes[family]
    other_end = CAPTION[:800] + "x" * (CAPTION_TOKENS - 800)  # differs only past token 800
    cut = encode_prompts(pipe.text_encoder, pipe.tokenizer, [CAPTION, other_end], family=family, mode="diffusers")
    assert [e.shape[0] for e in cut] == [MAX_SEQUENCE_LENGTH] * 2
    assert torch.equal(cut[0], cut[1])  # the model never sees the end of the caption


@pytest.mark.parametrize("mode, says", [("comfyui", "encoded whole, as ComfyUI encodes long prompts"),
                                        ("diffusers", "cuts the rest off")])
def test_validation_counts_with_the_tokenizer_and_says_what_happens_past_512(pipes, tmp_path, make_image, mode, says):
    make_image(tmp_path / "a.png", (600, 600))
    (tmp_path / "a.txt").write_text(CAPTION, encoding="utf-8")
    report = validate_dataset(tmp_path, tokenizer=pipes["klein"].tokenizer, text_conditioning=mode)
    (long,) = report.warnings
    assert long.code == "long_caption" and long.path == "a.txt" and long.image == "a.png"
    assert long.message.startswith(f"caption for a.png is {CAPTION_TOKENS} tokens, over 512: ") and says in long.message
    assert report.usable and report.skipped == {}
    assert report.stats["captions"]["tokens"]["max"] == CAPTION_TOKENS
    over = validate_dataset(tmp_path, tokenizer=pipes["klein"].tokenizer, max_caption_tokens=CAPTION_TOKENS - 1)
    assert [(p.code, p.path) for p in over.errors if p.path] == [("caption_too_long", "a.txt")]


@pytest.mark.parametrize("family", ["klein", "dev"])
def test_a_long_caption_is_encoded_alone_not_padded_into_a_batch(pipes, family, monkeypatch):
    pipe = pipes[family]
    short = ["a ring", "a small orange ring on grey"]
    widths, forward = [], pipe.text_encoder.forward

    def counting(*args, **kwargs):
        widths.append(tuple(kwargs["input_ids"].shape))
        return forward(*args, **kwargs)

    monkeypatch.setattr(pipe.text_encoder, "forward", counting)
    together = encode_prompts(pipe.text_encoder, pipe.tokenizer, [short[0], CAPTION, short[1]], family=family,
                              mode="comfyui")
    long_rows = tokenize_prompts(pipe.tokenizer, [CAPTION], family=family, mode="comfyui").keep[0]
    assert widths[0][0] == 2 and widths[0][1] <= MAX_SEQUENCE_LENGTH  # the short ones share a batch
    assert widths[1] == (1, long_rows)  # the long one runs alone
    alone = [encode_prompts(pipe.text_encoder, pipe.tokenizer, [CAPTION], family=family, mode="comfyui")[0],
             *encode_prompts(pipe.text_encoder, pipe.tokenizer, short, family=family, mode="comfyui")]
    for got, expected in zip((together[1], together[0], together[2]), alone):
        assert torch.equal(got, expected)
