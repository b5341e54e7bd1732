"""A whole training graph queued through a real ComfyUI's API: dataset -> model -> cache -> config -> train -> save.

The model is a tiny FLUX.2 [klein] written in ComfyUI's single-file layout into the server's own
models/ folders, the dataset a generated one in its input/ folder, exactly where users put theirs.
"""

from __future__ import annotations

import json
import shutil
from functools import partial

import pytest
from safetensors import safe_open

from flux2_lora_core.checkpoints.checkpoint import find_checkpoints
from flux2_lora_core.data.demo_data import write_demo_dataset
from flux2_lora_core.models.tiny_models import COMFYUI_FILES

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def setup(tiny_klein, comfyui):
    write_demo_dataset(comfyui.input_dir / "ring", count=3, size=256)
    return tiny_klein, "training_tests"  # the cache's name: output/flux2_lora/cache/training_tests


@pytest.fixture(scope="module")
def graph(training_graph, setup):
    """The whole graph on input/ring; keyword arguments change it (more Configure LoRA inputs too)."""
    return partial(training_graph, folder="ring", cache_dir=setup[1], name="ring", steps=4, checkpoint_every=2)


def status(entry) -> str:
    return entry["status"]["status_str"]


def test_a_training_graph_trains_and_saves_a_lora_loraloader_lists(comfyui, setup, graph):
    models, cache_dir = setup
    entry = comfyui.run(graph())
    assert status(entry) == "success", json.dumps(entry["status"], indent=1)[-6000:]
    saved = models / "loras" / "ring.safetensors"
    with safe_open(saved, "pt") as f:
        assert any(k.startswith("diffusion_model.double_blocks.0.img_attn.qkv.") for k in f.keys())
        assert f.metadata()["ss_network_dim"] == "4"
    run = comfyui.base / "output" / "flux2_lora" / "ring"
    assert (run / "run.json").exists() and [p.name for p in find_checkpoints(run)][-1] == "step_000004"
    assert any((run.parent / "cache" / cache_dir).iterdir())             # the cache, by name, under output/
    assert "ring.safetensors" in comfyui.get_json("/object_info/LoraLoader")["LoraLoader"]["input"]["required"][
        "lora_name"][0]                                                   # listed at once, no restart

    again = comfyui.run(graph())          # re-queued: trains again, never overwrites
    assert status(again) == "success"
    assert (models / "loras" / "ring-2.safetensors").exists() and (run.parent / "ring-2" / "run.json").exists()


def test_configure_lora_continues_a_lora_picked_in_models_loras(comfyui, setup, graph):
    """init_from lists models/loras (the LoRA the first test saved) and the run starts from it, at its rank; a name
    that is not one of them is refused by ComfyUI's own validation, before anything runs."""
    models, _ = setup
    shutil.copy(models / "loras" / "ring.safetensors", models / "loras" / "ring_rank4.safetensors")
    options = comfyui.get_json("/object_info/Flux2LoraConfigureLora")["Flux2LoraConfigureLora"]["input"][
        "optional"]["init_from"][1]["options"]
    assert options[0] == "(none: a new LoRA)" and "ring_rank4.safetensors" in options
    entry = comfyui.run(graph(name="continued", steps=1, rank=8, init_from="ring_rank4.safetensors"))
    assert status(entry) == "success", json.dumps(entry["status"], indent=1)[-6000:]
    config = json.loads((comfyui.base / "output" / "flux2_lora" / "continued" / "run.json").read_text())["config"]
    assert config["lora"]["init_from"] == str(models / "loras" / "ring_rank4.safetensors")
    assert config["lora"]["rank"] == 4                                    # the file's rank, not the widget's 8
    for attack in ("../../etc/passwd", str(models / "loras" / "ring_rank4.safetensors")):
        status_code, body = comfyui.request("/prompt", {"prompt": graph(name="bad_init", init_from=attack)})
        assert status_code == 400 and "init_from" in body.decode(), body[:500]


def test_save_lora_saves_the_moving_average_when_the_run_kept_one(comfyui, setup, graph):
    models, _ = setup
    prompt = graph(name="averaged", steps=2, ema_decay=0.9)
    prompt["6"]["inputs"]["weights"] = "moving average"
    entry = comfyui.run(prompt)
    assert status(entry) == "success", json.dumps(entry["status"], indent=1)[-6000:]
    with safe_open(models / "loras" / "averaged.safetensors", "pt") as f:
        assert f.metadata()["flux2_lora.ema_decay"] == "0.9"
    plain = graph(name="not_averaged", steps=1)
    plain["6"]["inputs"]["weights"] = "moving average"
    entry = comfyui.run(plain)
    assert status(entry) == "error"
    (error,) = [data for name, data in entry["status"]["messages"] if name == "execution_error"]
    assert error["node_type"] == "Flux2LoraSaveLora" and "ema_decay" in error["exception_message"]


