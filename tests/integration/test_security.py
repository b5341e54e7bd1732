"""Attacks over ComfyUI's API, as any client of a `--listen` server can send them, against the pack's nodes.

Each attack is a real POST /prompt to the real server. A literal that leads out is refused when the prompt is
queued (HTTP 400, the node's error naming the input), so nothing runs; a model picker (a combo) is refused by ComfyUI
itself when the name is not one of its listed files; a path that arrives through a link is
refused by the node when it runs (an execution_error naming the input), before any model loads. Outside the
server's base directory lie a canary dataset (files named with CANARY), a model-like file and a tokenizer folder:
no response, history entry or log line ever names a canary file, and nothing is written outside ComfyUI's
folders (the outside tree is unchanged, no file carries the attacks' WRITTEN token anywhere).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.integration

CANARY = f"canary{uuid.uuid4().hex[:12]}"  # in the names of files planted outside: must never be shown
WRITTEN = f"written{uuid.uuid4().hex[:12]}"  # in every name an attack tries to create: must never exist
ALLOWED_ROOTS = Path("user", "__flux2_lora", "allowed_roots.txt")  # under the server's base directory
MODEL_FILES = {"diffusion_models": "sec_transformer.safetensors", "vae": "sec_vae.safetensors",
               "text_encoders": "sec_text_encoder.safetensors"}


def image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (512, 384), (seed * 40 % 256, 90, 160)).save(path)
    path.with_suffix(".txt").write_text(f"a photo number {seed}", encoding="utf-8")


@pytest.fixture(scope="module")
def world(comfyui, tmp_path_factory):
    """The planted files, and the state of everything outside ComfyUI's folders before any attack."""
    outside = tmp_path_factory.mktemp("outside")
    assert comfyui.base not in outside.parents and outside not in comfyui.base.parents
    image(outside / "dataset" / f"{CANARY}_1.png", 1)
    image(outside / "dataset" / "sub" / f"{CANARY}_2.png", 2)
    (outside / "weights.safetensors").write_bytes(b"not really weights")
    (outside / "tokenizer" / f"{CANARY}_tokenizer.json").parent.mkdir()
    (outside / "tokenizer" / f"{CANARY}_tokenizer.json").write_text("{}", encoding="utf-8")
    image(outside / "allowed" / "shared_set" / "shared_1.png", 3)  # for the allowed-roots test only
    for folder, name in MODEL_FILES.items():  # the pickers list these; never loaded (no attacked prompt runs)
        (comfyui.base / "models" / folder).mkdir(parents=True, exist_ok=True)
        (comfyui.base / "models" / folder / name).touch()

    inputs = comfyui.input_dir
    image(inputs / "sec_ok" / "own_1.png", 4)
    image(inputs / "sec_ok" / "own_2.png", 5)
    (inputs / "sec_door").symlink_to(outside / "dataset", target_is_directory=True)  # a folder link leading out
    image(inputs / "sec_mixed" / "own_1.png", 6)
    image(inputs / "sec_mixed" / "own_2.png", 7)
    (inputs / "sec_mixed" / "borrowed.png").symlink_to(outside / "dataset" / f"{CANARY}_1.png")
    (inputs / "sec_mixed" / "borrowed.txt").symlink_to(outside / "dataset" / f"{CANARY}_1.txt")
    (inputs / "sec_mixed" / "more").symlink_to(outside / "dataset" / "sub", target_is_directory=True)
    return {"outside": outside, "before": snapshot(outside)}


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.is_symlink(), p.lstat().st_size, p.lstat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def assert_nothing_leaked(comfyui, world, *texts) -> None:
    for text in texts:
        assert CANARY not in text, f"a canary file name was shown: {text[:3000]}"
    assert snapshot(world["outside"]) == world["before"], "something outside ComfyUI's folders changed"
    for root in (world["outside"], comfyui.base):
        created = [str(p) for p in root.rglob(f"*{WRITTEN}*")]
        assert not created, created


