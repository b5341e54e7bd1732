"""Every template in example_workflows/, as the Templates browser serves it, runs end to end on tiny models.

Each is converted to API format the way the frontend's Run converts a graph (conftest's to_api_prompt) and queued
on the real server. Only what cannot run here changes: the tiny FLUX.2 models lie under the standard file names the
templates use (so their model widgets stay as shipped), ComfyUI's stock CLIPLoader / VAELoader become the test-only
tiny loaders (they cannot size the tiny text encoders and VAE), sizes and step counts shrink to seconds, and 8-bit
AdamW becomes AdamW where bitsandbytes (the quantization extra) is not installed.
The generation half included: an image is saved with the LoRA the same graph trained.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest


pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PACK_FOLDER = "ComfyUI-Flux2-LoRA"
TEMPLATES = sorted(p.stem for p in (REPO / "example_workflows").glob("*.json"))
SIZE = 64  # pixels: 4 x 4 latent tokens
DATASET = "template_dataset"  # in input/, in place of the templates' my_dataset (which other tests create)
EDIT_DATASET = "template_edit_dataset"  # in place of my_edit_dataset: targets with _ref references
EDIT_INPUT = "template_edit_input.png"  # the picture the edit template's second half edits
# Node inputs set to what runs in seconds on a CPU; inputs a node does not have are left alone.
SHRINK = {"Flux2LoraConfigureLora": {"steps": 2, "checkpoint_every": 0, "sample_every": 0, "sample_steps": 0,
                                     "gradient_checkpointing": "false"},
          "Flux2LoraLoadTrainingModel": {"dtype": "fp32"},
          "Flux2LoraLoadDataset": {"folder": DATASET},
          "Flux2LoraCacheLatents": {"resolution": str(SIZE)},
          "Flux2LoraValidateDataset": {"resolution": 256},
          "EmptyFlux2LatentImage": {"width": SIZE, "height": SIZE},
          "Flux2Scheduler": {"steps": 2, "width": SIZE, "height": SIZE},
          "LoadImage": {"image": EDIT_INPUT},
          "ImageScaleToTotalPixels": {"megapixels": 0.01}}


def runnable(prompt: dict) -> dict:
    for node in prompt.values():
        inputs = node["inputs"]
        edit = node["class_type"] == "Flux2LoraLoadDataset" and inputs.get("folder") == "my_edit_dataset"
        if inputs.get("optimizer") == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
            inputs["optimizer"] = "adamw"  # the [dev] template's 8-bit AdamW needs the quantization extra
        for name, value in SHRINK.get(node["class_type"], {}).items():
            if name in inputs:
                inputs[name] = value
        if edit:
            inputs["folder"] = EDIT_DATASET
        if node["class_type"] == "CLIPLoader":
            node.update(class_type="TinyFlux2CLIPLoader",
                        inputs={"clip_name": inputs["clip_name"], "tokenizer": "text_encoders"})
        elif node["class_type"] == "VAELoader":
            node.update(class_type="TinyFlux2VAELoader", inputs={"vae_name": inputs["vae_name"]})
    return prompt


def test_the_templates_browser_lists_every_template(comfyui):
    assert set(comfyui.get_json("/workflow_templates")[PACK_FOLDER]) == set(TEMPLATES)
    for name in TEMPLATES:  # the browser's thumbnail for each
        status, body = comfyui.request(f"/api/workflow_templates/{PACK_FOLDER}/{name}.jpg")
        assert status == 200 and body[:2] == b"\xff\xd8", name


def edit_inputs(comfyui) -> None:
    """An edit dataset (each target with its _ref reference) and a picture to edit, in input/ (written once)."""
    import shutil

    from flux2_lora_core.data.demo_data import write_demo_dataset

    if not (comfyui.input_dir / EDIT_DATASET).exists():
        write_demo_dataset(comfyui.input_dir / EDIT_DATASET, count=2, size=256, edit=True)
        shutil.copy(comfyui.input_dir / EDIT_DATASET / "demo_00_ref.png", comfyui.input_dir / EDIT_INPUT)


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_runs_end_to_end_on_tiny_models(comfyui, standard_models, to_api_prompt, name):
    standard_models(DATASET)
    edit_inputs(comfyui)
    workflow = comfyui.get_json(f"/api/workflow_templates/{PACK_FOLDER}/{name}.json")
    notes = [n for n in workflow["nodes"] if n["type"] in ("Note", "MarkdownNote")]
    assert notes and workflow["groups"], f"{name}: a template says what to put where (a Note) and groups its parts"
    prompt = runnable(to_api_prompt(workflow))
    resume = next((n["inputs"]["resume"] for n in prompt.values()
                   if n["class_type"] == "Flux2LoraTrain" and n["inputs"].get("resume")), "")
    if resume:  # a run to continue: trained first by the same graph, under a name no other template uses
        first = json.loads(json.dumps(prompt))
        for graph, run in ((first, ""), (prompt, "resume_check")):
            for node in graph.values():
                if node["class_type"] == "Flux2LoraTrain":
                    node["inputs"].update(name="resume_check", resume=run)
                if node["class_type"] == "Flux2LoraConfigureLora" and graph is first:
                    node["inputs"]["steps"] = 1
        assert comfyui.run(first)["status"]["status_str"] == "success"
    entry = comfyui.run(prompt)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], indent=1)[-6000:]
    if "edit" in name:   # the edit LoRA's template: it edits with ReferenceLatent, after training on references
        assert any(node["class_type"] == "ReferenceLatent" for node in prompt.values())
        (cache,) = [i for i, node in prompt.items() if node["class_type"] == "Flux2LoraCacheLatents"]
        assert "edit dataset: 2 images with reference images" in entry["outputs"][cache]["text"][0]
    outputs = {i for i, node in prompt.items()
               if node["class_type"] in ("SaveImage", "Flux2LoraSaveLora", "Flux2LoraValidateDataset")}
    assert outputs <= set(entry["outputs"]), (outputs, list(entry["outputs"]))  # every output node ran
    for i in outputs:
        if prompt[i]["class_type"] == "SaveImage":
            (image,) = entry["outputs"][i]["images"]
            assert (comfyui.base / "output" / image["subfolder"] / image["filename"]).stat().st_size > 0


def test_stop_and_save_in_the_train_and_generate_template_still_generates(comfyui, standard_models, to_api_prompt):
    """A run stopped with Stop and save returns the LoRA trained so far, and the sampler downstream uses it."""
    standard_models(DATASET)
    name = "flux2_klein_train_a_lora_and_generate_with_it"
    prompt = runnable(to_api_prompt(comfyui.get_json(f"/api/workflow_templates/{PACK_FOLDER}/{name}.json")))
    for node in prompt.values():
        if node["class_type"] == "Flux2LoraConfigureLora":
            node["inputs"]["steps"] = 100000
    prompt_id = comfyui.queue(prompt)
    # The route answers 409 until this prompt's Train runs; a stop before the first step waits for that step.
    comfyui.wait_until(lambda: comfyui.request("/flux2_lora/stop", {"prompt_id": prompt_id})[0] == 200,
                       "waiting for Train to run")
    entry = comfyui.wait(prompt_id)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], indent=1)[-6000:]
    (train,) = [i for i, node in prompt.items() if node["class_type"] == "Flux2LoraTrain"]
    assert entry["outputs"][train]["text"][0].startswith("stopped at step ")
    (save,) = [i for i, node in prompt.items() if node["class_type"] == "SaveImage"]
    (image,) = entry["outputs"][save]["images"]
    assert (comfyui.base / "output" / image["subfolder"] / image["filename"]).stat().st_size > 0
