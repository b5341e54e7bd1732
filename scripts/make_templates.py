"""Write the pack's example workflows (the Templates browser's "FLUX.2 LoRA" entries) with ComfyUI's own frontend.

Usage: python scripts/make_templates.py URL [OUT_DIR]

URL is a running ComfyUI with this pack installed, whose model folders hold files under the standard names (any
files: only the names matter). Each template below is an API-format graph plus a layout; the frontend in headless
Chromium (Debian's, through Playwright) loads it, lays it out, adds its groups and Note, and serializes it, so
widget order, links and node sizes are exactly what the frontend makes, never hand-written. The thumbnail
(<name>.jpg beside the JSON, which the Templates browser shows) is a picture of the graph. The browser shows a
template's file name as its title and description, so the names say what each one does.

Run it after changing a node's inputs; tests/integration/test_templates.py runs every template on tiny models.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

KLEIN = {"path": "flux-2-klein-base-4b.safetensors", "vae": "flux2-vae.safetensors",
         "text_encoder": "qwen_3_4b.safetensors"}
DEV = {"path": "flux2_dev_fp8mixed.safetensors", "vae": "flux2-vae.safetensors",
       "text_encoder": "mistral_3_small_flux2_fp8.safetensors"}


def dataset(x: int, y: int, folder: str = "my_dataset") -> dict:
    return {"1": ({"class_type": "Flux2LoraLoadDataset", "inputs": {"folder": folder, "trigger_word": ""}},
                  (x, y))}


def training(files: dict, *, lora: dict, x: int = 40, y: int = 80, resume: str = "", name: str = "my_lora",
             folder: str = "my_dataset") -> dict:
    """Load Dataset -> Validate Dataset -> Cache Latents <- Load Training Model (also into Validate); Configure LoRA;
    Train; Save LoRA; Plot Loss Graph."""
    return {
        **dataset(x, y, folder),
        # the model's tokenizer counts caption tokens as the cache build will: both skip the same files
        "8": ({"class_type": "Flux2LoraValidateDataset", "inputs": {"dataset": ["1", 0], "model": ["2", 0]}},
              (x, y + 240)),
        "2": ({"class_type": "Flux2LoraLoadTrainingModel", "inputs": dict(files)}, (x, y + 600)),
        "3": ({"class_type": "Flux2LoraCacheLatents",
               "inputs": {"dataset": ["8", 0], "model": ["2", 0], "resolution": "1024"}}, (x + 440, y)),
        "4": ({"class_type": "Flux2LoraConfigureLora", "inputs": dict(lora)}, (x + 440, y + 300)),
        "5": ({"class_type": "Flux2LoraTrain",
               "inputs": {"cache": ["3", 0], "lora_config": ["4", 0], "name": name, "resume": resume}},
              (x + 880, y)),
        "6": ({"class_type": "Flux2LoraSaveLora", "inputs": {"run": ["5", 2], "filename": name}}, (x + 1280, y)),
        "7": ({"class_type": "LossGraphNode", "inputs": {"loss": ["5", 1], "filename_prefix": "flux2_lora_loss"}},
              (x + 1280, y + 180)),
    }


def generation(files: dict, *, x: int, y: int, prompt: str, dev: bool) -> dict:
    """UNETLoader -> Load LoRA Model (Train's LoRA) -> the FLUX.2 sampling nodes -> VAEDecode -> SaveImage."""
    guider = ({"class_type": "CFGGuider", "inputs": {"model": ["21", 0], "positive": ["23", 0],
                                                     "negative": ["24", 0], "cfg": 4.0}}, (x + 880, y + 300))
    if dev:
        guider = ({"class_type": "BasicGuider", "inputs": {"model": ["21", 0], "conditioning": ["24", 0]}},
                  (x + 880, y + 300))
    return {
        "20": ({"class_type": "UNETLoader", "inputs": {"unet_name": files["path"], "weight_dtype": "default"}},
               (x, y)),
        "21": ({"class_type": "LoraModelLoader", "inputs": {"model": ["20", 0], "lora": ["5", 0],
                                                            "strength_model": 1.0, "bypass": False}}, (x + 440, y)),
        "22": ({"class_type": "CLIPLoader", "inputs": {"clip_name": files["text_encoder"], "type": "flux2",
                                                       "device": "default"}}, (x, y + 160)),
        "23": ({"class_type": "CLIPTextEncode", "inputs": {"clip": ["22", 0], "text": prompt}}, (x + 440, y + 160)),
        "24": (({"class_type": "FluxGuidance", "inputs": {"conditioning": ["23", 0], "guidance": 4.0}}, (x + 440, y + 420))
               if dev else ({"class_type": "CLIPTextEncode", "inputs": {"clip": ["22", 0], "text": ""}},
                            (x + 440, y + 420))),
        "25": ({"class_type": "VAELoader", "inputs": {"vae_name": files["vae"]}}, (x, y + 340)),
        "26": ({"class_type": "EmptyFlux2LatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
               (x + 880, y)),
        "27": ({"class_type": "Flux2Scheduler", "inputs": {"steps": 50 if not dev else 28, "width": 1024,
                                                           "height": 1024}}, (x + 880, y + 160)),
        "28": ({"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}, (x + 880, y + 460)),
        "29": ({"class_type": "RandomNoise", "inputs": {"noise_seed": 42}}, (x + 880, y + 560)),
        "30": guider,
        "31": ({"class_type": "SamplerCustomAdvanced",
                "inputs": {"noise": ["29", 0], "guider": ["30", 0], "sampler": ["28", 0], "sigmas": ["27", 0],
                           "latent_image": ["26", 0]}}, (x + 1280, y)),
        "32": ({"class_type": "VAEDecode", "inputs": {"samples": ["31", 0], "vae": ["25", 0]}}, (x + 1280, y + 220)),
        "33": ({"class_type": "SaveImage", "inputs": {"images": ["32", 0], "filename_prefix": "flux2_lora"}},
               (x + 1580, y)),
    }


def editing(files: dict, *, x: int, y: int, prompt: str) -> dict:
    """generation() for [klein] with a picture to edit: LoadImage -> ImageScaleToTotalPixels -> VAEEncode ->
    ReferenceLatent on the prompt and on the empty prompt (CFG compares like with like), the output sized like the
    picture (GetImageSize), as ComfyUI's own FLUX.2 edit workflows build it."""
    graph = generation(files, x=x, y=y, prompt=prompt, dev=False)
    graph["30"][0]["inputs"].update(positive=["43", 0], negative=["44", 0])
    graph["26"][0]["inputs"].update(width=["42", 0], height=["42", 1])
    graph["27"][0]["inputs"].update(width=["42", 0], height=["42", 1])
    return {**graph,
            "40": ({"class_type": "LoadImage", "inputs": {"image": "example.png"}}, (x, y + 560)),
            "41": ({"class_type": "ImageScaleToTotalPixels", "inputs": {"image": ["40", 0], "upscale_method": "lanczos",
                                                                       "megapixels": 1.0, "resolution_steps": 16}},
                   (x + 440, y + 560)),
            "42": ({"class_type": "GetImageSize", "inputs": {"image": ["41", 0]}}, (x + 440, y + 800)),
            "45": ({"class_type": "VAEEncode", "inputs": {"pixels": ["41", 0], "vae": ["25", 0]}}, (x + 660, y + 560)),
            "43": ({"class_type": "ReferenceLatent", "inputs": {"conditioning": ["23", 0], "latent": ["45", 0]}},
                   (x + 660, y + 160)),
            "44": ({"class_type": "ReferenceLatent", "inputs": {"conditioning": ["24", 0], "latent": ["45", 0]}},
                   (x + 660, y + 420))}


TEMPLATES = {
    "flux2_klein_train_a_lora_and_generate_with_it": {
        "graph": {**training(KLEIN, lora={"steps": 1500, "preset": "character"}),
                  **generation(KLEIN, x=40, y=1000, prompt="a photo of my_subject on a beach at sunset", dev=False)},
        "groups": [("1. Train a LoRA on input/my_dataset", ["1", "8", "2", "3", "4", "5", "6", "7"]),
                   ("2. Generate with it (the same graph, no reload)", [str(i) for i in range(20, 34)])],
        "note": ("Put your images (and .txt captions) in ComfyUI/input/my_dataset, check the model files on Load "
                 "Training Model (the standard FLUX.2 [klein] 4B base files in models/diffusion_models, vae and "
                 "text_encoders), set a trigger word, then Run. Train hands its LoRA straight to Load LoRA Model: "
                 "the image below uses it without reloading anything. Save LoRA copies it to models/loras for "
                 "other graphs."),
    },
    "flux2_klein_train_an_edit_lora_and_use_it": {
        "graph": {**training(KLEIN, lora={"steps": 1500}, folder="my_edit_dataset", name="my_edit_lora"),
                  **editing(KLEIN, x=40, y=1000, prompt="add a zxq hat to the person")},
        "groups": [("1. Train an edit LoRA on input/my_edit_dataset (targets + _ref references)",
                    ["1", "8", "2", "3", "4", "5", "6", "7"]),
                   ("2. Edit a picture with it (the same graph, no reload)",
                    [str(i) for i in [*range(20, 34), *range(40, 46)]])],
        "note": ("An edit LoRA learns an instruction: each training image (the result) has a reference image (the "
                 "picture before the edit) beside it, named like it with _ref (photo.png + photo_ref.png, or in a "
                 "references/ folder), and a caption that says the edit (\"add a zxq hat to the person\"). Put them "
                 "in ComfyUI/input/my_edit_dataset, check the model files on Load Training Model, then Run. The "
                 "second half edits the picture on Load Image with the LoRA Train made: its prompt says the edit."),
    },
    "flux2_dev_train_a_lora_low_memory": {
        "graph": training(DEV, lora={"steps": 1500, "preset": "character", "rank": 16, "batch_size": 1,
                                     "gradient_checkpointing": "true", "optimizer": "adamw8bit"}),
        "groups": [("Train a FLUX.2 [dev] LoRA with the least memory", ["1", "8", "2", "3", "4", "5", "6", "7"])],
        "note": ("FLUX.2 [dev] is large: this graph keeps memory low (fp8 transformer file, gradient checkpointing, "
                 "8-bit AdamW, batch 1), which fits a 48 GB GPU at 1024 px. On 24 GB set Load Training Model's "
                 "quantization to nf4 and blocks_to_swap to what its note says fits (10 at 1024 px); run it once to "
                 "see the note. Put your images in ComfyUI/input/my_dataset; the Mistral text-encoder file carries "
                 "its own tokenizer, so no tokenizer is needed."),
    },
    "flux2_resume_a_training_run": {
        "graph": training(KLEIN, lora={"steps": 3000}, resume="my_lora"),
        "groups": [("Resume output/flux2_lora/my_lora where it stopped", ["1", "8", "2", "3", "4", "5", "6", "7"])],
        "note": ("Continues the run named in Train's `resume` (a run folder in output/flux2_lora) from its last "
                 "checkpoint, with the same LoRA and optimizer state. Raise `steps` to train longer; what this graph "
                 "sets wins over the run's settings, and each change is logged."),
    },
    "flux2_check_a_dataset": {
        "graph": {**dataset(40, 80),
                  "2": ({"class_type": "Flux2LoraValidateDataset", "inputs": {"dataset": ["1", 0]}}, (480, 80))},
        "groups": [("Check input/my_dataset before training", ["1", "2"])],
        "note": ("Put your images (and .txt captions) in ComfyUI/input/my_dataset, then Run. The report lists every "
                 "problem at once: broken or tiny images, missing captions, duplicates, bucket sizes."),
    },
}

BUILD = """async ([name, graph, positions, groups, note]) => {
    await app.loadApiJson(graph, name);
    for (const [id, [x, y]] of Object.entries(positions)) {
        const node = app.graph.getNodeById(Number(id));
        node.pos = [x, y];
        node.setSize(node.computeSize());
    }
    const bounds = (ids) => {
        const nodes = ids.map((id) => app.graph.getNodeById(Number(id)));
        const left = Math.min(...nodes.map((n) => n.pos[0])) - 20, top = Math.min(...nodes.map((n) => n.pos[1])) - 60;
        const right = Math.max(...nodes.map((n) => n.pos[0] + n.size[0])) + 20;
        const bottom = Math.max(...nodes.map((n) => n.pos[1] + n.size[1])) + 20;
        return [left, top, right - left, bottom - top];
    };
    let below = -Infinity;  // each group starts under the one before: node heights are only known here
    for (const [, ids] of groups) {
        const [, top, , height] = bounds(ids);
        const shift = Math.max(0, below + 100 - top);
        for (const id of ids) app.graph.getNodeById(Number(id)).pos[1] += shift;
        below = top + shift + height;
    }
    for (const [title, ids] of groups) {
        const group = new LiteGraph.LGraphGroup(title);
        group.configure({title, bounding: bounds(ids), color: "#3f789e", font_size: 24});
        app.graph.add(group);
    }
    const box = bounds(Object.keys(positions));
    const memo = LiteGraph.createNode("Note");
    memo.pos = [box[0] + 20, box[1] - 220];
    memo.size = [Math.min(box[2], 900), 160];
    memo.widgets[0].value = note;
    memo.title = "Read me";
    app.graph.add(memo);
    app.canvas.ds.fitToBounds([box[0] - 40, box[1] - 260, box[2] + 80, box[3] + 300]);
    app.graph.setDirtyCanvas(true, true);
    return app.graph.serialize();
}"""


def main(argv: list[str]) -> None:
    if len(argv) not in (2, 3):
        raise SystemExit(__doc__)
    from PIL import Image
    from playwright.sync_api import sync_playwright

    url, out = argv[1], Path(argv[2] if len(argv) == 3 else Path(__file__).resolve().parents[1] / "example_workflows")
    out.mkdir(parents=True, exist_ok=True)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        for name, spec in TEMPLATES.items():
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.goto(url)
            page.wait_for_function("() => window.app?.graph && window.LiteGraph?.registered_node_types")
            graph = {i: node for i, (node, _) in spec["graph"].items()}
            positions = {i: pos for i, (_, pos) in spec["graph"].items()}
            workflow = page.evaluate(BUILD, [name, graph, positions, spec["groups"], spec["note"]])
            workflow.setdefault("extra", {})["info"] = {"description": spec["note"]}
            (out / f"{name}.json").write_text(json.dumps(workflow, indent=2) + "\n", encoding="utf-8")
            page.keyboard.press("Escape")  # the Templates dialog a new user gets on first load
            page.wait_for_timeout(500)
            picture = Image.open(io.BytesIO(page.locator("#graph-canvas").screenshot())).convert("RGB")
            picture.thumbnail((768, 480))
            picture.save(out / f"{name}.jpg", quality=85)
            page.close()
            print(f"wrote {out / name}.json and .jpg")
        browser.close()


if __name__ == "__main__":
    main(sys.argv)
