"""The configuration as its three users meet it: YAML files on disk, `key=value` overrides, and
mappings built by the nodes; every mistake is reported, all at once, under its dotted key."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
from pathlib import Path

import pytest
import yaml

from flux2_lora_core.config import (
    CacheConfig,
    Config,
    DataConfig,
    ModelConfig,
    OutputConfig,
    PRESETS,
    check_paths,
    config_from_dict,
    default_cache_dir,
    describe_keys,
    load_config,
)
from flux2_lora_core.errors import ConfigError, Flux2LoraError


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def problems(**kwargs) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        load_config(**kwargs)
    return dict(info.value.problems)


# ---------------------------------------------------------------------------------------------- defaults
def test_defaults():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.model == ModelConfig(path="", variant="auto", vae="", text_encoder="", tokenizer="", dtype="auto",
                                    device="auto", text_conditioning="comfyui")
    assert cfg.data == DataConfig(path="", caption_extensions=(".txt",), trigger_word="", repeats=1, recursive=True,
                                  resolution=(1024,), buckets=True, max_aspect=4.0, flip=False)
    assert cfg.cache == CacheConfig(dir="", batch_size=1, verify="quick")
    assert cfg.output == OutputConfig(dir="output", name="flux2_lora")


def test_describe_keys_covers_every_field_with_its_default_and_help():
    described = {k.key: k for k in describe_keys()}
    cfg = Config()
    every = {f"{s.name}.{f.name}" for s in dataclasses.fields(cfg) for f in dataclasses.fields(getattr(cfg, s.name))}
    assert set(described) == every
    required = {"model.path", "model.variant", "data.path", "data.resolution", "lora.rank", "lora.alpha", "train.steps",
                "train.batch_size", "train.lr", "train.seed", "sample.every", "checkpoint.every", "output.dir",
                "output.name"}  # the keys the trainer's CLI contract promises
    assert required <= every
    defaults = Config().to_dict()
    for key, info in described.items():
        section, name = key.split(".")
        assert info.default == defaults[section][name] and info.help.strip()
    assert described["data.resolution"].type == "list[int]" and described["data.flip"].type == "bool"
    assert described["data.max_aspect"].type == "float"


# ---------------------------------------------------------------------------------------------- precedence
def test_base_then_file_then_overrides_in_order(tmp_path):
    config = write(tmp_path / "c.yaml", "model:\n  path: /models/klein\n  dtype: fp16\ndata:\n  repeats: 3\n"
                                        "  resolution: [512, 768]\n")
    base = {"model": {"dtype": "fp32", "device": "cpu"}, "data": {"repeats": 2, "flip": True}}
    cfg = load_config(config, ["data.repeats=5", "model.dtype=bf16", "data.repeats=7"], base=base)
    assert cfg.model.path == "/models/klein" and cfg.model.device == "cpu" and cfg.data.flip is True
    assert cfg.model.dtype == "bf16" and cfg.data.repeats == 7 and cfg.data.resolution == (512, 768)
    assert load_config(base=cfg) == cfg


def test_override_values_are_yaml_except_for_text_fields():
    cfg = load_config(overrides=["data.resolution=[512,1024]", "data.flip=true", "model.path=/x y/z",
                                 "output.name=001", "data.max_aspect=2", "data.trigger_word='ohwx, man'",
                                 "data.caption_extensions=txt,caption", " cache.batch_size = 8 ", "model.vae=/a=b"])
    assert cfg.data.resolution == (512, 1024) and cfg.data.flip is True and cfg.model.path == "/x y/z"
    assert cfg.output.name == "001" and cfg.data.max_aspect == 2.0 and isinstance(cfg.data.max_aspect, float)
    assert cfg.data.trigger_word == "ohwx, man" and cfg.data.caption_extensions == (".txt", ".caption")
    assert cfg.cache.batch_size == 8 and cfg.model.vae == "/a=b"
    assert load_config(overrides=["data.resolution=512,768"]).data.resolution == (512, 768)
    assert load_config(overrides=["data.resolution=768"]).data.resolution == (768,)


def test_yaml_booleans_are_only_true_and_false(tmp_path):
    config = write(tmp_path / "c.yaml", "data:\n  trigger_word: no\n  flip: TRUE\n  max_aspect: 1e1\n")
    cfg = load_config(config)
    assert cfg.data.trigger_word == "no" and cfg.data.flip is True and cfg.data.max_aspect == 10.0


def test_empty_file_section_and_text_value_mean_defaults(tmp_path):
    assert load_config(write(tmp_path / "empty.yaml", "")) == Config()
    assert load_config(write(tmp_path / "c.yaml", "data:\n  # path: x\nmodel:\n  vae:\n")) == Config()


def test_choices_match_the_modules_that_use_them():
    from flux2_lora_core.cache.encoding import TEXT_CONDITIONING
    from flux2_lora_core.cache.store import VERIFY_MODES

    meta = {k: f.metadata for s in (ModelConfig, CacheConfig) for k, f in s.__dataclass_fields__.items()}
    assert meta["verify"]["choices"] == tuple(VERIFY_MODES)
    assert meta["text_conditioning"]["choices"] == tuple(TEXT_CONDITIONING)


# ---------------------------------------------------------------------------------------------- normalising
def test_variant_and_dtype_aliases():
    for alias, full in [("dev", "flux2-dev"), ("klein-4b", "flux2-klein-4b"), ("Klein-9B", "flux2-klein-9b"),
                        ("flux2-dev", "flux2-dev")]:
        assert load_config(overrides=[f"model.variant={alias}"]).model.variant == full
    assert load_config(overrides=["model.dtype=bfloat16"]).model.dtype == "bf16"
    assert load_config(overrides=["model.device=CUDA:1"]).model.device == "cuda:1"


def test_paths_are_unquoted_and_expanded_but_stay_relative(tmp_path):
    cfg = load_config(write(tmp_path / "c.yaml", "data:\n  path: \"  '~/my data'  \"\ncache:\n  dir: rel/cache\n"),
                      ["model.path= \"/models/my model\" "])
    assert cfg.data.path == os.path.expanduser("~/my data") and not cfg.data.path.startswith("~")
    assert cfg.model.path == "/models/my model" and cfg.cache.dir == "rel/cache"


def test_sections_validate_when_built_directly():
    assert DataConfig(caption_extensions="TXT, caption").caption_extensions == (".txt", ".caption")
    assert ModelConfig(variant="dev").variant == "flux2-dev"
    with pytest.raises(ConfigError) as info:
        DataConfig(repeats=0, resolution=100)
    assert [k for k, _ in info.value.problems] == ["data.repeats", "data.resolution"]
    with pytest.raises(TypeError):
        Config(data={"path": "x"})


def test_configs_are_hashable_and_picklable_for_comfyui_sockets():
    cfg = load_config(overrides=["data.resolution=[512,768]"])
    assert pickle.loads(pickle.dumps(cfg)) == cfg and hash(cfg) == hash(pickle.loads(pickle.dumps(cfg)))


def test_replace_returns_a_validated_copy():
    cfg = Config().replace({"data.resolution": [512], "model.variant": "dev"}, output={"name": "mine"})
    assert cfg.data.resolution == (512,) and cfg.model.variant == "flux2-dev" and cfg.output.name == "mine"
    with pytest.raises(ConfigError) as info:
        cfg.replace({"data.repeats": -1, "data.resolutoin": 512})
    assert dict(info.value.problems).keys() == {"data.repeats", "data.resolutoin"}


# ---------------------------------------------------------------------------------------------- round trips
def test_round_trips_through_dict_json_and_yaml(tmp_path):
    cfg = load_config(overrides=["model.path=~/m", "model.variant=klein-4b", "data.resolution=[512,1024]",
                                 "data.caption_extensions=[txt, md]", "data.max_aspect=2.5", "output.name=a b"])
    assert config_from_dict(cfg.to_dict()) == cfg
    assert config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    saved = write(tmp_path / "run.yaml", yaml.safe_dump(cfg.to_dict()))
    assert load_config(saved) == cfg
    assert cfg.to_dict()["data"]["resolution"] == [512, 1024]


# ---------------------------------------------------------------------------------------------- cache dir
def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("FLUX2_LORA_CACHE", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert Config().cache.resolved_dir == default_cache_dir() == tmp_path / "env"
    assert load_config(overrides=[f"cache.dir={tmp_path / 'mine'}"]).cache.resolved_dir == tmp_path / "mine"
    monkeypatch.setenv("FLUX2_LORA_CACHE", "")
    assert default_cache_dir() == tmp_path / "xdg" / "flux2-lora"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "flux2-lora"


# ---------------------------------------------------------------------------------------------- errors
def test_config_error_is_a_flux2_lora_error():
    assert issubclass(ConfigError, Flux2LoraError)


def test_unknown_sections_and_keys_suggest_the_meant_one(tmp_path):
    found = problems(path=write(tmp_path / "c.yaml", "dataset:\n  path: x\ndata:\n  resolutoin: 512\n  dtype: bf16\n"
                                                    "resolution: 512\n"), overrides=["lr=1", "data.path.x=1"])
    assert "did you mean `data`?" in found["dataset"]
    assert "did you mean `data.resolution`?" in found["data.resolutoin"]
    assert "did you mean `model.dtype`?" in found["data.dtype"]
    assert "did you mean `data.resolution`?" in found["resolution"]
    assert "did you mean `train.lr`?" in found["lr"]
    assert "data.path" in found["data.path.x"]


def test_wrong_types_say_what_was_given_and_what_is_expected(tmp_path):
    found = problems(path=write(tmp_path / "c.yaml", "data:\n  flip: yes\n  repeats: true\n  recursive: 1\n"
                                                    "  resolution: [512, x]\n  trigger_word: 1990\n  max_aspect: .inf\n"
                                                    "  caption_extensions: [1]\ncache:\n  batch_size: 2.5\n"))
    assert found["data.flip"] == "expected true or false, got 'yes'"
    assert found["data.repeats"] == "expected a whole number, got True"
    assert found["data.recursive"] == "expected true or false, got 1"
    assert "got [512, 'x']" in found["data.resolution"]
    assert "got 1990" in found["data.trigger_word"] and "quote" in found["data.trigger_word"]
    assert "got inf" in found["data.max_aspect"]
    assert "got [1]" in found["data.caption_extensions"]
    assert found["cache.batch_size"] == "expected a whole number, got 2.5"


def test_presets_set_valid_keys_under_the_users_values():
    """A preset is a base: every key it sets is a real one, and the user's file and overrides win over it."""
    for name, preset in PRESETS.items():
        assert load_config(base=preset).to_dict()["lora"]["rank"] == preset["lora"]["rank"], name
    cfg = load_config(overrides=["lora.rank=4", "train.caption_dropout=0"], base=PRESETS["style"])
    assert (cfg.lora.rank, cfg.train.caption_dropout, cfg.train.steps, cfg.data.flip) == (4, 0.0, 2000, True)


