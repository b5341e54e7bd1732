"""Offline stand-ins for the FLUX.2 text-encoder tokenizers (Qwen3 for [klein], Mistral-Small-3.x for [dev]).

The real tokenizers live on the model hub, and tests and demos must run without it. What the pipelines
need from a tokenizer is not its vocabulary but its behaviour: the chat template that wraps a prompt,
the special tokens that template emits, which side it pads on and that any text round-trips. A
byte-level BPE with the 256 byte symbols and no merges has all of that in a few kilobytes: every
UTF-8 string encodes (one token per byte) and decodes back exactly.

Both are plain `PreTrainedTokenizerFast` objects: they save and load with transformers'
`save_pretrained` / `from_pretrained` and inside a diffusers pipeline folder, with nothing to download.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

# Qwen3's chat template reduced to what FLUX.2 [klein] uses, rendering those messages exactly as the
# real template does: with add_generation_prompt and enable_thinking=False it closes with an empty
# think block, which is part of what the real text encoder sees.
QWEN3_CHAT_TEMPLATE = (
    "{%- macro text(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for part in content -%}{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + text(message['content']) + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)

# The Mistral-Small-3.x (Tekken) layout: <s>[SYSTEM_PROMPT]...[/SYSTEM_PROMPT][INST]...[/INST].
# diffusers' Flux2Pipeline passes content as [{"type": "text", "text": ...}] blocks, ComfyUI as a string;
# both must render the same.
MISTRAL3_CHAT_TEMPLATE = (
    "{%- macro text(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- elif part['type'] in ['image', 'image_url'] -%}{{- '[IMG]' -}}"
    "{%- else -%}{{- raise_exception('only text and image blocks are supported in message content') -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{- '[SYSTEM_PROMPT]' + text(message['content']) + '[/SYSTEM_PROMPT]' -}}"
    "{%- elif message['role'] == 'user' -%}"
    "{{- '[INST]' + text(message['content']) + '[/INST]' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- text(message['content']) + eos_token -}}"
    "{%- else -%}{{- raise_exception('unsupported role: ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

# The first Tekken ids, in the real order, so that code holding Mistral ids (ComfyUI pads with 11 and
# starts with 1) sees the same tokens. Bytes follow them.
MISTRAL3_SPECIAL_TOKENS = (
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]",
    "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
)
# Qwen3's special tokens in their real relative order (real ids 151643..151645); they follow the bytes.
QWEN3_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# <think> and </think> are ordinary added tokens in Qwen3: decoding with skip_special_tokens keeps them.
QWEN3_ADDED_TOKENS = ("<think>", "</think>")

STYLES = ("qwen3", "mistral3")


def byte_symbols() -> list[str]:
    """The printable stand-in for each byte 0..255 that byte-level BPE (GPT-2 and its heirs) uses.

    Printable Latin-1 bytes stand for themselves; the rest are shifted past 255 so that no symbol is
    whitespace or a control character. Index i holds the symbol of byte i.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, shifted = {}, 0
    for b in range(256):
        if b in keep:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + shifted)
            shifted += 1
    return [symbols[b] for b in range(256)]


def _byte_level_tokenizer(vocab: dict[str, int], special: list[str], added: list[str]):
    """A `tokenizers.Tokenizer` over `vocab` (bytes and specials) with no merges."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    return tok


def build_tokenizer(style: str, model_max_length: int = 1024) -> PreTrainedTokenizerFast:
    """A tiny offline tokenizer with the `style` family's special tokens, chat template and padding side.

    `style` is "qwen3" (FLUX.2 [klein]) or "mistral3" (FLUX.2 [dev]).
    """
    from ..errors import ConfigError

    symbols = byte_symbols()
    if style == "qwen3":
        vocab = {s: i for i, s in enumerate(symbols)}
        vocab.update({t: len(symbols) + i for i, t in enumerate(QWEN3_SPECIAL_TOKENS)})
        tok = _byte_level_tokenizer(vocab, list(QWEN3_SPECIAL_TOKENS), list(QWEN3_ADDED_TOKENS))
        # As in Qwen3's tokenizer_config: no BOS, <|im_end|> ends a turn, <|endoftext|> pads, on the right
        # (FLUX.2 [klein] pads the prompt on the right in diffusers and ComfyUI alike).
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="right",
            chat_template=QWEN3_CHAT_TEMPLATE, model_max_length=model_max_length,
            clean_up_tokenization_spaces=False)
    if style == "mistral3":
        vocab = {t: i for i, t in enumerate(MISTRAL3_SPECIAL_TOKENS)}
        vocab.update({s: len(MISTRAL3_SPECIAL_TOKENS) + i for i, s in enumerate(symbols)})
        tok = _byte_level_tokenizer(vocab, list(MISTRAL3_SPECIAL_TOKENS), [])
        # Left padding: the real tokenizer is a LlamaTokenizer(Fast), whose class default is left, and
        # ComfyUI's Mistral3Tokenizer pads on the left too (pad_left=True). Pad tokens then come before
        # the prompt, where ComfyUI also puts its zero padding.
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
            padding_side="left", chat_template=MISTRAL3_CHAT_TEMPLATE, model_max_length=model_max_length,
            clean_up_tokenization_spaces=False)
    raise ConfigError([("style", f"unknown tokenizer style {style!r}: choose one of {', '.join(STYLES)}")])
