"""One real ComfyUI server per test session, with this pack installed the way users install it.

COMFYUI_DIR names a ComfyUI checkout whose Python dependencies are importable by the Python running
pytest (see comfyui_launcher.py for the torchvision/torchaudio shims a CPU-only torch needs). Without
it, or when that checkout cannot start here (no main.py, missing dependencies), every test in this
folder is reported as skipped with the reason. A server that starts but never answers is a failure,
with its log in the message.

The server gets a fresh base directory (custom_nodes, input, output, user, temp), the pack as a
symlink named like a user's clone (with a hyphen: "ComfyUI-Flux2-LoRA") beside the test-only tiny_loaders
nodes, a free port on 127.0.0.1,
an in-memory database, no API nodes and offline model hubs. It is stopped by its PID at the end.

Waits have no fixed length. A loaded 2-core machine can take minutes over work a laptop does in
seconds, so a wait fails only when the server has gone quiet: nothing on its websocket and nothing
new in its log for longer than the stall limit. That limit is measured, not guessed: STALL_STEPS
times the slowest step the server has reported so far (the gap between two progress messages of one
node: a training step, an encoded image), and never under STALL_FLOOR_S, which covers the work that
reports no progress (importing the engine, loading a model). A server that keeps working is waited
for; one that hangs fails within the limit, with its log.

Helpers are fixtures (tests cannot import a conftest under --import-mode=importlib).
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
LAUNCHER = HERE / "comfyui_launcher.py"
TINY_LOADERS = HERE / "tiny_loaders"
PACK_FOLDER = "ComfyUI-Flux2-LoRA"  # what users clone it as; the hyphen makes it no valid module name
STALL_FLOOR_S = 120  # silence allowed in any case: a first engine import or model load reports no progress
STALL_STEPS = 20     # silence allowed, in measured steps
REQUEST_TIMEOUT_S = 30
LOOPBACK = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 only, never via a proxy
# What ComfyUI's main.py imports before it can serve anything (requirements.txt, minus the optional).
SERVER_MODULES = ("torch", "torchvision", "torchaudio", "aiohttp", "yarl", "sqlalchemy", "alembic", "av",
                  "safetensors", "einops", "transformers", "scipy", "psutil", "PIL", "yaml", "blake3",
                  "simpleeval", "comfy_kitchen", "comfy_aimdo", "comfyui_frontend_package")


def _unavailable_reason() -> str | None:
    """Why no ComfyUI can be started here, or None when one can."""
    root = os.environ.get("COMFYUI_DIR", "").strip()
    if not root:
        return "COMFYUI_DIR is not set: point it at a ComfyUI checkout to run the real-server tests"
    if not (Path(root) / "main.py").is_file():
        return f"COMFYUI_DIR={root!r} is not a ComfyUI checkout (no main.py there)"
    missing = [name for name in SERVER_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        return (f"ComfyUI at {root} cannot start with {sys.executable}: missing {', '.join(missing)} "
                f"(pip install -r {root}/requirements.txt, keeping your torch)")
    return None


def pytest_collection_modifyitems(config, items):
    mine = [item for item in items if HERE in Path(item.path).resolve().parents]
    reason = _unavailable_reason() if mine else None
    if reason and os.environ.get("FLUX2_LORA_REQUIRE_COMFYUI"):  # set by test.sh once it installed ComfyUI's needs
        raise pytest.UsageError(f"the real-server tests must run here but cannot: {reason}")
    for item in mine:
        item.add_marker(pytest.mark.integration)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Activity:
    """The suite's clock: when the server last did something observable, and how long its steps take.

    A thread listens on the server's websocket (as the browser does, with the client id the prompts are
    queued under); the server's log growing counts as activity too (model loads, startup).
    """

    def __init__(self, log_path: Path):
        self.log_path, self.log_size = log_path, 0
        self.last = time.monotonic()
        self.slowest_step_s = 0.0
        self._progress: dict[tuple, tuple[int, float]] = {}  # (prompt, node) -> (value, when)

    def listen(self, ws_url: str) -> None:
        threading.Thread(target=self._listen, args=(ws_url,), name="comfyui-websocket", daemon=True).start()

    def _listen(self, ws_url: str) -> None:
        import asyncio

        import aiohttp  # a ComfyUI requirement: present wherever the server can start

        async def listen():
            async with aiohttp.ClientSession(trust_env=False) as session:
                async with session.ws_connect(ws_url, heartbeat=30) as ws:
                    async for message in ws:
                        self._seen(message.data if message.type == aiohttp.WSMsgType.TEXT else None)

        try:
            asyncio.run(listen())
        except (aiohttp.ClientError, OSError):
            pass  # the server stopped; the log still counts, and waits report a dead process themselves

    def _seen(self, text: str | None) -> None:
        now = time.monotonic()
        self.last = now
        message = json.loads(text) if text else {}
        if message.get("type") != "progress":
            return
        data = message["data"]
        key = (data.get("prompt_id"), data.get("node"))
        value, before = self._progress.get(key, (None, now))
        if value is not None and data["value"] > value:
            self.slowest_step_s = max(self.slowest_step_s, (now - before) / (data["value"] - value))
        self._progress[key] = (data["value"], now)

    @property
    def stall_limit_s(self) -> float:
        return max(STALL_FLOOR_S, STALL_STEPS * self.slowest_step_s)

    def quiet_for(self) -> float:
        """Seconds since the last sign of work (reading the log's size on the way)."""
        try:
            size = self.log_path.stat().st_size
        except OSError:
            size = self.log_size
        if size != self.log_size:
            self.log_size, self.last = size, time.monotonic()
        return time.monotonic() - self.last

    def stalled(self) -> bool:
        return self.quiet_for() > self.stall_limit_s

    def describe(self) -> str:
        return (f"no sign of work for {self.quiet_for():.0f} s (limit {self.stall_limit_s:.0f} s: "
                f"{STALL_STEPS} x the slowest measured step, {self.slowest_step_s:.2f} s, at least {STALL_FLOOR_S} s)")


@dataclass
class Server:
    """A running ComfyUI: its URL, folders and log, and small JSON helpers over its HTTP API."""

    url: str
    base: Path
    log_path: Path
    process: subprocess.Popen
    activity: Activity
    client_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def input_dir(self) -> Path:
        return self.base / "input"

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def request(self, path: str, data: dict | None = None) -> tuple[int, bytes]:
        body = None if data is None else json.dumps(data).encode()
        req = urllib.request.Request(self.url + path, data=body, headers={"Content-Type": "application/json"})
        try:
            with LOOPBACK.open(req, timeout=REQUEST_TIMEOUT_S) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def get_json(self, path: str):
        status, body = self.request(path)
        assert status == 200, f"GET {path}: HTTP {status}: {body[:2000]!r}"
        return json.loads(body)

    def queue(self, prompt: dict) -> str:
        """POST /prompt; returns the prompt id (fails the test on a validation error)."""
        status, body = self.request("/prompt", {"prompt": prompt, "client_id": self.client_id})
        assert status == 200, f"POST /prompt: HTTP {status}: {body.decode(errors='replace')[:4000]}"
        return json.loads(body)["prompt_id"]

    def wait_until(self, done, what: str):
        """Polls done() until it returns something truthy, for as long as the server keeps working."""
        while not (result := done()):
            assert self.process.poll() is None, f"ComfyUI exited while {what}:\n{self.log()[-6000:]}"
            if self.activity.stalled():
                raise AssertionError(f"{what}: {self.activity.describe()}:\n{self.log()[-6000:]}")
            time.sleep(0.1)
        return result

    def wait(self, prompt_id: str) -> dict:
        """The /history entry of a prompt once it has finished (successfully or not)."""
        def finished():
            entry = self.get_json(f"/history/{prompt_id}").get(prompt_id)
            status = (entry or {}).get("status", {})
            return entry if status.get("completed") is not None and status.get("status_str") else None

        return self.wait_until(finished, f"waiting for prompt {prompt_id}")

    def run(self, prompt: dict) -> dict:
        return self.wait(self.queue(prompt))


@pytest.fixture(scope="session")
def comfyui(tmp_path_factory) -> Server:
    base = tmp_path_factory.mktemp("comfyui-base")
    for folder in ("custom_nodes", "input", "output", "temp", "user"):
        (base / folder).mkdir()
    (base / "custom_nodes" / PACK_FOLDER).symlink_to(REPO, target_is_directory=True)
    # Test-only loaders for the tiny text encoders and VAE, which ComfyUI's stock loaders cannot size (see there).
    (base / "custom_nodes" / TINY_LOADERS.name).symlink_to(TINY_LOADERS, target_is_directory=True)
    port = _free_port()
    command = [sys.executable, "-u", str(LAUNCHER), os.environ["COMFYUI_DIR"], "--cpu", "--listen", "127.0.0.1",
               "--port", str(port), "--base-directory", str(base), "--disable-api-nodes",
               "--database-url", "sqlite:///:memory:", "--disable-auto-launch"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the repo root would shadow ComfyUI's nodes.py
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", DO_NOT_TRACK="1",
               PYTHONUNBUFFERED="1")
    log_path = base / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=base, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", base, log_path, process, Activity(log_path))
    try:
        _wait_until_ready(server)
        server.activity.listen(f"ws://127.0.0.1:{port}/ws?clientId={server.client_id}")
        yield server
    finally:
        _stop(process)


def _wait_until_ready(server: Server) -> None:
    """Until GET /system_stats answers; startup logs as it goes, so a silent log past the limit is a hang."""
    def answers() -> bool:
        if server.process.poll() is not None:
            pytest.fail(f"ComfyUI exited with code {server.process.returncode} before answering "
                        f"GET /system_stats; its log:\n{server.log()[-8000:]}", pytrace=False)
        try:
            with LOOPBACK.open(server.url + "/system_stats", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    while not answers():
        if server.activity.stalled():
            pytest.fail(f"ComfyUI did not answer GET /system_stats: {server.activity.describe()}; its log:\n"
                        f"{server.log()[-8000:]}", pytrace=False)
        time.sleep(0.25)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


@pytest.fixture(scope="session")
def object_info(comfyui) -> dict:
    return comfyui.get_json("/object_info")


@pytest.fixture
def make_dataset(comfyui):
    """make_dataset(name, count=3, size=(640, 512)) -> Path of <base>/input/<name> with captioned PNGs.

    Every image is seeded noise (no two alike, so no duplicate warnings) with a `.txt` caption.
    """
    from PIL import Image

    def make(name: str, count: int = 3, size=(640, 512)) -> Path:
        folder = comfyui.input_dir / name
        folder.mkdir(parents=True)
        rng = random.Random(name)
        for i in range(count):
            pixels = bytes(rng.getrandbits(8) for _ in range(size[0] * size[1] * 3 // 64))
            image = Image.frombytes("RGB", (size[0] // 8, size[1] // 8), pixels).resize(size, Image.NEAREST)
            image.save(folder / f"img_{i:02d}.png")
            (folder / f"img_{i:02d}.txt").write_text(f"a photo of subject number {i}", encoding="utf-8")
        return folder

    return make


@pytest.fixture(scope="session")
def to_api_prompt(object_info):
    """to_api_prompt(ui_workflow) -> API-format prompt, the way the frontend's "Queue" converts a graph.

    Each node's widgets_values are laid onto its widget inputs in /object_info's input_order (an INT/
    FLOAT with control_after_generate, e.g. a seed, carries one extra UI-only value); linked inputs
    become [source node id, source slot].
    """
    def widget_names(info: dict) -> list[tuple[str, bool]]:
        names = []
        for section in ("required", "optional"):
            for name in info.get("input_order", {}).get(section, []):
                kind, options = (info["input"][section][name] + [{}])[:2]
                is_widget = isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
                if is_widget:
                    names.append((name, bool(options.get("control_after_generate"))))
        return names

    def convert(workflow: dict) -> dict:
        links = {link[0]: link for link in workflow["links"]}
        prompt = {}
        for node in workflow["nodes"]:
            if node.get("mode", 0) in (2, 4) or node["type"] in ("Note", "MarkdownNote"):  # muted / bypassed /
                continue                                                                # frontend-only notes
            info = object_info[node["type"]]
            inputs, values = {}, list(node.get("widgets_values") or [])
            for name, has_control in widget_names(info):
                if values:
                    inputs[name] = values.pop(0)
                    if has_control and values:
                        values.pop(0)
            for socket_ in node.get("inputs", []):
                if socket_.get("link") is not None:
                    link = links[socket_["link"]]
                    inputs[socket_["name"]] = [str(link[1]), link[2]]
            prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
        return prompt

    return convert


def _shims() -> None:
    """Writing a tiny model here imports diffusers, hence torchvision: the launcher's shims on first import (a no-op
    where test.sh installed them already, or where torchvision matches torch, as on a user's machine)."""
    spec = importlib.util.spec_from_file_location("comfyui_launcher", LAUNCHER)
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    launcher.install_import_hook()


# The tiny FLUX.2 models under the standard file names the templates use (any files: only the names matter to a
# graph). The VAE is one architecture for both variants, so one file serves both.
STANDARD_FILES = {"klein": {"transformer": "flux-2-klein-base-4b.safetensors", "vae": "flux2-vae.safetensors",
                            "text_encoder": "qwen_3_4b.safetensors"},
                  "dev": {"transformer": "flux2_dev_fp8mixed.safetensors", "vae": "flux2-vae.safetensors",
                          "text_encoder": "mistral_3_small_flux2_fp8.safetensors"}}
MODEL_FOLDER = {"transformer": "diffusion_models", "vae": "vae", "text_encoder": "text_encoders"}


@pytest.fixture(scope="session")
def standard_models(comfyui, tmp_path_factory):
    """standard_models(dataset) -> the server's models/ folder holding tiny [klein] and [dev] under the standard
    names, with [klein]'s tiny tokenizer beside its text encoder (where the engine looks before ComfyUI's real
    one), and a two-image dataset input/<dataset> (written once)."""
    from flux2_lora_core.data.demo_data import write_demo_dataset
    from flux2_lora_core.models.tiny_models import COMFYUI_FILES, write_tiny_model

    _shims()
    models = comfyui.base / "models"
    for variant, names in STANDARD_FILES.items():
        written = tmp_path_factory.mktemp("standard") / variant
        write_tiny_model(written, variant=variant, fmt="comfyui")
        for part, name in names.items():
            target = models / MODEL_FOLDER[part] / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                (written / COMFYUI_FILES[variant][part]).rename(target)
        if variant == "klein":
            for file in (written / "tokenizer").iterdir():
                if not (models / "text_encoders" / file.name).exists():
                    file.rename(models / "text_encoders" / file.name)

    def with_dataset(name: str):
        if not (comfyui.input_dir / name).exists():
            write_demo_dataset(comfyui.input_dir / name, count=2, size=256)
        return models

    return with_dataset


@pytest.fixture(scope="session")
def tiny_klein(comfyui, tmp_path_factory):
    """The server's models/ holding the tiny [klein] as ComfyUI single files (tiny_models.COMFYUI_FILES names) and
    its tokenizer as models/tokenizer (written once)."""
    from flux2_lora_core.models.tiny_models import COMFYUI_FILES, write_tiny_model

    _shims()
    models = comfyui.base / "models"
    written = tmp_path_factory.mktemp("tiny") / "klein"
    write_tiny_model(written, variant="klein", fmt="comfyui")
    for part in ("transformer", "vae", "text_encoder"):
        target = models / COMFYUI_FILES["klein"][part]
        target.parent.mkdir(parents=True, exist_ok=True)
        (written / COMFYUI_FILES["klein"][part]).rename(target)
    (written / "tokenizer").rename(models / "tokenizer")
    return models


@pytest.fixture(scope="session")
def training_graph(tiny_klein):
    """training_graph(folder=, cache_dir=, name=, steps=, ...) -> the API graph Load Dataset (1) -> Load Training
    Model (2, the tiny [klein]) -> Cache Latents (3) -> Configure LoRA (4, `settings` are more of its inputs) ->
    Train (5) -> Save LoRA (6)."""
    from flux2_lora_core.models.tiny_models import COMFYUI_FILES

    files = {part: name.split("/", 1)[1] for part, name in COMFYUI_FILES["klein"].items() if "/" in name}

    def build(*, folder, cache_dir, name, steps, targets="attention_mlp", resume="", checkpoint_every=0, **settings):
        return {
            "1": {"class_type": "Flux2LoraLoadDataset",
                  "inputs": {"folder": folder, "caption_extensions": "txt", "trigger_word": "", "repeats": 1,
                             "recursive": True}},
            "2": {"class_type": "Flux2LoraLoadTrainingModel",
                  "inputs": {"path": files["transformer"], "vae": files["vae"], "text_encoder": files["text_encoder"],
                             "tokenizer": "tokenizer", "variant": "auto", "dtype": "fp32",
                             "text_conditioning": "comfyui"}},
            "3": {"class_type": "Flux2LoraCacheLatents",
                  "inputs": {"dataset": ["1", 0], "model": ["2", 0], "resolution": "64", "buckets": True,
                             "max_aspect": 4.0, "flip": False, "cache_dir": cache_dir}},
            "4": {"class_type": "Flux2LoraConfigureLora",
                  "inputs": {"rank": 4, "alpha": 4.0, "targets": targets, "optimizer": "adamw", "lr": 1e-3,
                             "lr_scheduler": "constant", "warmup_steps": 0, "steps": steps, "batch_size": 1,
                             "gradient_accumulation": 1, "timestep_sampling": "logit_normal", "caption_dropout": 0.0,
                             "gradient_checkpointing": "false", "seed": 1, "sample_every": 0, "sample_prompts": "",
                             "checkpoint_every": checkpoint_every, **settings}},
            "5": {"class_type": "Flux2LoraTrain",
                  "inputs": {"cache": ["3", 0], "lora_config": ["4", 0], "name": name, "resume": resume}},
            "6": {"class_type": "Flux2LoraSaveLora", "inputs": {"run": ["5", 2], "filename": name}},
        }

    return build