def test_sample_steps_zero_means_no_samples_and_negative_is_refused():
    assert load_config(overrides=["sample.steps=0", "sample.every=100"]).sample.steps == 0
    assert "must be at least 0" in problems(overrides=["sample.steps=-1"])["sample.steps"]


def test_out_of_range_and_bad_choices():
    found = problems(overrides=["data.repeats=0", "cache.batch_size=-2", "data.max_aspect=0.5",
                                "data.resolution=[1000]", "model.variant=Klein", "model.dtype=int8",
                                "model.device=gpu", "cache.verify=none",
                                "model.text_conditioning=kohya", "output.name=a/b", "data.caption_extensions=png"])
    assert found["data.repeats"] == "must be at least 1, got 0" and "-2" in found["cache.batch_size"]
    assert "0.5" in found["data.max_aspect"] and "multiple of 16 between 64 and 4096" in found["data.resolution"]
    assert found["model.variant"].startswith("'Klein' is not one of auto, flux2-dev, flux2-klein-4b, flux2-klein-9b")
    assert "(or dev, klein-4b, klein-9b)" in found["model.variant"]
    assert "auto, bf16, fp16, fp32" in found["model.dtype"] and "cuda:N" in found["model.device"]
    assert "quick, full" in found["cache.verify"] and "comfyui, diffusers" in found["model.text_conditioning"]
    assert "'a/b' is not a valid file name" in found["output.name"]
    assert "image extension" in found["data.caption_extensions"]


