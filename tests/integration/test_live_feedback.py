"""What the browser sees of a training run, through a real ComfyUI: the pack's own websocket events (phases, steps,
losses, samples, the summary, at a few events a second), and "Stop and save", which ends a long run early and
still returns its LoRA to the rest of the graph.

A listener connects to /ws as the browser does, under a client id of its own, and queues the prompts under it: the
events go to that client. Whatever it receives also counts as the suite's sign of work (conftest's Activity).
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
import uuid
from functools import partial

import pytest

from flux2_lora_core.checkpoints.checkpoint import find_checkpoints
from flux2_lora_core.data.demo_data import write_demo_dataset

pytestmark = pytest.mark.integration

EVENT = "flux2_lora.progress"
TRAIN, CACHE, SAVE = "5", "3", "6"   # node ids of graph()


class Listener:
    """The browser's side of the websocket, for one client id: every message with its arrival time."""

    def __init__(self, comfyui):
        self.comfyui, self.client_id = comfyui, uuid.uuid4().hex
        self.messages: list[tuple[float, dict]] = []
        self.connected = threading.Event()
        ws_url = comfyui.url.replace("http://", "ws://") + f"/ws?clientId={self.client_id}"
        threading.Thread(target=asyncio.run, args=(self._listen(ws_url),), daemon=True).start()
        assert self.connected.wait(30), "the websocket did not connect"

    async def _listen(self, ws_url):
        import aiohttp

        try:
            async with aiohttp.ClientSession(trust_env=False) as session:
                async with session.ws_connect(ws_url, heartbeat=30) as ws:
                    self.connected.set()
                    async for message in ws:
                        if message.type == aiohttp.WSMsgType.TEXT:
                            self.messages.append((time.monotonic(), json.loads(message.data)))
                            self.comfyui.activity._seen(message.data)   # the suite's clock: work is going on
        except (aiohttp.ClientError, OSError):
            pass

    def queue(self, prompt: dict) -> str:
        status, body = self.comfyui.request("/prompt", {"prompt": prompt, "client_id": self.client_id})
        assert status == 200, body.decode(errors="replace")[:4000]
        return json.loads(body)["prompt_id"]

    def events(self, prompt_id: str, node: str) -> list[tuple[float, dict]]:
        return [(t, m["data"]) for t, m in list(self.messages)
                if m.get("type") == EVENT and m["data"].get("prompt_id") == prompt_id and m["data"]["node"] == node]


@pytest.fixture(scope="module")
def setup(tiny_klein, comfyui):
    if not (comfyui.input_dir / "live").exists():
        write_demo_dataset(comfyui.input_dir / "live", count=3, size=256)
    return tiny_klein, Listener(comfyui)


@pytest.fixture(scope="module")
def graph(training_graph, setup):
    return partial(training_graph, folder="live", cache_dir="live_feedback", targets="attention")


def first_appearances(values) -> list:
    return [v for i, v in enumerate(values) if v not in values[:i]]


def busiest_second(times: list[float]) -> int:
    """The most events inside any one-second window."""
    return max((sum(1 for u in times if t <= u < t + 1) for t in times), default=0)


