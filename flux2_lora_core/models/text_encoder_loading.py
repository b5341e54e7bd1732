"""The FLUX.2 text encoders (Qwen3 for [klein], Mistral Small 3.x for [dev]) from ComfyUI files or transformers
folders, and their tokenizers.

Text encoders load as the bare language model (Qwen3Model / MistralModel): FLUX.2 reads hidden states only, and
the [dev] LM head alone would cost 1.3 GB. They are only needed to fill the latent cache; callers `release` them
right after. An fp8 file's linears stay fp8, and model.text_encoder_quantization / cache.text_encoder_offload
fit [dev]'s 24B encoder into a 24 GB GPU (encoder_memory.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..errors import ConfigError, ModelError
from .devices import frozen, with_oom_retry
from .files import identify, is_pipeline, read_header
from .quantization import to_fp8r
from .single_file import text_encoder_to_comfyui
from .sources import locate_tokenizer, missing_tokenizer_hint
from .streaming import fill, read_groups
from .variants import FAMILIES, TEXT_ENCODERS, Variant, text_encoder_config_from_shapes

log = logging.getLogger(__name__)

_TEXT_FAMILY = {"qwen3": "klein", "mistral3": "dev", "mistral": "dev"}  # transformers model_type -> family
_MISTRAL_HF_PREFIXES = ("model.language_model.", "language_model.model.")
_NOT_WEIGHTS = ("tekken_model", "tokenizer_json", "spiece_model", "lm_head.weight", "model.lm_head.weight")
# Quantization companions of a weight (markers and scales): not weights of their own, so not in config shapes.
_QUANT_PARTS = (".comfy_quant", ".weight_scale", ".weight_scale_2", ".scale_weight", ".scale_input", ".input_scale")


def _language_model_state(state: dict, family: str, where, hf: bool | None = None) -> dict:
    """HF (Qwen3ForCausalLM / Mistral3ForConditionalGeneration) or ComfyUI weights -> bare language model.

    `hf` says whether the whole file uses the HF Mistral3 layout; a streamed part (say the vision tower
    alone) cannot tell, so the caller decides it from all the keys."""
    state = {k: v for k, v in state.items() if k not in _NOT_WEIGHTS}
    hf = any(k.startswith(_MISTRAL_HF_PREFIXES) for k in state) if hf is None else hf
    if hf or family == "klein":
        state = text_encoder_to_comfyui(state, family)  # drops the LM head and the vision tower
    foreign = [k for k in state if not k.startswith("model.")]
    if foreign:
        raise ModelError(f"{where}: unexpected tensors for a {TEXT_ENCODERS[family]} language model: {foreign[:3]}")
    return {k[len("model."):]: v for k, v in state.items()}


def _text_family(model_type: str, family: str, where) -> None:
    found = _TEXT_FAMILY.get(model_type)
    if found != family:
        what = f"a {model_type} text encoder" + (f" (FLUX.2 [{found}])" if found else "")
        raise ModelError(f"{where}: this is {what}, but FLUX.2 [{family}] needs {TEXT_ENCODERS[family]}; set "
                         f"model.text_encoder to the [{family}] text encoder")


def _config_shapes(file, family: str, path: Path) -> dict[str, tuple[int, ...]]:
    """The language model's `model.*` shapes from the header alone, through the same renaming as the weights."""
    meta = {k: torch.empty(s, device="meta") for k, s in file.shapes.items()
            if k not in _NOT_WEIGHTS and k != "scaled_fp8" and not k.endswith(_QUANT_PARTS)}
    return {f"model.{k}": tuple(v.shape) for k, v in _language_model_state(meta, family, path).items()}


def _hf_layout(files) -> bool:
    return any(k.startswith(_MISTRAL_HF_PREFIXES) for file in files for k in file.shapes)


def _holds_fp8(path: Path) -> bool:
    """Whether the text encoder's file (or folder's files) stores fp8 weights, from the headers alone."""
    files = [path] if path.is_file() else sorted((path / "text_encoder" if is_pipeline(path) else path).glob(
        "*.safetensors"))
    return any(d.startswith("F8") for f in files for d in read_header(f, key="model.text_encoder").dtypes.values())