def test_configure_lora_trains_a_dora_that_loraloader_lists(comfyui, setup, graph):
    models, _ = setup
    entry = comfyui.run(graph(name="dora", steps=1, lora_type="dora"))
    assert status(entry) == "success", json.dumps(entry["status"], indent=1)[-6000:]
    with safe_open(models / "loras" / "dora.safetensors", "pt") as f:
        assert any(k.endswith(".dora_scale") for k in f.keys())
    assert "dora.safetensors" in comfyui.get_json("/object_info/LoraLoader")["LoraLoader"]["input"]["required"][
        "lora_name"][0]


def test_a_validation_folder_in_input_is_scored_and_one_outside_is_refused(comfyui, setup, graph):
    write_demo_dataset(comfyui.input_dir / "ring_held", count=2, size=256)
    entry = comfyui.run(graph(name="held", steps=2, validate_every=1, validation_folder="ring_held"))
    assert status(entry) == "success", json.dumps(entry["status"], indent=1)[-6000:]
    rows = (comfyui.base / "output" / "flux2_lora" / "held" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows if "validation_loss" in json.loads(r)] == [1, 2]
    entry = comfyui.run(graph(name="held_out", steps=1, validation_folder="../ring_held"))
    assert status(entry) == "error"
    (error,) = [data for name, data in entry["status"]["messages"] if name == "execution_error"]
    assert "validation_folder" in error["exception_message"], error["exception_message"]


def test_bad_settings_stop_the_graph_at_train_naming_the_setting(comfyui, setup, graph):
    entry = comfyui.run(graph(name="bad", targets="regex:("))
    assert status(entry) == "error"
    (error,) = [data for name, data in entry["status"]["messages"] if name == "execution_error"]
    assert error["node_type"] == "Flux2LoraTrain" and "lora.targets" in error["exception_message"]


def test_plot_loss_graph_draws_a_one_step_run(comfyui, setup, graph):
    """ComfyUI's own "Plot Loss Graph" divides by max - min: a one-step run (one loss) must still give it a range."""
    prompt = graph(name="one_step", steps=1, checkpoint_every=0)
    prompt["7"] = {"class_type": "LossGraphNode", "inputs": {"loss": ["5", 1], "filename_prefix": "one_step_loss"}}
    entry = comfyui.run(prompt)
    assert status(entry) == "success", json.dumps(entry["status"], indent=1)[-6000:]
    (graph_image,) = entry["outputs"]["7"]["images"]
    assert (comfyui.base / graph_image["type"] / graph_image["subfolder"] / graph_image["filename"]).is_file()


def test_cancel_writes_a_checkpoint_and_train_resumes_it(comfyui, setup, graph):
    models, cache_dir = setup
    prompt_id = comfyui.queue(graph(name="cancelled", steps=100000, checkpoint_every=0))
    metrics = comfyui.base / "output" / "flux2_lora" / "cancelled" / "metrics.jsonl"
    comfyui.wait_until(lambda: metrics.exists() and metrics.stat().st_size, "waiting for the first training step")
    comfyui.request("/interrupt", {})
    entry = comfyui.wait(prompt_id)
    assert status(entry) == "error" and any(name == "execution_interrupted"
                                            for name, _ in entry["status"]["messages"])
    (checkpoint,) = find_checkpoints(metrics.parent)               # only the one Cancel wrote
    stopped = int(checkpoint.name.split("_")[1])
    assert stopped == json.loads(metrics.read_text().splitlines()[-1])["step"]

    resumed = comfyui.run(graph(name="cancelled", steps=stopped + 2, resume="cancelled"))
    assert status(resumed) == "success", json.dumps(resumed["status"], indent=1)[-6000:]
    assert find_checkpoints(metrics.parent)[-1].name == f"step_{stopped + 2:06d}"