def training_graph(**changes) -> dict:
    """Load Dataset -> Load Training Model -> Cache Latents, Configure LoRA -> Train -> Save LoRA, every input safe
    (the model files are empty ones `world` plants: a refused prompt never runs); `changes` are {"node.input": value}."""
    graph = {
        "1": {"class_type": "Flux2LoraLoadDataset",
              "inputs": {"folder": "sec_ok", "caption_extensions": "txt", "trigger_word": "", "repeats": 1,
                         "recursive": True}},
        "2": {"class_type": "Flux2LoraLoadTrainingModel",
              "inputs": {"path": "sec_transformer.safetensors", "vae": "sec_vae.safetensors",
                         "text_encoder": "sec_text_encoder.safetensors", "tokenizer": "", "variant": "auto",
                         "dtype": "fp32", "text_conditioning": "comfyui"}},
        "3": {"class_type": "Flux2LoraCacheLatents",
              "inputs": {"dataset": ["1", 0], "model": ["2", 0], "resolution": "64", "buckets": True,
                         "max_aspect": 4.0, "flip": False, "cache_dir": ""}},
        "4": {"class_type": "Flux2LoraConfigureLora",
              "inputs": {"rank": 4, "alpha": 4.0, "targets": "attention", "optimizer": "adamw", "lr": 1e-3,
                         "lr_scheduler": "constant", "warmup_steps": 0, "steps": 2, "batch_size": 1,
                         "gradient_accumulation": 1, "timestep_sampling": "logit_normal", "caption_dropout": 0.0,
                         "gradient_checkpointing": "false", "seed": 1, "sample_every": 0, "sample_prompts": "",
                         "checkpoint_every": 0}},
        "5": {"class_type": "Flux2LoraTrain",
              "inputs": {"cache": ["3", 0], "lora_config": ["4", 0], "name": "sec_run", "resume": ""}},
        "6": {"class_type": "Flux2LoraSaveLora", "inputs": {"run": ["5", 2], "filename": "sec_lora"}},
    }
    for key, value in changes.items():
        node, name = key.split(".")
        graph[node]["inputs"][name] = value
    return graph


def dataset_graph(folder) -> dict:
    return {"1": {"class_type": "Flux2LoraLoadDataset",
                  "inputs": {"folder": folder, "caption_extensions": "txt", "trigger_word": "", "repeats": 1,
                             "recursive": True}},
            "7": {"class_type": "Flux2LoraValidateDataset",
                  "inputs": {"dataset": ["1", 0], "strict": False, "min_images": 1, "resolution": 256}}}


def refused_at_queue(comfyui, prompt: dict, node: str, name: str, *, by_list: bool = False) -> str:
    """POST /prompt must refuse `node` with an error naming input `name`; returns what the server said.
    `by_list`: the input is a combo, which ComfyUI refuses itself ("Value not in list") before the pack sees it.

    ComfyUI answers 400 when no output node is left valid. When another output is (Train, for an attack on Save
    LoRA), it answers 200 with the refused node in node_errors and runs only the rest: the node must not run."""
    status, body = comfyui.request("/prompt", {"prompt": prompt, "client_id": comfyui.client_id})
    text = body.decode(errors="replace")
    assert status in (200, 400), f"HTTP {status}: {text[:3000]}"
    errors = json.loads(body)["node_errors"][node]["errors"]
    details = " ".join(e.get("details", "") for e in errors)
    if by_list:
        assert any(e["type"] == "value_not_in_list" and e["extra_info"]["input_name"] == name for e in errors), errors
    else:
        assert f"`{name}`" in details, details
    assert "Traceback" not in details, details
    if status == 200:
        entry = comfyui.wait(json.loads(body)["prompt_id"])
        ran = {data.get("node") for event, data in entry["status"]["messages"] if event == "executed"}
        assert node not in entry.get("outputs", {}) and node not in ran, json.dumps(entry)[:3000]
        text += json.dumps(entry)
    return text