def _fp8_kept(tensors: dict, metadata: dict, path: Path) -> dict:
    """A group's fp8 layers in BFL's fp8r layout (fp8 `.weight`, per-row fp32 `.weight_scale`), for
    encoder_memory.adopt_layers to keep in fp8; formats fp8r cannot hold exactly are refused by name."""
    state, scheme = to_fp8r(tensors, metadata, path=path)
    if scheme == "nvfp4":
        raise ModelError(f"{path}: nvfp4 weights are read for the transformer only; use the bf16 or fp8 text encoder")
    return state


def _text_encoder_weights(path: Path, family: str, dtype: torch.dtype):
    """(config, language-model states) from a single file or a transformers folder; the states come one
    layer at a time, read as they are consumed (see streaming.py), fp8 layers still fp8."""
    from transformers import AutoConfig

    if not path.is_dir():
        file = read_header(path, key="model.text_encoder")
        kind, description = identify(file.shapes)
        if kind not in ("qwen3", "mistral"):
            raise ModelError(f"{path}: this is {description}, not a FLUX.2 text encoder; set model.text_encoder to "
                             f"the {TEXT_ENCODERS[family]} file (ComfyUI models/text_encoders) or folder")
        _text_family(kind, family, path)
        config = text_encoder_config_from_shapes(_config_shapes(file, family, path), family)
        hf = _hf_layout([file])
        states = (_language_model_state(_fp8_kept(tensors, metadata, path), family, path, hf)
                  for tensors, metadata in read_groups(file, skip=_NOT_WEIGHTS))
        return config, states
    folder = path / "text_encoder" if is_pipeline(path) else path
    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder}: not a text encoder folder (no config.json); set model.text_encoder to the "
                         f"{TEXT_ENCODERS[family]} file or folder")
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    _text_family(config.model_type, family, folder)
    files = [read_header(file, key="model.text_encoder") for file in sorted(folder.glob("*.safetensors"))]
    if not any(file.shapes.keys() - set(_NOT_WEIGHTS) for file in files):
        raise ModelError(f"{folder}: no .safetensors weights (pickled .bin files are never loaded)")
    hf = _hf_layout(files)
    states = (_language_model_state(_fp8_kept(tensors, metadata, file.path), family, folder, hf)
              for file in files for tensors, metadata in read_groups(file, skip=_NOT_WEIGHTS))
    return config.get_text_config(), states