def test_training_sends_live_events_with_phases_losses_samples_and_a_summary(comfyui, setup, graph, record_property):
    models, listener = setup
    steps = 16
    prompt_id = listener.queue(graph(name="live", steps=steps, checkpoint_every=4, validation_split=0.34,
                                     validate_every=8))   # 1 of the 3 images held out, scored at every checkpoint
    entry = comfyui.wait(prompt_id)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], indent=1)[-6000:]

    timed = listener.events(prompt_id, TRAIN)
    train = [e for _, e in timed]
    assert {e["kind"] for e in train} == {"train"}
    assert first_appearances([e["phase"] for e in train]) == ["caching", "loading", "training", "saving",
                                                              "sampling", "done"]
    steps_events = [e for e in train if e["phase"] == "training" and "step" in e]   # not the phase's announcement
    stepped = [e["step"] for e in steps_events]
    assert stepped == sorted(stepped) and stepped[-1] == steps and stepped[0] >= 1
    for e in steps_events:
        assert e["total"] == e["steps"] == steps and e["lr"] == pytest.approx(1e-3)
        assert e["seconds_per_step"] > 0 and e["eta_seconds"] >= 0 and e["peak_memory_mb"] > 0
    held = [point for e in train for point in e["validation"]]
    assert [step for step, _ in held] == [4, 8, 12, 16] and all(v > 0 for _, v in held)   # checkpoints: each 4
    assert train[-1]["validation_loss"] == held[-1][1]
    losses = [point for e in train for point in e["losses"]]
    assert [s for s, _ in losses] == list(range(1, steps + 1))          # every step's loss, once, in order
    assert all(math.isfinite(v) for _, v in losses)
    assert math.isfinite(train[-1]["loss"]) and math.isfinite(train[-1]["smoothed_loss"])

    samples = train[-1]["samples"]
    assert [s["prompt"] for s in samples] == [0, 1] and all(s["step"] == steps for s in samples)
    for s in samples:
        status, body = comfyui.request(f"/view?filename={s['filename']}&subfolder={s['subfolder']}&type={s['type']}")
        assert status == 200 and body[:4] == b"\x89PNG", s

    final = train[-1]
    assert final["phase"] == "done" and (final["run"], final["lora"], final["step"]) == ("live", "live.safetensors",
                                                                                         steps)
    assert final["summary"].startswith(f"{steps} steps\nLoRA: live.safetensors\nrun folder: output/flux2_lora/live")
    handoff = "on a cluster (same files): torchrun --nproc-per-node N -m flux2_lora_core train --config " \
              "output/flux2_lora/live/config.yaml output.dir=runs"
    assert handoff in final["summary"], final["summary"]
    run = comfyui.base / "output" / "flux2_lora" / "live"      # the config it names is this run's, loadable as is
    from flux2_lora_core.config import load_config

    assert load_config(run / "config.yaml", []).to_dict() == json.loads((run / "run.json").read_text())["config"]
    assert str(comfyui.base) not in json.dumps(train)                     # the browser never gets a server path
    assert entry["outputs"][TRAIN]["text"] == [final["summary"]]
    assert entry["outputs"][SAVE]["text"] == ["saved as live.safetensors: Load LoRA lists it under that name"]
    (note,) = entry["outputs"]["2"]["text"]   # Load Training Model's prediction for the picked files, before loading
    assert "512 px: off" in note and "1024 px: off" in note and "quantization=none" in note, note

    cache = [e for _, e in listener.events(prompt_id, CACHE)]
    assert first_appearances([(e["phase"], e["detail"]) for e in cache])[:3] == [
        ("caching", None), ("caching", "latents"), ("caching", "captions")]
    assert cache[-1]["phase"] == "done" and cache[-1]["images_encoded"] == 3 and "3 encoded" in cache[-1]["summary"]

    # The rate: step events are throttled to MIN_INTERVAL_S (0.25 s) apart; phase changes, the last step and the
    # final state always go out. Arrival times can bunch a little, hence one event of slack over 4 a second.
    training_times = [t for t, e in timed if e["phase"] == "training"][1:-1]   # not the forced announcement, last
    duration = max(timed[-1][0] - timed[0][0], 1e-9)
    rate, busiest = len(timed) / duration, busiest_second(training_times)
    record_property("train_events", len(timed))
    record_property("train_events_per_second", round(rate, 2))
    record_property("busiest_second_of_steps", busiest)
    print(f"\nTrain: {len(timed)} events over {duration:.1f} s ({rate:.2f}/s) for {steps} steps; "
          f"busiest second of throttled step events: {busiest}")
    assert busiest <= 5


def test_stop_and_save_returns_the_lora_so_far_and_the_graph_goes_on(comfyui, setup, graph):
    models, listener = setup
    prompt_id = listener.queue(graph(name="stopped", steps=100000))
    comfyui.wait_until(lambda: any(e.get("step", 0) >= 1 for _, e in listener.events(prompt_id, TRAIN)),
                       "waiting for the first training step")
    status, body = comfyui.request("/flux2_lora/stop", {"prompt_id": prompt_id, "node_id": TRAIN})
    assert status == 200 and json.loads(body)["stopping"] is True and str(comfyui.base).encode() not in body
    entry = comfyui.wait(prompt_id)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], indent=1)[-6000:]

    final = listener.events(prompt_id, TRAIN)[-1][1]
    stopped = final["step"]
    assert final["phase"] == "stopped" and 1 <= stopped < 100000
    assert final["summary"].startswith(f"stopped at step {stopped}; checkpoint saved; resume: stopped")
    run = comfyui.base / "output" / "flux2_lora" / "stopped"
    assert [p.name for p in find_checkpoints(run)] == [f"step_{stopped:06d}"]
    assert (models / "loras" / "stopped.safetensors").is_file()          # Save LoRA ran on the returned LoRA
    assert entry["outputs"][TRAIN]["text"] == [final["summary"]]

    again, _ = comfyui.request("/flux2_lora/stop", {"prompt_id": prompt_id})
    assert again == 409                                                  # nothing runs for it any more


@pytest.mark.parametrize("body", [b"not json", b"[1]", b'{"prompt_id": 5}', b'{"prompt_id": ""}',
                                  b'{"prompt_id": "x", "path": "/etc"}', b'{"prompt_id": "x", "node_id": 3}'])
def test_the_stop_route_refuses_a_malformed_request(comfyui, body):
    import urllib.error
    import urllib.request

    request = urllib.request.Request(comfyui.url + "/flux2_lora/stop", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=30)
    assert refused.value.code == 400 and "error" in json.loads(refused.value.read())


def test_cancel_says_where_the_checkpoint_is_and_ends_the_prompt_as_interrupted(comfyui, setup, graph):
    _, listener = setup
    prompt_id = listener.queue(graph(name="cancelled_live", steps=100000))
    comfyui.wait_until(lambda: any(e.get("step", 0) >= 1 for _, e in listener.events(prompt_id, TRAIN)),
                       "waiting for the first training step")
    comfyui.request("/interrupt", {})
    entry = comfyui.wait(prompt_id)
    assert entry["status"]["status_str"] == "error" and any(name == "execution_interrupted"
                                                            for name, _ in entry["status"]["messages"])
    final = listener.events(prompt_id, TRAIN)[-1][1]
    assert final["phase"] == "cancelled"
    assert final["summary"].startswith(f"stopped at step {final['step']}; checkpoint saved; resume: cancelled_live")
    assert [p.name for p in find_checkpoints(comfyui.base / "output" / "flux2_lora" / "cancelled_live")] == [
        f"step_{final['step']:06d}"]
