"""The pack's own websocket events and its stop route: what the browser sees of a run beyond ComfyUI's bar.

ComfyUI forwards a node's progress only as a fraction, and only when it moved 0.5%: loss, ETA, phases and samples
need events of their own (`flux2_lora.progress`, sent like ComfyUI's "progress" to the prompt's client). They are
throttled here to a few a second, so a fast run cannot flood the browser; the first event, a phase change and the
final state always go out, and each event carries the whole current state, so a skipped one loses nothing.

The stop route (POST /flux2_lora/stop) is the "Stop and save" button's way in: it marks the running Train of a
prompt, whose callbacks see the mark at the next step boundary. It answers with no path and changes nothing else.
Nothing here imports the engine or torch: the route is registered when ComfyUI loads the pack.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import folder_paths
from aiohttp import web
from comfy_execution.utils import get_executing_context
from server import PromptServer

EVENT = "flux2_lora.progress"
STOP_ROUTE = "/flux2_lora/stop"
MIN_INTERVAL_S = 0.25        # at most ~4 throttled events a second per node
MAX_ID_LENGTH = 128          # prompt ids are uuids, node ids short ("12", "5:3" in a subgraph)
MAX_BODY_BYTES = 4096

log = logging.getLogger(__name__)


class NodeEvents:
    """Events about the node that is executing now (its id and prompt read from ComfyUI's execution context, as
    ComfyUI's own progress hook does), throttled to MIN_INTERVAL_S unless `force`d."""

    def __init__(self, kind: str):
        server = PromptServer.instance
        context = get_executing_context()
        self.prompt_id = context.prompt_id if context else server.last_prompt_id
        self.node_id = context.node_id if context else server.last_node_id
        self.kind, self.last_sent, self.sent = kind, 0.0, 0

    def send(self, state: dict, *, force: bool = False) -> bool:
        """Sends `state` unless one went out less than MIN_INTERVAL_S ago; returns whether it was sent."""
        now = time.monotonic()
        if not force and now - self.last_sent < MIN_INTERVAL_S:
            return False
        self.last_sent, self.sent = now, self.sent + 1
        server = PromptServer.instance
        server.send_sync(EVENT, {"node": self.node_id, "prompt_id": self.prompt_id, "kind": self.kind, **state},
                         server.client_id)
        return True


def view_reference(path: Path) -> dict:
    """{filename, subfolder, type} under which ComfyUI's /view serves `path`: where it is, when it lies in the
    output or temp directory (run folders do), else a copy in temp/flux2_lora. Never a path of the server."""
    real = os.path.realpath(path)
    for kind in ("output", "temp"):
        root = os.path.realpath(folder_paths.get_directory_by_type(kind))
        if os.path.splitdrive(real)[0] == os.path.splitdrive(root)[0] and os.path.commonpath((real, root)) == root:
            subfolder = Path(os.path.relpath(os.path.dirname(real), root)).as_posix()
            return {"filename": os.path.basename(real), "subfolder": "" if subfolder == "." else subfolder,
                    "type": kind}
    folder = Path(folder_paths.get_temp_directory()) / "flux2_lora"
    folder.mkdir(parents=True, exist_ok=True)
    copy = folder / f"{uuid.uuid4().hex[:8]}_{Path(path).name}"
    shutil.copyfile(path, copy)
    return {"filename": copy.name, "subfolder": "flux2_lora", "type": "temp"}


# ------------------------------------------------------------------------------------------- stop requests
_lock = threading.Lock()
_running: dict[str, dict] = {}   # prompt id -> {"node": node id, "stop": bool}: the Train running for it


@contextmanager
def stoppable(prompt_id: str | None, node_id: str | None):
    """While it is open, POST /flux2_lora/stop can ask this Train to stop; yields `requested()`."""
    entry = {"node": str(node_id), "stop": False}
    with _lock:
        _running[str(prompt_id)] = entry
    try:
        yield lambda: entry["stop"]
    finally:
        with _lock:
            if _running.get(str(prompt_id)) is entry:
                del _running[str(prompt_id)]


def request_stop(prompt_id: str, node_id: str | None = None) -> bool:
    """Marks the running Train of `prompt_id` (and `node_id`, when given); False when there is none."""
    with _lock:
        entry = _running.get(prompt_id)
        if entry is None or (node_id is not None and entry["node"] != node_id):
            return False
        entry["stop"] = True
        return True


def _stop_body(body: object) -> tuple[str, str | None]:
    """(prompt_id, node_id) of a stop request; ValueError naming what is wrong otherwise."""
    if not isinstance(body, dict):
        raise ValueError('the body must be a JSON object: {"prompt_id": "...", "node_id": "..."}')
    unknown = sorted(set(body) - {"prompt_id", "node_id"})
    if unknown:
        raise ValueError(f"unknown keys {unknown}: only prompt_id and node_id are read")
    values = [body.get("prompt_id"), body.get("node_id")]
    for key, value in zip(("prompt_id", "node_id"), values):
        if value is None and key == "node_id":
            continue
        if not isinstance(value, str) or not value or len(value) > MAX_ID_LENGTH or not value.isprintable():
            raise ValueError(f"{key} must be a non-empty string of at most {MAX_ID_LENGTH} printable characters")
    return values[0], values[1]


async def stop_route(request: web.Request) -> web.Response:
    """POST {"prompt_id", "node_id"?}: 200 when a running Train will stop after its step, 409 when none runs for
    that prompt, 400 on a malformed body. Stopping is the user's to ask, as Cancel is: no further check."""
    if (request.content_length or 0) > MAX_BODY_BYTES:
        return web.json_response({"error": f"the body is over {MAX_BODY_BYTES} bytes"}, status=400)
    try:
        body = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError):
        return web.json_response({"error": "the body is not JSON"}, status=400)
    try:
        prompt_id, node_id = _stop_body(body)
    except ValueError as exc:
        return web.json_response({"error": str(exc)}, status=400)
    if not request_stop(prompt_id, node_id):
        return web.json_response({"error": "no Train is running for that prompt (it finished, or has not started)"},
                                 status=409)
    log.info("stop and save requested for prompt %s: the running Train stops after its step", prompt_id)
    return web.json_response({"stopping": True, "prompt_id": prompt_id})


_registered = False


def add_routes() -> None:
    """Registers the stop route on ComfyUI's server (once); called when ComfyUI loads the pack."""
    global _registered
    server = getattr(PromptServer, "instance", None)
    if server is None:  # ComfyUI's nodes loaded without its web server (scripts, tools): no button to answer
        log.debug("no ComfyUI server: %s not registered", STOP_ROUTE)
        return
    if not _registered:
        server.routes.post(STOP_ROUTE)(stop_route)
        _registered = True
