"""The pack in a real browser: ComfyUI's own frontend in headless Chromium, driven by Playwright, as a user sees it.

What the HTTP tests cannot show: that the frontend loads the pack's web extensions without errors, and that what
they draw on the nodes is right. Chromium is Debian's (scripts/browser_env.sh installs it where it is missing);
Playwright drives it through its executable_path, so no browser is downloaded. Screenshots go to
test-artifacts/browser/ (FLUX2_LORA_TEST_ARTIFACTS overrides the folder) for a person to look at.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("FLUX2_LORA_TEST_ARTIFACTS") or REPO / "test-artifacts") / "browser"
CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
PACK_URL_PART = "ComfyUI-Flux2-LoRA"  # the pack's web files are served under /extensions/<pack folder>/
UI_TIMEOUT_MS = 120_000  # the frontend's first load on a loaded 2-core machine; each wait ends as soon as it can


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
    assert "flux2_lora.ValidationReport" in registered
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


def test_validate_dataset_report_shows_and_a_failure_replaces_it_without_widening_the_node(page, make_dataset):
    make_dataset("browser_set", count=2)
    page.js("async (graph) => { await app.loadApiJson(graph, 'validate.json'); }", VALIDATE_GRAPH)
    width = page.js("() => app.graph.getNodeById(2).size[0]")
    page.js("async () => { await app.queuePrompt(0); }")
    page.tab.wait_for_function(f"() => ({REPORT})()?.text?.includes('usable')", timeout=UI_TIMEOUT_MS)
    shown = page.js(REPORT)
    assert "NOT USABLE" not in shown["text"] and shown["width"] == width
    page.screenshot("validate-usable")

    page.js("() => { app.graph.getNodeById(2).widgets.find((w) => w.name === 'min_images').value = 50; }")
    page.js("async () => { await app.queuePrompt(0); }")
    page.tab.wait_for_function(f"() => ({REPORT})()?.text?.includes('not usable')", timeout=UI_TIMEOUT_MS)
    failed = page.js(REPORT)
    assert failed["text"].startswith("the dataset is not usable"), failed["text"][:500]  # the error, not the old report
    assert failed["width"] == width  # long report lines scroll inside the box
    page.screenshot("validate-failed")
    assert page.pack_errors() == []