def execution_error(comfyui, prompt: dict) -> tuple[dict, str]:
    entry = comfyui.run(prompt)
    assert entry["status"]["status_str"] == "error", json.dumps(entry["status"], indent=1)[:4000]
    (error,) = [data for event, data in entry["status"]["messages"] if event == "execution_error"]
    return error, json.dumps(entry)


# --------------------------------------------------------------------------------------------- reads: datasets
def outside_dataset(world) -> str:
    return str(world["outside"] / "dataset")


def traversal_to_dataset(comfyui, world) -> str:
    return os.path.relpath(outside_dataset(world), comfyui.input_dir)  # "../../..../outside0/dataset"


@pytest.mark.parametrize("attack", ["parent", "traversal", "absolute", "link_out", "home"])
def test_a_dataset_folder_outside_input_is_refused(comfyui, world, attack):
    folder = {"parent": "../..", "traversal": traversal_to_dataset(comfyui, world),
              "absolute": outside_dataset(world), "link_out": "sec_door", "home": "~"}[attack]
    text = refused_at_queue(comfyui, dataset_graph(folder), "1", "folder")
    assert_nothing_leaked(comfyui, world, text)


def test_a_folder_coming_through_a_link_is_refused_when_the_node_runs(comfyui, world):
    prompt = dataset_graph(["9", 0])
    prompt["9"] = {"class_type": "PrimitiveString", "inputs": {"value": outside_dataset(world)}}
    error, text = execution_error(comfyui, prompt)
    assert error["node_type"] == "Flux2LoraLoadDataset" and "`folder`" in error["exception_message"]
    assert error["exception_type"].endswith("PathNotAllowedError")
    assert "Traceback" not in error["exception_message"]
    assert_nothing_leaked(comfyui, world, text)


def test_links_inside_a_dataset_that_lead_out_are_not_read(comfyui, world):
    entry = comfyui.run(dataset_graph("sec_mixed"))
    text = json.dumps(entry)
    assert entry["status"]["status_str"] == "success", text[:4000]
    (report,) = entry["outputs"]["7"]["text"]
    assert "2 found, 2 usable" in report, report          # own_1, own_2; not borrowed.png nor more/
    assert "borrowed.png" in report and "link" in report   # named by the link's own name, inside the dataset
    assert_nothing_leaked(comfyui, world, text)


def test_a_folder_becomes_readable_only_once_the_owner_allows_it(comfyui, world):
    shared = world["outside"] / "allowed" / "shared_set"
    settings = comfyui.base / ALLOWED_ROOTS
    refused_at_queue(comfyui, dataset_graph(str(shared)), "1", "folder")
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(f"# datasets kept on the shared drive\n{shared.parent}\n", encoding="utf-8")
    try:
        entry = comfyui.run(dataset_graph(str(shared)))   # read at execution time: no restart
        assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:4000]
        assert "1 found, 1 usable" in entry["outputs"]["7"]["text"][0]
        text = refused_at_queue(comfyui, dataset_graph(outside_dataset(world)), "1", "folder")  # not a sibling
        assert_nothing_leaked(comfyui, world, text)
        over_http = f"/userdata/..%2F__flux2_lora%2F{ALLOWED_ROOTS.name}"
        assert comfyui.request(over_http)[0] in (400, 403, 404)                   # not served over HTTP,
        assert comfyui.request(over_http, {"x": 1})[0] in (400, 403, 404, 405)     # nor writable
        assert settings.read_text(encoding="utf-8").endswith(f"{shared.parent}\n")
    finally:
        settings.unlink()
    refused_at_queue(comfyui, dataset_graph(str(shared)), "1", "folder")


