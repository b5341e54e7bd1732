"""Load Dataset -> Validate Dataset queued through ComfyUI's HTTP API, as the frontend queues them."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.integration

def dataset_graph(folder: str, *, min_images: int = 1, strict: bool = False) -> dict:
    return {
        "1": {"class_type": "Flux2LoraLoadDataset",
              "inputs": {"folder": folder, "caption_extensions": "txt", "trigger_word": "", "repeats": 1,
                         "recursive": True}},
        "2": {"class_type": "Flux2LoraValidateDataset",
              "inputs": {"dataset": ["1", 0], "strict": strict, "min_images": min_images, "resolution": 1024}},
    }


def messages(entry: dict, event: str) -> list[dict]:
    return [data for name, data in entry["status"]["messages"] if name == event]


def error_of(entry: dict) -> dict:
    assert entry["status"]["status_str"] == "error", json.dumps(entry["status"], indent=1)[:4000]
    (error,) = messages(entry, "execution_error")
    return error


def report_of(entry: dict) -> str:
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], indent=1)[:6000]
    (text,) = entry["outputs"]["2"]["text"]
    return text


def test_valid_dataset_reports_usable(comfyui, make_dataset):
    make_dataset("valid_set", count=3)
    report = report_of(comfyui.run(dataset_graph("valid_set")))
    assert "usable" in report and "NOT USABLE" not in report
    assert "3 found, 3 usable" in report


def test_a_corrupt_image_is_skipped_and_named_unless_strict(comfyui, make_dataset):
    folder = make_dataset("corrupt_set", count=2)
    (folder / "broken_photo.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    (folder / "broken_photo.txt").write_text("a broken photo", encoding="utf-8")
    report = report_of(comfyui.run(dataset_graph("corrupt_set")))  # Cache Latents and Train skip the same file
    assert "usable: 2 of 3 images; this one will be skipped" in report and "broken_photo.png" in report
    error = error_of(comfyui.run(dataset_graph("corrupt_set", strict=True)))
    assert error["node_type"] == "Flux2LoraValidateDataset"
    assert "broken_photo.png" in error["exception_message"]
    assert "NOT USABLE" in error["exception_message"]


def test_an_edit_datasets_references_are_checked_with_their_targets_and_can_be_turned_off(comfyui):
    """Load Dataset's `references` (optional: graphs without it queue as before) attaches a_ref.png to a.png; a
    broken reference skips its target; off, the targets are checked alone and the reference files stay out."""
    from flux2_lora_core.data.demo_data import write_demo_dataset

    folder = write_demo_dataset(comfyui.input_dir / "edit_set", count=3, size=256, edit=True)
    (folder / "demo_02_ref.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    report = report_of(comfyui.run(dataset_graph("edit_set")))
    assert "3 of 3 images have reference images (3 files)" in report
    assert "usable: 2 of 3 images; this one will be skipped" in report and "demo_02_ref.png" in report
    graph = dataset_graph("edit_set")
    graph["1"]["inputs"]["references"] = False
    report = report_of(comfyui.run(graph))
    assert "3 found, 3 usable" in report and "have reference images" not in report
    assert "3 images are reference images by their names" in report


def test_too_few_images_stops_the_graph(comfyui, make_dataset):
    make_dataset("small_set", count=2)
    error = error_of(comfyui.run(dataset_graph("small_set", min_images=5)))
    assert error["node_type"] == "Flux2LoraValidateDataset"
    assert "too_few_images" in error["exception_message"], error["exception_message"]


@pytest.mark.parametrize("folder, expected", [("no_such_dataset", "'no_such_dataset' not found in ComfyUI's input"),
                                              ("  ", "`folder` is empty")])
def test_missing_folder_is_a_clear_error(comfyui, folder, expected):
    error = error_of(comfyui.run(dataset_graph(folder)))
    message = error["exception_message"].strip()
    assert error["node_type"] == "Flux2LoraLoadDataset"
    assert error["exception_type"].endswith("DatasetError")
    assert expected in message and "`folder`" in message, message  # names the widget that fixes it
    assert "Traceback" not in message and 'File "' not in message, message


def test_example_workflow_runs(comfyui, make_dataset, to_api_prompt):
    make_dataset("my_dataset", count=2)
    workflow = comfyui.get_json("/api/workflow_templates/ComfyUI-Flux2-LoRA/flux2_check_a_dataset.json")
    prompt = to_api_prompt(workflow)
    assert prompt["1"]["inputs"]["folder"] == "my_dataset"
    entry = comfyui.run(prompt)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], indent=1)[:6000]
    (node_id,) = [nid for nid, node in prompt.items() if node["class_type"] == "Flux2LoraValidateDataset"]
    assert "2 found, 2 usable" in entry["outputs"][node_id]["text"][0]


def test_requeue_reloads_the_dataset_only_when_its_files_change(comfyui, make_dataset):
    folder = make_dataset("edited_set", count=2)
    graph = dataset_graph("edited_set")

    def rerun_nodes() -> list[str]:
        entry = comfyui.run(graph)
        report_of(entry)
        cached = messages(entry, "execution_cached")[0]["nodes"]
        return sorted(set(graph) - set(cached))

    assert rerun_nodes() == ["1", "2"]
    assert rerun_nodes() == []  # identical graph, untouched folder: served from ComfyUI's cache

    (folder / "img_00.txt").write_text("a photo of an edited caption", encoding="utf-8")
    assert rerun_nodes() == ["1", "2"]  # Load Dataset's fingerprint changed, so both run again
    assert rerun_nodes() == []

    (folder / "img_01.png").write_bytes((folder / "img_00.png").read_bytes())  # a replaced image
    assert rerun_nodes() == ["1", "2"]


def test_error_payload_stays_small_for_a_large_dataset(comfyui, make_dataset):
    make_dataset("large_set", count=60, size=(64, 64))  # too small for training: Validate Dataset fails
    error = error_of(comfyui.run(dataset_graph("large_set")))
    (shown,) = error["current_inputs"]["dataset"]
    assert len(shown) < 1000, f"{len(shown)} characters: {shown[:300]}..."
