"""The frozen VAE and text encoder as the latent cache sees them: loaded late, released early.

A cache build asks for an encoder only when something is missing, so a second run over an
unchanged dataset loads nothing, and whatever was loaded is freed before training starts (the
[dev] text encoder alone is ~48 GB in bf16). To know whether entries are missing without loading a
model, every source has a fingerprint that is cheap to compute: for files, the safetensors headers
(names, shapes, dtypes, offsets), sizes and sampled bytes; for modules already in memory, sampled
weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

_SAMPLES = 16            # evenly spaced reads per file
_SAMPLE_BYTES = 64 << 10  # bytes per read: 1 MiB of a multi-GB file, read in milliseconds


def _file_fingerprint(path: Path, digest) -> None:
    size = path.stat().st_size
    digest.update(f"{path.name}:{size}\n".encode())
    with open(path, "rb") as f:
        if size <= _SAMPLES * _SAMPLE_BYTES * 4:  # small files (configs, tokenizers, tiny models): everything
            digest.update(f.read())
            return
        for n in range(_SAMPLES):
            f.seek((size - _SAMPLE_BYTES) * n // (_SAMPLES - 1))
            digest.update(f.read(_SAMPLE_BYTES))


def source_fingerprint(*paths, extra=None) -> str:
    """SHA-256 over files (a folder counts as all its files, sorted), with sampled bytes for large ones.

    Sampling is what makes this usable on every run: hashing a 48 GB text encoder would take
    minutes. A safetensors file starts with its header, which the first sample covers, so a file with
    other tensors or shapes always differs; values differing only between samples would not, which is
    acceptable for telling model files apart (fine-tunes change every tensor).
    """
    digest = hashlib.sha256(json.dumps(extra, sort_keys=True, default=str).encode())
    for path in paths:
        if path is None:
            continue
        path = Path(path)
        if path.is_dir():  # hidden files (.cache/, .DS_Store) are not part of a model
            files = sorted(p for p in path.rglob("*")
                           if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
        else:
            files = [path]
        for file in files:
            _file_fingerprint(file, digest)
    return digest.hexdigest()


class LoadedEncoders:
    """Encoders already in memory (tests, the demo, a ComfyUI graph that loaded them): never released here."""

    def __init__(self, vae, text_encoder, tokenizer, family: str):
        from ..models import weights_fingerprint

        self.family = family
        self._vae, self._text = vae, (text_encoder, tokenizer)
        self._fingerprints = {"vae": weights_fingerprint(vae),
                              "text": source_fingerprint(extra=[weights_fingerprint(text_encoder),
                                                                _tokenizer_fingerprint(tokenizer)])}

    @classmethod
    def from_pipeline(cls, pipe, family: str) -> LoadedEncoders:
        return cls(pipe.vae, pipe.text_encoder, pipe.tokenizer, family)

    def fingerprint(self, part: str) -> str:
        return self._fingerprints[part]

    def tokenizer(self):
        """The text encoder's tokenizer, for counting caption tokens before anything is encoded."""
        return self._text[1]

    @contextmanager
    def vae(self):
        yield self._vae

    @contextmanager
    def text_encoder(self):
        yield self._text


def _tokenizer_fingerprint(tokenizer) -> str:
    state = {"vocab": sorted(tokenizer.get_vocab().items()), "template": getattr(tokenizer, "chat_template", None),
             "padding_side": tokenizer.padding_side, "special": tokenizer.all_special_tokens}
    return hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()


class FileEncoders:
    """Encoders loaded from the user's files on first use and released on exit from each `with`."""

    def __init__(self, sources, family: str, *, dtype, device, text_quantization: str = "none",
                 text_offload: str = "auto"):
        from ..models import check_text_offload, check_text_quantization

        self.family, self.sources, self.dtype, self.device = family, sources, dtype, device
        self.text_quantization = check_text_quantization(text_quantization)
        self.text_offload = check_text_offload(text_offload)  # where weights wait, not what they compute: not keyed
        # A quantized encoder's embeddings differ from bf16 ones: never reuse either for the other. "none" adds
        # nothing, so caches written before the option existed stay valid (an fp8 file computes as it did).
        quantized = [] if self.text_quantization == "none" else [f"quantization={self.text_quantization}"]
        self._fingerprints = {
            "vae": source_fingerprint(sources.vae, extra=["vae", str(dtype)]),
            "text": source_fingerprint(sources.text_encoder, sources.tokenizer,
                                       extra=["text", family, str(dtype), *quantized]),
        }

    def fingerprint(self, part: str) -> str:
        return self._fingerprints[part]

    def tokenizer(self):
        """The text encoder's tokenizer alone (a second or so; no weights), to count caption tokens before anything
        is encoded: validation measures captions in the tokens the text encoder will see."""
        from ..models import load_tokenizer

        return load_tokenizer(self.sources.tokenizer, self.sources.text_encoder)

    @contextmanager
    def vae(self):
        from ..models import load_vae, release

        log.info("loading the VAE from %s to encode images", self.sources.vae)
        vae = load_vae(self.sources.vae, dtype=self.dtype, device=self.device)
        try:
            yield vae
        finally:
            release(vae)

    @contextmanager
    def text_encoder(self):
        from ..models import load_text_encoder, release, remove_offload

        log.info("loading the text encoder from %s to encode captions", self.sources.text_encoder)
        model, tokenizer = load_text_encoder(self.sources.text_encoder, family=self.family,
                                             tokenizer=self.sources.tokenizer, dtype=self.dtype, device=self.device,
                                             quantization=self.text_quantization, offload=self.text_offload)
        try:
            yield model, tokenizer
        finally:
            remove_offload(model)  # its pinned host copies too
            release(model)


def open_encoders(model, cache=None) -> FileEncoders:
    """FileEncoders for a `model` config section (and `cache`'s text_encoder_offload, default auto): locations
    resolved, family read from the transformer's config or header, device and dtype chosen; nothing loaded yet."""
    from ..models import choose_device, choose_dtype, probe_variant, resolve_sources

    sources = resolve_sources(model.path, vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer)
    family = probe_variant(sources.transformer, model.variant).family
    device = choose_device(model.device)
    return FileEncoders(sources, family, dtype=choose_dtype(model.dtype, device), device=device,
                        text_quantization=getattr(model, "text_encoder_quantization", "none"),
                        text_offload=getattr(cache, "text_encoder_offload", "auto"))
