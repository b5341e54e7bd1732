"""The pack in a real browser: ComfyUI's own frontend in headless Chromium, driven by Playwright, as a user sees it.

What the HTTP tests cannot show: that the frontend loads the pack's web extensions without errors, and that what
they draw on the nodes is right. Chromium is Debian's (scripts/browser_env.sh installs it where it is missing);
Playwright drives it through its executable_path, so no browser is downloaded. Screenshots go to
test-artifacts/browser/ (FLUX2_LORA_TEST_ARTIFACTS overrides the folder) for a person to look at.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("FLUX2_LORA_TEST_ARTIFACTS") or REPO / "test-artifacts") / "browser"
CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
PACK_URL_PART = "ComfyUI-Flux2-LoRA"  # the pack's web files are served under /extensions/<pack folder>/
UI_TIMEOUT_MS = 120_000  # the frontend's first load on a loaded 2-core machine (waits on the server's work use the
                         # conftest's measured clock instead)


def _cannot(reason: str):
    """Skip where a browser cannot be had; in CI, where the test command installs one, that is a failure."""
    if os.environ.get("CI"):
        pytest.fail(f"the browser tests must run in CI: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _cannot("playwright is not installed: pip install playwright (the test command does)")
    executable = next((found for name in CHROMIUM if (found := shutil.which(name))), None)
    if executable is None:
        _cannot("no Chromium here: apt-get install chromium (scripts/browser_env.sh does, as root)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()


class Page:
    """One browser tab on the server's frontend, with every console error and page error it saw."""

    def __init__(self, browser, url: str):
        self.tab = browser.new_page(viewport={"width": 1600, "height": 1000})
        self.errors: list[str] = []
        self.tab.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.tab.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        self.tab.goto(url, timeout=UI_TIMEOUT_MS)
        self.tab.wait_for_function("() => window.app?.graph && window.LiteGraph?.registered_node_types",
                                   timeout=UI_TIMEOUT_MS)

    def js(self, script: str, arg=None):
        return self.tab.evaluate(script, arg)

    def pack_errors(self) -> list[str]:
        return [e for e in self.errors if PACK_URL_PART in e or "flux2" in e.lower()]

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.tab.screenshot(path=str(path))
        return path


@pytest.fixture
def page(browser, comfyui):
    tab = Page(browser, comfyui.url)
    yield tab
    tab.tab.close()


def test_the_frontend_loads_the_pack_with_no_errors(page):
    registered = page.js("() => app.extensions.map((e) => e.name)")
    assert "flux2_lora.NodeReports" in registered
    node_types = page.js("() => Object.keys(LiteGraph.registered_node_types)")
    assert {"Flux2LoraTrain", "Flux2LoraValidateDataset", "Flux2LoraLoadTrainingModel"} <= set(node_types)
    page.screenshot("frontend-loaded")
    assert page.pack_errors() == []


VALIDATE_GRAPH = {
    "1": {"class_type": "Flux2LoraLoadDataset",
          "inputs": {"folder": "browser_set", "caption_extensions": "txt", "trigger_word": "", "repeats": 1,
                     "recursive": True}},
    "2": {"class_type": "Flux2LoraValidateDataset",
          "inputs": {"dataset": ["1", 0], "strict": False, "min_images": 1, "resolution": 1024}},
}
REPORT = """() => {
    const node = app.graph.getNodeById(2);
    const widget = node?.widgets?.find((w) => w.name === "flux2_lora_report");
    return widget ? {text: widget.value, width: node.size[0]} : null;
}"""


def test_validate_dataset_report_shows_and_a_failure_replaces_it_without_widening_the_node(page, comfyui,
                                                                                            make_dataset):
    make_dataset("browser_set", count=2)
    page.js("async (graph) => { await app.loadApiJson(graph, 'validate.json'); }", VALIDATE_GRAPH)
    width = page.js("() => app.graph.getNodeById(2).size[0]")
    page.js("async () => { await app.queuePrompt(0); }")
    comfyui.wait_until(lambda: page.js(f"() => ({REPORT})()?.text?.includes('usable')"), "the report on the node")
    shown = page.js(REPORT)
    assert "NOT USABLE" not in shown["text"] and shown["width"] == width
    page.screenshot("validate-usable")

    page.js("() => { app.graph.getNodeById(2).widgets.find((w) => w.name === 'min_images').value = 50; }")
    page.js("async () => { await app.queuePrompt(0); }")
    comfyui.wait_until(lambda: page.js(f"() => ({REPORT})()?.text?.includes('not usable')"), "the failure's report")
    failed = page.js(REPORT)
    assert failed["text"].startswith("the dataset is not usable"), failed["text"][:500]  # the error, not the old report
    assert failed["width"] == width  # long report lines scroll inside the box
    page.screenshot("validate-failed")
    assert page.pack_errors() == []