def load_tokenizer(tokenizer, path):
    """The tokenizer named by `tokenizer` (a folder, a file in one, or a text-encoder file that carries its
    tokenizer), else the one `locate_tokenizer` finds for the text encoder at `path` (a file or folder)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if tokenizer is None or not str(tokenizer):
        text_encoder = path / "text_encoder" if is_pipeline(path) else path
        tokenizer = locate_tokenizer(text_encoder, path if is_pipeline(path) else None)
        if tokenizer is None:
            raise ModelError(f"{path}: no tokenizer inside or beside the text encoder; "
                             f"{missing_tokenizer_hint(text_encoder)}")
        log.info("tokenizer of %s: %s", path, "inside the file" if tokenizer == text_encoder else tokenizer)
    folder = Path(tokenizer)
    if folder.is_file() and folder.suffix == ".safetensors":
        return _embedded_tokenizer(folder)
    folder = folder.parent if folder.is_file() else folder
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelError(f"{folder}: not a tokenizer folder ({str(exc).splitlines()[0][:200]}); set model.tokenizer "
                         f"to a folder holding tokenizer.json / tokenizer_config.json") from None


def _embedded_tokenizer(path: Path):
    """The tokenizer a text-encoder file carries (ComfyUI's [dev] files: tekken.json bytes as `tekken_model`)."""
    from safetensors import safe_open

    from .tekken import KEY, tokenizer_from_tekken

    file = read_header(path, key="model.tokenizer")
    if KEY not in file.shapes:
        raise ModelError(f"{path}: this file carries no tokenizer (no {KEY!r} entry); set model.tokenizer to the "
                         f"tokenizer folder (tokenizer.json / tokenizer_config.json) of the text encoder")
    with safe_open(str(path), framework="pt", device="cpu") as f:
        data = f.get_tensor(KEY)
    return tokenizer_from_tekken(data, where=path)


def load_text_encoder(path, *, family: str, tokenizer=None, dtype: torch.dtype, device: torch.device,
                      quantization: str = "none", offload: str = "none"):
    """(language model, tokenizer) for FLUX.2 [klein] (Qwen3) or [dev] (Mistral Small 3.x), frozen.

    The model is the bare Qwen3Model / MistralModel: `model(input_ids=..., attention_mask=...,
    output_hidden_states=True).hidden_states` equals the pipeline text encoder's.
    Memory (see encoder_memory.py): an fp8 file's linears stay fp8; `quantization` (none | fp8 | int8 | nf4)
    quantizes the others layer by layer as they load; `offload` (auto | none | layers) keeps the weights in host
    memory and runs one decoder layer at a time on `device` ("auto": when they would not fit it).
    """
    from accelerate import init_empty_weights
    from transformers import MistralModel, Qwen3Model

    from .encoder_memory import (adopt_layers, check_text_offload, check_text_quantization, choose_offload,
                                 offload_layers, weight_bytes)

    if family not in FAMILIES:
        raise ConfigError([("model.variant", f"unknown FLUX.2 family {family!r}: expected dev or klein")])
    quantization, offload = check_text_quantization(quantization), check_text_offload(offload)
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model.text_encoder: {str(path)!r} does not exist")
    chosen = "none"

    def load():
        nonlocal chosen
        config, states = _text_encoder_weights(path, family, dtype)  # headers read; no weights yet
        cls = Qwen3Model if family == "klein" else MistralModel
        with init_empty_weights(include_buffers=False):  # buffers (RoPE frequencies) are computed, keep them
            model = cls(config)
        nbytes = weight_bytes(model, scheme=quantization, dtype=dtype, fp8_file=_holds_fp8(path))
        chosen = choose_offload(offload, nbytes, device)
        home = torch.device("cpu") if chosen == "layers" else device  # offloaded weights live in host memory
        model = fill(model, adopt_layers(model, states, scheme=quantization, dtype=dtype, device=home), dtype=dtype,
                     device=home, where=str(path))
        model.config._name_or_path = str(path)  # named in check_compatible's messages
        return model

    model = with_oom_retry(load, what="the text encoder", path=path)
    tok = load_tokenizer(tokenizer, path)
    if len(tok) > model.config.vocab_size:
        raise ModelError(f"{path}: the tokenizer has {len(tok)} tokens but the text encoder embeds only "
                         f"{model.config.vocab_size}; set model.tokenizer to this text encoder's tokenizer")
    log.info("loaded %s text encoder (%s) from %s", TEXT_ENCODERS[family], dtype, path)
    model = frozen(model)
    return (offload_layers(model, device) if chosen == "layers" else model), tok


def check_compatible(variant: Variant, text_encoder) -> None:
    """Raise ModelError unless `text_encoder` produces the embeddings `variant`'s transformer reads."""
    config = text_encoder.config.get_text_config() if hasattr(text_encoder.config, "get_text_config") \
        else text_encoder.config
    source = getattr(text_encoder.config, "_name_or_path", "") or "the text encoder"
    found = _TEXT_FAMILY.get(config.model_type)
    if 3 * config.hidden_size != variant.joint_attention_dim or found != variant.family:
        raise ModelError(f"{source}: a {config.model_type} text encoder with hidden size {config.hidden_size} "
                         f"(3 x {config.hidden_size} = {3 * config.hidden_size}), but the transformer "
                         f"{variant.source or variant.name} reads joint_attention_dim {variant.joint_attention_dim}: "
                         f"it needs {variant.text_encoder}; set model.text_encoder accordingly")
