"""The pack as a user's ComfyUI sees it: nodes listed, no import errors, templates and JS served."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.integration

PACK_FOLDER = "ComfyUI-Flux2-LoRA"
CATEGORY = "FLUX.2 LoRA"


def test_server_log_has_no_import_error_for_the_pack(comfyui, object_info):
    startup = comfyui.log().split("Starting server")[0]  # later tracebacks belong to failing prompts
    assert "Import times for custom nodes" in startup, startup[-4000:]
    pack_lines = [line for line in startup.splitlines() if PACK_FOLDER in line]
    assert pack_lines, startup[-4000:]
    assert not [line for line in pack_lines if "IMPORT FAILED" in line or "Cannot import" in line], startup[-6000:]
    assert "Error while calling comfy_entrypoint" not in startup, startup[-6000:]
    assert "Traceback" not in startup, startup[-6000:]
    assert {"Flux2LoraLoadDataset", "Flux2LoraValidateDataset"} <= object_info.keys()


def test_load_dataset_schema(object_info):
    info = object_info["Flux2LoraLoadDataset"]
    assert info["category"] == CATEGORY
    assert info["display_name"] == "Load Dataset (FLUX.2 LoRA)"
    assert info["input_order"]["required"] == ["folder", "caption_extensions", "trigger_word", "repeats", "recursive"]
    required = info["input"]["required"]
    assert [required[name][0] for name in info["input_order"]["required"]] == ["STRING", "STRING", "STRING", "INT", "BOOLEAN"]
    assert required["repeats"][1]["min"] == 1
    assert info["input_order"]["optional"] == ["references"]           # optional: older saved graphs still queue
    assert info["input"]["optional"]["references"][1]["default"] is True
    assert required["caption_extensions"][1]["default"] == "txt"
    assert info["output"] == ["FLUX2_DATASET"]
    assert info["output_name"] == ["dataset"]
    assert info["output_node"] is False


def test_validate_dataset_schema(object_info):
    info = object_info["Flux2LoraValidateDataset"]
    assert info["category"] == CATEGORY
    assert info["input_order"]["required"] == ["dataset", "strict", "min_images", "resolution"]
    required = info["input"]["required"]
    assert required["dataset"][0] == "FLUX2_DATASET"
    assert [required[name][0] for name in ("strict", "min_images", "resolution")] == ["BOOLEAN", "INT", "INT"]
    assert required["resolution"][1]["default"] == 1024
    assert info["output"] == ["FLUX2_DATASET", "STRING"]
    assert info["output_name"] == ["dataset", "report"]
    assert info["output_node"] is True  # runs (and shows its report) even with nothing connected


def test_example_workflow_is_a_template(comfyui):
    templates = comfyui.get_json("/workflow_templates")
    assert "flux2_check_a_dataset" in templates.get(PACK_FOLDER, []), templates
    workflow = comfyui.get_json(f"/api/workflow_templates/{PACK_FOLDER}/flux2_check_a_dataset.json")
    assert workflow["version"] == 0.4
    assert {node["type"] for node in workflow["nodes"]} == {"Flux2LoraLoadDataset", "Flux2LoraValidateDataset", "Note"}


def test_web_extension_is_served(comfyui):
    listed = [url for url in comfyui.get_json("/extensions") if url.endswith("/node_reports.js")]
    assert listed, "web/node_reports.js is not in GET /extensions"
    for url in listed:
        status, body = comfyui.request(url)
        assert status == 200, url
        assert b"flux2_lora.NodeReports" in body


def test_web_extension_survives_being_listed_twice(comfyui):
    # pyproject's [tool.comfy] web registers web/ under the project name and WEB_DIRECTORY under the
    # folder name; a git clone named unlike the project gets both URLs and the frontend imports both.
    # Registering the same extension name twice is rejected, so the file must register only once.
    listed = [url for url in comfyui.get_json("/extensions") if url.endswith("/node_reports.js")]
    assert len(listed) == 2, json.dumps(listed)  # the fixture clones as ComfyUI-Flux2-LoRA
    bodies = {comfyui.request(url)[1] for url in listed}
    assert len(bodies) == 1, "the two URLs serve different files"
    assert b"app.extensions" in bodies.pop(), "node_reports.js no longer guards against a second import"


@pytest.mark.parametrize("name", ["flux2_klein_train_a_lora_and_generate_with_it", "flux2_dev_train_a_lora_low_memory",
                                  "flux2_resume_a_training_run"])
def test_training_workflow_template_matches_the_node_schemas(comfyui, object_info, name):
    """Every node of a training template exists, and its widget values fit the node's widgets."""
    templates = comfyui.get_json("/workflow_templates")
    assert name in templates.get(PACK_FOLDER, []), templates
    workflow = comfyui.get_json(f"/api/workflow_templates/{PACK_FOLDER}/{name}.json")
    sockets = {"FLUX2_DATASET", "FLUX2_MODEL", "FLUX2_CACHE", "FLUX2_LORA_CONFIG", "FLUX2_RUN", "LORA_MODEL",
               "LOSS_MAP"}
    for node in (n for n in workflow["nodes"] if n["type"].startswith("Flux2Lora")):
        info = object_info[node["type"]]
        names = info["input_order"]["required"] + info["input_order"].get("optional", [])
        specs = {**info["input"]["required"], **info["input"].get("optional", {})}
        widgets = [n for n in names if not (isinstance(specs[n][0], str) and specs[n][0] in sockets)]
        assert len(node["widgets_values"]) == len(widgets), (node["type"], widgets, node["widgets_values"])
        linked = {i["name"] for i in node["inputs"] if not i.get("widget")}  # the frontend lists widgets there too
        assert linked == {n for n in names if n not in widgets}, node["type"]
    types = {node["type"] for node in workflow["nodes"]}
    assert {"Flux2LoraLoadTrainingModel", "Flux2LoraValidateDataset", "Flux2LoraCacheLatents", "Flux2LoraConfigureLora",
            "Flux2LoraTrain", "Flux2LoraSaveLora", "LossGraphNode", "Note"} <= types