def test_resolution_rules():
    assert load_config(overrides=["data.resolution=[1024, 512]"]).data.resolution == (1024, 512)  # the user's order
    assert "512 listed twice" in problems(overrides=["data.resolution=[512,1024,512]"])["data.resolution"]
    assert "at least one" in problems(overrides=["data.resolution=[]"])["data.resolution"]
    assert "4112" in problems(overrides=["data.resolution=4112"])["data.resolution"]
    for name in ["", ".", "..", "a\\b", "x:y", "end."]:
        assert "output.name" in problems(base={"output": {"name": name}})


def test_malformed_overrides_name_the_override():
    found = problems(overrides=["foo", "=x", "data=5", "output=1", "data.resolution=[512,"])
    assert "'foo' is not key=value" in found["foo"] and "'=x' is not key=value" in found["=x"]
    assert "names a section" in found["data"] and "data.path=" in found["data"]
    assert "output.dir=" in found["output"]
    assert "'data.resolution=[512,'" in found["data.resolution"]


def test_file_problems_name_the_file_and_line(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert problems(path=missing) == {str(missing): "no such config file"}
    bad = write(tmp_path / "bad.yaml", "data:\n  path: x\n  resolution: [512\n")
    (message,) = problems(path=bad).values()
    assert str(bad) in problems(path=bad) and "is not valid YAML" in message and "line 4" in message
    listed = write(tmp_path / "list.yaml", "- a\n- b\n")
    assert "must be a mapping of sections" in problems(path=listed)[str(listed)]
    twice = write(tmp_path / "twice.yaml", "data:\n  repeats: 2\n  repeats: 3\n")
    assert "duplicate key 'repeats'" in problems(path=twice)[str(twice)]
    assert "line 3" in problems(path=twice)[str(twice)]
    scalar = write(tmp_path / "scalar.yaml", "data: 5\nmodel: [a]\n")
    found = problems(path=scalar, overrides=["data.flip=true"])
    assert found == {"data": "expected a mapping of data.* keys, got 5", "model": "expected a mapping of model.* keys, "
                                                                                  "got ['a']"}
    with pytest.raises(ConfigError):
        config_from_dict([1, 2])


def test_five_mistakes_in_a_file_and_overrides_come_back_together(tmp_path):
    config = write(tmp_path / "c.yaml", "model:\n  variant: flux3\ndata:\n  repeats: 0\n  resolutoin: 512\n")
    with pytest.raises(ConfigError) as info:
        load_config(config, ["data.flip=maybe", "output.name=../x"])
    keys = [key for key, _ in info.value.problems]
    assert sorted(keys) == sorted(["model.variant", "data.repeats", "data.resolutoin", "data.flip", "output.name"])
    assert all(key in str(info.value) for key in keys)


def test_a_broken_file_does_not_hide_override_mistakes(tmp_path):
    found = problems(path=tmp_path / "missing.yaml", overrides=["data.repeats=0"])
    assert set(found) == {str(tmp_path / "missing.yaml"), "data.repeats"}


# ---------------------------------------------------------------------------------------------- check_paths
def test_check_paths(tmp_path, monkeypatch):
    assert dict(check_paths(Config())).keys() == {"model.path", "data.path"}
    assert "not set" in dict(check_paths(Config()))["data.path"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "images").mkdir()
    write(tmp_path / "model.safetensors", "x")
    good = load_config(overrides=["model.path=model.safetensors", "data.path=images"])
    assert check_paths(good) == []
    bad = load_config(overrides=["model.path=gone", "data.path=model.safetensors", "model.vae=/no/vae"])
    found = dict(check_paths(bad))
    assert "'gone' does not exist" in found["model.path"] and str(tmp_path) in found["model.path"]
    assert "is a file" in found["data.path"] and "does not exist" in found["model.vae"]
    assert dict(check_paths(bad, needs=("data",))).keys() == {"data.path"}
    with pytest.raises(ValueError):
        check_paths(good, needs=("lora",))