# --------------------------------------------------------------------------------------------- reads: models
@pytest.mark.parametrize("name", ["path", "vae", "text_encoder", "tokenizer"])
@pytest.mark.parametrize("attack", ["absolute", "traversal"])
def test_a_model_path_outside_the_model_folders_is_refused(comfyui, world, name, attack):
    outside = world["outside"] / ("tokenizer" if name == "tokenizer" else "weights.safetensors")
    value = str(outside) if attack == "absolute" else "../../../../../../../.." + str(outside)
    text = refused_at_queue(comfyui, training_graph(**{f"2.{name}": value}), "2", name, by_list=name != "tokenizer")
    assert_nothing_leaked(comfyui, world, text)


def test_a_model_path_coming_through_a_link_is_refused_before_anything_loads(comfyui, world):
    prompt = training_graph(**{"2.tokenizer": ["9", 0]})
    prompt["9"] = {"class_type": "PrimitiveString", "inputs": {"value": str(world["outside"] / "tokenizer")}}
    error, text = execution_error(comfyui, prompt)
    assert error["node_type"] == "Flux2LoraLoadTrainingModel" and "`tokenizer`" in error["exception_message"]
    assert_nothing_leaked(comfyui, world, text)


# --------------------------------------------------------------------------------------------- writes
@pytest.mark.parametrize("key, attack", [
    ("3.cache_dir", "absolute"), ("3.cache_dir", "traversal"),
    ("5.name", "traversal"), ("5.name", "absolute"),
    ("5.resume", "traversal"), ("5.resume", "absolute"),
    ("6.filename", "traversal"), ("6.filename", "absolute"),
])
def test_nothing_is_written_outside_comfyuis_folders(comfyui, world, key, attack):
    target = world["outside"] / f"{WRITTEN}_{key.split('.')[1]}"
    value = str(target) if attack == "absolute" else "../../../../../../../.." + str(target)
    text = refused_at_queue(comfyui, training_graph(**{key: value}), key.split(".")[0], key.split(".")[1])
    assert_nothing_leaked(comfyui, world, text)


# --------------------------------------------------------------------------------------------- sockets
@pytest.mark.parametrize("node, name, value", [
    ("7", "dataset", "sec_ok"),
    ("7", "dataset", {"root": "/", "items": []}),
    ("3", "dataset", "sec_ok"),
    ("3", "model", {"path": "/etc"}),
    ("5", "cache", "anything"),
    ("5", "lora_config", {"output": {"dir": "/tmp"}, "cache": {"dir": "/tmp"}}),
    ("6", "run", {"run": "/tmp", "lora": "/etc/hostname"}),
])
def test_a_literal_where_a_socket_belongs_is_refused(comfyui, world, node, name, value):
    prompt = training_graph(**{f"{node}.{name}": value}) if node != "7" else dataset_graph("sec_ok")
    if node == "7":
        prompt["7"]["inputs"]["dataset"] = value
    text = refused_at_queue(comfyui, prompt, node, name)
    assert "must be linked from a" in text
    assert_nothing_leaked(comfyui, world, text)


def test_a_value_routed_through_an_any_type_node_is_checked_when_the_node_runs(comfyui, world):
    """ComfyUI lets a "*" output into any socket: the node checks what arrived, before anything loads."""
    prompt = training_graph(**{"5.cache": ["8", 0]})
    del prompt["6"]
    prompt["8"] = {"class_type": "ComfySwitchNode",
                   "inputs": {"switch": True, "on_true": {"model": {"path": "/etc"}}, "on_false": "x"}}
    error, text = execution_error(comfyui, prompt)  # queued: the switch's "*" output passes ComfyUI's link check
    assert error["node_type"] == "Flux2LoraTrain", error
    assert "input `cache` must be linked from a Cache Latents node; got a dict" in error["exception_message"]
    assert_nothing_leaked(comfyui, world, text)


# --------------------------------------------------------------------------------------------- everything said
def test_no_canary_name_in_the_history_or_the_log(comfyui, world):
    assert CANARY not in json.dumps(comfyui.get_json("/history"))
    assert CANARY not in comfyui.log()
    assert_nothing_leaked(comfyui, world)