def test_configure_lora_settings_preset_and_sampling_off_reach_the_run(comfyui, setup, graph):
    """Optional Configure LoRA inputs land in run.json; the preset fills only widgets left at their default (rank 4
    and steps 2 are set here, caption_dropout 0.0 is the default); sample_steps 0 makes no sample at all."""
    entry = comfyui.run(graph(name="tuned", steps=2, checkpoint_every=0, preset="style", lora_dropout=0.1,
                              sample_steps=0, sample_every=1, sample_at_start=True, max_grad_norm=0.5,
                              timestep_shift="none", checkpoint_keep=1, mixed_precision="no"))
    assert status(entry) == "success", json.dumps(entry["status"], indent=1)[-6000:]
    run = comfyui.base / "output" / "flux2_lora" / "tuned"
    config = json.loads((run / "run.json").read_text())["config"]
    assert (config["lora"]["rank"], config["lora"]["alpha"], config["train"]["steps"]) == (4, 4.0, 2)
    assert config["train"]["caption_dropout"] == 0.1 and config["lora"]["dropout"] == 0.1    # style preset; widget
    assert (config["train"]["max_grad_norm"], config["train"]["timestep_shift"]) == (0.5, "none")
    assert (config["checkpoint"]["keep"], config["train"]["mixed_precision"]) == (1, "no")
    assert config["sample"]["steps"] == 0 and not (run / "samples").exists()


def test_model_pickers_list_the_model_folders_with_the_standard_files_as_defaults(comfyui, setup, to_api_prompt,
                                                                                   tmp_path):
    """Combos over models/diffusion_models + models/diffusers, models/vae and models/text_encoders, read afresh;
    the standard FLUX.2 names are the defaults once present, and the train template's values are those names."""
    models, _ = setup

    def pickers() -> dict:
        info = comfyui.get_json("/object_info/Flux2LoraLoadTrainingModel")["Flux2LoraLoadTrainingModel"]["input"]
        return {name: (spec[1]["options"], spec[1].get("default")) for name, spec in info["required"].items()
                if name in ("path", "vae", "text_encoder")}

    files = {key: COMFYUI_FILES["klein"][part].split("/", 1)[1]
             for key, part in (("path", "transformer"), ("vae", "vae"), ("text_encoder", "text_encoder"))}
    standard = [models / "diffusion_models" / "flux-2-klein-base-4b.safetensors",
                models / "vae" / "flux2-vae.safetensors", models / "text_encoders" / "qwen_3_4b.safetensors",
                models / "text_encoders" / "mistral_3_small_flux2_bf16.safetensors"]
    # Other tests of this server may have put real (tiny) models under these names: set them aside meanwhile.
    aside = {path: tmp_path / f"{path.parent.name}-{path.name}" for path in standard if path.exists()}
    for path, away in aside.items():
        path.rename(away)
    try:
        check_pickers(models, files, standard, pickers, comfyui, to_api_prompt)
    finally:
        for path, away in aside.items():
            away.rename(path)


def check_pickers(models, files, standard, pickers, comfyui, to_api_prompt):
    before = pickers()
    for key, name in files.items():
        assert name in before[key][0], (key, before[key])
    assert before["vae"][0][0] == before["text_encoder"][0][0] == "(from the diffusers folder)"
    assert before["path"][1] != "flux-2-klein-base-4b.safetensors"

    pipeline = models / "diffusers" / "tiny_pipeline"
    try:
        for path in standard:
            path.touch()              # empty: listed, never loaded
        pipeline.mkdir(parents=True)
        (pipeline / "model_index.json").write_text("{}", encoding="utf-8")
        (pipeline / "vae").mkdir()
        (pipeline / "vae" / "model_index.json").write_text("{}", encoding="utf-8")  # a part, not another model
        after = pickers()
        assert after["path"][1] == "flux-2-klein-base-4b.safetensors" and after["vae"][1] == "flux2-vae.safetensors"
        assert after["text_encoder"][1] == "qwen_3_4b.safetensors"          # [klein]'s, for the [klein] default
        assert "tiny_pipeline" in after["path"][0] and "tiny_pipeline/vae" not in after["path"][0]

        template = comfyui.get_json(
            "/api/workflow_templates/ComfyUI-Flux2-LoRA/flux2_klein_train_a_lora_and_generate_with_it.json")
        (node,) = [n for n in template["nodes"] if n["type"] == "Flux2LoraLoadTrainingModel"]
        prompt = to_api_prompt(template)                   # as the frontend converts it, in input_order
        assert {k: prompt[str(node["id"])]["inputs"][k] for k in after} == {k: d for k, (_, d) in after.items()}
        (configure,) = [n for n in prompt.values() if n["class_type"] == "Flux2LoraConfigureLora"]
        assert (configure["inputs"]["steps"], configure["inputs"]["sample_every"]) == (1500, 0)
        assert (configure["inputs"]["preset"], configure["inputs"]["compile"]) == ("character", False)
    finally:
        for path in standard:
            path.unlink(missing_ok=True)
        shutil.rmtree(pipeline, ignore_errors=True)
