"""sources.py: where a text encoder's tokenizer is found when none is named, most certain first.

explicit model.tokenizer > inside the text-encoder file ([dev]: ComfyUI's `tekken_model`) > beside it (a folder's
own files, a pipeline's tokenizer/, tokenizer files next to a single file) > ComfyUI's bundled Qwen tokenizer
([klein], only when this process is ComfyUI). Real files throughout: the tiny models' single files, and for
"inside ComfyUI" a real `comfy` namespace package imported from tmp_path, laid out as ComfyUI's is, whose
qwen25_tokenizer folder holds the tiny Qwen3 tokenizer (ComfyUI's real one does not fit the tiny encoder).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import shutil
import sys
from types import SimpleNamespace

import pytest
import torch

from flux2_lora_core.cache.encoding import tokenize_prompts
from flux2_lora_core.errors import ModelError
from flux2_lora_core.models import load_text_encoder, load_tokenizer, locate_tokenizer, resolve_sources
from flux2_lora_core.models.tiny_models import COMFYUI_FILES, VARIANTS, write_tiny_model
from flux2_lora_core.models.tokenizer import build_tokenizer

LOAD = {"dtype": torch.float32, "device": torch.device("cpu")}
PROMPTS = ["a red fox", "zxq, two cats on a sofa, watercolour 🦊"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Per variant: the ComfyUI single files and the tiny tokenizer folder written beside them."""
    out = {}
    for variant in VARIANTS:
        root = tmp_path_factory.mktemp(f"sources-{variant}")
        write_tiny_model(root, variant=variant, fmt="comfyui")
        out[variant] = SimpleNamespace(**{part: root / name for part, name in COMFYUI_FILES[variant].items()})
    return out


@pytest.fixture
def alone(tiny, tmp_path):
    """alone(variant) -> a copy of the variant's text-encoder file in a folder of its own (nothing beside it)."""
    def copy(variant: str):
        target = tmp_path / f"{variant}-text_encoders" / tiny[variant].text_encoder.name
        target.parent.mkdir()
        shutil.copy(tiny[variant].text_encoder, target)
        return target

    return copy


@pytest.fixture
def outside_comfyui(monkeypatch):
    monkeypatch.delitem(sys.modules, "comfy", raising=False)


@pytest.fixture
def inside_comfyui(tmp_path, monkeypatch):
    """This process as the engine sees ComfyUI: its `comfy` package imported. Returns the bundled tokenizer folder."""
    root = tmp_path / "ComfyUI"
    bundled = root / "comfy" / "text_encoders" / "qwen25_tokenizer"
    build_tokenizer("qwen3").save_pretrained(bundled)
    spec = importlib.machinery.PathFinder.find_spec("comfy", [str(root)])  # a namespace package, as ComfyUI's is
    monkeypatch.setitem(sys.modules, "comfy", importlib.util.module_from_spec(spec))
    return bundled


def ids(tokenizer, variant: str) -> torch.Tensor:
    return tokenize_prompts(tokenizer, PROMPTS, family=variant, mode="comfyui").input_ids


def sources(tiny, variant: str, text_encoder, **kwargs):
    files = tiny[variant]
    return resolve_sources(files.transformer, vae=files.vae, text_encoder=text_encoder, **kwargs)


# ---------------------------------------------------------------------------------------------- [dev]: inside
def test_a_dev_file_brings_its_own_tokenizer(tiny, alone, outside_comfyui):
    """No tokenizer folder anywhere: the [dev] file's tekken_model is read, and it is the tiny tokenizer."""
    file = alone("dev")
    assert locate_tokenizer(file) == file and sources(tiny, "dev", file).tokenizer == file
    _, tokenizer = load_text_encoder(file, family="dev", **LOAD)
    reference = load_tokenizer(tiny["dev"].tokenizer, file)      # the tokenizer/ folder written beside the files
    assert tokenizer.get_vocab() == reference.get_vocab() and tokenizer.padding_side == "left"
    assert torch.equal(ids(tokenizer, "dev"), ids(reference, "dev"))
    named = sources(tiny, "dev", file, tokenizer=tiny["dev"].tokenizer)  # a named tokenizer still wins
    assert named.tokenizer == tiny["dev"].tokenizer


def test_inside_comfyui_dev_still_reads_its_own(tiny, alone, inside_comfyui):
    file = alone("dev")
    assert sources(tiny, "dev", file).tokenizer == file  # ComfyUI's Qwen tokenizer is for Qwen3 encoders only


def test_a_file_named_as_tokenizer_must_carry_one(tiny):
    with pytest.raises(ModelError) as info:
        load_tokenizer(tiny["klein"].text_encoder, tiny["klein"].text_encoder)
    message = str(info.value)
    assert str(tiny["klein"].text_encoder) in message and "'tekken_model'" in message and "model.tokenizer" in message


# ---------------------------------------------------------------------------------------------- [klein]: ComfyUI's
def test_inside_comfyui_klein_uses_comfyuis_tokenizer_unless_one_is_nearer(tiny, alone, inside_comfyui):
    file = alone("klein")
    assert sources(tiny, "klein", file).tokenizer == inside_comfyui            # nothing nearer: ComfyUI's own
    _, tokenizer = load_text_encoder(file, family="klein", **LOAD)
    assert torch.equal(ids(tokenizer, "klein"), ids(build_tokenizer("qwen3"), "klein"))

    build_tokenizer("qwen3").save_pretrained(file.parent)                      # tokenizer files beside the file
    assert sources(tiny, "klein", file).tokenizer == file.parent
    named = sources(tiny, "klein", file, tokenizer=tiny["klein"].tokenizer)    # a named one wins over both
    assert named.tokenizer == tiny["klein"].tokenizer


def test_outside_comfyui_a_klein_file_alone_says_how_to_fix_it(tiny, alone, outside_comfyui):
    file = alone("klein")
    assert locate_tokenizer(file) is None
    for load in (lambda: load_text_encoder(file, family="klein", **LOAD), lambda: sources(tiny, "klein", file)):
        with pytest.raises(ModelError) as info:
            load()
        message = str(info.value)
        assert all(word in message for word in (str(file), "model.tokenizer", "qwen25_tokenizer")), message


def test_pipeline_folders_keep_their_tokenizer_folder(tmp_path, inside_comfyui):
    write_tiny_model(tmp_path, variant="klein")
    assert resolve_sources(tmp_path).tokenizer == tmp_path / "tokenizer"
    assert locate_tokenizer(tmp_path / "text_encoder") == tmp_path / "tokenizer"