TEMPLATE = "flux2_klein_train_a_lora_and_generate_with_it"
# In the page, as a user would edit it: the stock CLIPLoader/VAELoader become the test-only tiny loaders (stock
# ones cannot size the tiny models), and sizes and steps shrink to seconds. Nothing else of the template changes.
PREPARE = """([steps, size, dataset]) => {
    const byType = (type) => app.graph._nodes.filter((n) => n.type === type);
    const set = (node, name, value) => { const w = node.widgets?.find((w) => w.name === name); if (w) w.value = value; };
    const swap = (type, tiny, values) => {
        for (const old of byType(type)) {
            const node = LiteGraph.createNode(tiny);
            node.pos = [...old.pos];
            app.graph.add(node);
            for (const [name, value] of Object.entries(values(old))) set(node, name, value);
            for (const link of [...(old.outputs[0].links ?? [])].map((id) => app.graph.links[id] ?? app.graph.links.get?.(id))) {
                node.connect(0, app.graph.getNodeById(link.target_id), link.target_slot);
            }
            app.graph.remove(old);
        }
    };
    const value = (node, name) => node.widgets.find((w) => w.name === name).value;
    swap("CLIPLoader", "TinyFlux2CLIPLoader", (old) => ({clip_name: value(old, "clip_name"), tokenizer: "text_encoders"}));
    swap("VAELoader", "TinyFlux2VAELoader", (old) => ({vae_name: value(old, "vae_name")}));
    for (const n of byType("Flux2LoraLoadDataset")) set(n, "folder", dataset);
    for (const n of byType("Flux2LoraLoadTrainingModel")) set(n, "dtype", "fp32");
    for (const n of byType("Flux2LoraCacheLatents")) set(n, "resolution", String(size));
    for (const n of byType("Flux2LoraValidateDataset")) set(n, "resolution", 256);
    for (const n of byType("Flux2LoraConfigureLora")) {
        for (const [k, v] of Object.entries({steps, checkpoint_every: 0, sample_steps: 0, gradient_checkpointing: "false"})) set(n, k, v);
    }
    for (const n of [...byType("EmptyFlux2LatentImage"), ...byType("Flux2Scheduler")]) { set(n, "width", size); set(n, "height", size); }
    for (const n of byType("Flux2Scheduler")) set(n, "steps", 2);
}"""
TRAIN_PANEL = """() => {
    const node = app.graph._nodes.find((n) => n.type === "Flux2LoraTrain");
    const parts = node?.widgets?.find((w) => w.name === "flux2_lora_live")?.flux2;
    if (!parts) return null;
    const chart = parts.chart, ctx = chart.getContext("2d");
    const pixels = chart.width && chart.height ? ctx.getImageData(0, 0, chart.width, chart.height).data : [];
    let drawn = 0;
    for (let i = 3; i < pixels.length; i += 4) drawn += pixels[i] > 0;
    return {status: parts.status.textContent, summary: parts.summary.textContent,
            chart_shown: chart.style.display === "block", chart_pixels: drawn};
}"""


def test_train_and_generate_template_runs_in_the_browser_with_live_feedback(page, comfyui, standard_models):
    standard_models("browser_template_set")
    page.js("""async (name) => {
        const workflow = await (await fetch(`/api/workflow_templates/ComfyUI-Flux2-LoRA/${name}.json`)).json();
        await app.loadGraphData(workflow, true, true, name);
    }""", TEMPLATE)
    missing = page.js("() => app.graph._nodes.filter((n) => !LiteGraph.registered_node_types[n.type]).map((n) => n.type)")
    assert missing == []
    page.screenshot("train-and-generate-loaded")
    page.js(PREPARE, [4, 64, "browser_template_set"])
    page.js("async () => { await app.queuePrompt(0); }")
    comfyui.wait_until(lambda: (page.js(TRAIN_PANEL) or {}).get("summary", "").find("LoRA") >= 0,
                       "Train's summary on the node")  # as long as the server keeps working (conftest's clock)
    panel = page.js(TRAIN_PANEL)
    assert "step 4/4" in panel["status"] and "loss " in panel["status"], panel
    notes = page.js("""() => Object.fromEntries(app.graph._nodes
        .filter((n) => ["Flux2LoraConfigureLora", "Flux2LoraLoadTrainingModel"].includes(n.type))
        .map((n) => [n.type, n.widgets?.find((w) => w.name === "flux2_lora_report")?.value ?? null]))""")
    assert "gradient_checkpointing off / on" in notes["Flux2LoraConfigureLora"], notes     # the memory notes, on
    assert "512 px: off" in notes["Flux2LoraLoadTrainingModel"], notes                    # the nodes themselves
    assert panel["chart_shown"] and panel["chart_pixels"] > 50, panel  # drawn only from two points on
    def finished():
        queue = comfyui.get_json("/queue")
        if queue["queue_running"] or queue["queue_pending"]:
            return None
        return next(iter(comfyui.get_json("/history?max_items=1").values()), None)

    history = comfyui.wait_until(finished, "the template's run (queued by the page)")
    assert history["status"]["status_str"] == "success", json.dumps(history["status"], indent=1)[-4000:]
    saved = [i for out in history["outputs"].values() for i in out.get("images", []) if i.get("type") == "output"]
    assert saved, history["outputs"].keys()  # the generation half saved an image with the LoRA it trained
    page.js("""() => {  // the Train node at full size, for the person reading the screenshot
        const node = app.graph._nodes.find((n) => n.type === "Flux2LoraTrain");
        app.canvas.ds.scale = 1.2;
        app.canvas.centerOnNode(node);
        app.graph.setDirtyCanvas(true, true);
    }""")
    page.tab.wait_for_timeout(300)
    page.screenshot("train-and-generate-finished")
    assert page.pack_errors() == []
